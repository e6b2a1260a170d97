"""Data parallelism over devices and hosts: a batch of windows (every leaf's leading
axis) sharded over a one-axis device mesh, everything else replicated. The same code
runs on one device, on N devices of one host, and on several hosts after
`initialize_distributed` (one process per host; every process holds the same global
batch and each device computes its slice)."""

import math

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

BATCH_AXIS = "batch"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Join a multi-host run (`jax.distributed.initialize`). With no arguments JAX
    detects the cluster (SLURM, Open MPI, Kubernetes, TPU pods); otherwise all three
    are needed. Call before anything touches a device."""
    given = [coordinator_address, num_processes, process_id]
    if any(a is not None for a in given) and not all(a is not None for a in given):
        raise ValueError(
            "distributed: coordinator_address, num_processes and process_id go "
            "together (or none of them, to detect the cluster)"
        )
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def batch_mesh(devices=None) -> Mesh:
    """A one-axis mesh (`"batch"`) over `devices` (default: every device of every
    process)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("batch_mesh: no devices")
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the mesh's devices."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def _batch_size(tree) -> int:
    sizes = {np.shape(leaf)[0] for leaf in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(
            f"a batch's leaves disagree on the batch size: {sorted(sizes)}"
        )
    return sizes.pop()


def check_divides(n: int, mesh: Mesh, what: str) -> None:
    """A clear error where `n` windows do not split evenly over the mesh."""
    if n % mesh.size:
        raise ValueError(
            f"{what} {n} does not divide across {mesh.size} devices: use a multiple "
            f"of {mesh.size} (or pad_batch)"
        )


def pad_batch(tree: PyTree, multiple: int) -> tuple[PyTree, int]:
    """Pad the leading axis to a multiple of `multiple` by repeating the last window.

    **Returns:** `(padded, n)` with `n` the number of real windows: results past `n`
    are copies and must be dropped (`unpad`)."""
    n = _batch_size(tree)
    if n == 0:
        raise ValueError("pad_batch: an empty batch")
    total = math.ceil(n / multiple) * multiple

    def pad(a):
        a = np.asarray(a)
        if total == n:
            return a
        return np.concatenate([a, np.repeat(a[-1:], total - n, axis=0)])

    return jax.tree.map(pad, tree), n


def _put(tree: PyTree, sharding: NamedSharding) -> PyTree:
    """Global arrays from a host copy that every process holds (works across
    hosts, where `device_put` to another host's devices does not)."""

    def put(a):
        if isinstance(a, jax.Array) and a.sharding == sharding:
            return a
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

    return jax.tree.map(put, tree)


def shard_batch(tree: PyTree, mesh: Mesh) -> PyTree:
    """The batch's leaves as global arrays split along their leading axis over the
    mesh (the batch size must divide: see `pad_batch`)."""
    check_divides(_batch_size(tree), mesh, "batch size")
    return _put(tree, batch_sharding(mesh))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """The arrays of `tree` copied to every device of the mesh (other leaves, e.g.
    a module's static parts, as they are)."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda a: _put(a, sharding) if isinstance(a, (jax.Array, np.ndarray)) else a,
        tree,
    )


def map_windows(fn, net: PyTree, batch: PyTree, *, mesh: Mesh | None = None):
    """`fn(net, window)` for every window of `batch` (vmapped), the windows split
    over the mesh's devices (default: all) and `net` replicated. A batch that does
    not divide across the devices is padded with copies of its last window, whose
    results are dropped: every window is computed once and none is lost.

    **Returns:** host (numpy) results with the batch's leading size."""
    mesh = batch_mesh() if mesh is None else mesh
    padded, n = pad_batch(batch, mesh.size)
    run = eqx.filter_jit(eqx.filter_vmap(fn, in_axes=(None, 0)))
    out = run(replicate(net, mesh), shard_batch(padded, mesh))
    return jax.tree.map(lambda a: a[:n], gather(out))


def gather(tree: PyTree) -> PyTree:
    """Host numpy copies of (possibly multi-host) global arrays."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
