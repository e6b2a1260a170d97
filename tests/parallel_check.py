"""Run by tests/test_parallel.py in a subprocess with 4 forced host devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=4`): sharded against
single-device training and assimilation. Prints one JSON line of findings.

With `--distributed COORDINATOR NUM_PROCESSES PROCESS_ID` it is one of several
processes joined by `jax.distributed.initialize` (e.g. 2 processes of 2 forced
devices each: the same 4-device mesh over two hosts' worth of processes); it then
prints what every process computed (losses, trained parameters, analyses), for the
test to compare with the single-process run."""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import numpy as np  # noqa: E402
import optimistix as optx  # noqa: E402
from helpers import l96_twin_windows, minimise, tiny_l96_net  # noqa: E402

from assim import (  # noqa: E402
    Masking,
    Supervised,
    Term,
    TrainSettings,
    Variational,
    WeightedLoss,
    assimilate,
    batch_mesh,
    map_windows,
    train,
    windows_batch,
)
from assim._parallel import shard_batch  # noqa: E402
from assim._train import _train_step, init_state  # noqa: E402

T, INTERVAL = 3, 5


def twin_windows(n):
    l96, B, windows = l96_twin_windows(n, T, INTERVAL, spinup=300)
    backgrounds = [w.truth[0] + 1.0 for w in windows]
    return l96, B, windows_batch(windows, (40,), backgrounds)


def flat_params(net) -> list[float]:
    leaves = jax.tree.leaves(eqx.filter(net, eqx.is_inexact_array))
    return np.concatenate([np.ravel(np.asarray(a)) for a in leaves]).tolist()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--distributed", nargs=3, metavar=("ADDRESS", "N", "ID"))
    args = parser.parse_args()
    if args.distributed:
        from assim import initialize_distributed

        address, n, pid = args.distributed
        initialize_distributed(address, int(n), int(pid))
    l96, B, data = twin_windows(7)
    net, problem = tiny_l96_net(l96, B, T, INTERVAL)
    loss = {"masking": Term(Masking()), "supervised": Term(Supervised(), 0.5)}
    settings = TrainSettings(
        steps=2,
        batch_size=4,
        loss=WeightedLoss(loss),
        validate_every=0,
        checkpoint_every=0,
    )
    everywhere, single = batch_mesh(), batch_mesh(jax.devices()[:1])
    found = {"devices": jax.device_count(), "processes": jax.process_count()}
    if args.distributed:  # a mesh over one process's device cannot run on the other
        return distributed(net, problem, data, settings, everywhere, found)
    trained = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, mesh in (("sharded", everywhere), ("single", single)):
            trained[name], records = train(
                net,
                problem,
                data,
                settings,
                mesh=mesh,
                checkpoint=Path(tmp) / f"{name}.eqx",
            )
            found[f"loss_{name}"] = [r["loss"] for r in records]

    def largest_difference(a, b):
        a, b = (eqx.filter(m, eqx.is_inexact_array) for m in (a, b))
        diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
        return max(jax.tree.leaves(diffs))

    host = {k: jax.tree.map(np.asarray, v) for k, v in trained.items()}
    found["max_param_difference"] = largest_difference(host["sharded"], host["single"])
    found["params_changed"] = largest_difference(net, host["sharded"])
    found["params_single"] = flat_params(host["single"])
    # The compiled training step on 4 devices: the batch is split, so the
    # gradient needs a cross-device all-reduce.
    _, static = eqx.partition(net, net.trainable())
    state = init_state(net, settings)
    from assim._parallel import batch_sharding

    hlo = (
        _train_step.lower(
            state, static, problem, data, settings, batch_sharding(everywhere)
        )
        .compile()
        .compiled.as_text()
    )
    found["all_reduce_in_step"] = "all-reduce" in hlo
    # Assimilation of 7 windows (padded to 8 over 4 devices) against one device.
    sharded = shard_batch(jax.tree.map(lambda a: a[:4], data), everywhere)
    found["shard_devices"] = len(sharded.background.sharding.device_set)
    found["shard_rows"] = [
        s.data.shape[0] for s in sharded.background.addressable_shards
    ]

    model = (trained["single"], problem)
    x_sharded = map_windows(analyse, model, data, mesh=everywhere)
    x_single = map_windows(analyse, model, data, mesh=single)
    found["analysis_rows"] = int(x_sharded.shape[0])
    found["analysis_single"] = np.ravel(x_single).tolist()
    found["max_analysis_difference"] = float(np.max(np.abs(x_sharded - x_single)))
    # Independent windows through the analysis path of `assim-run method.cycle=false`.
    windows = [jax.tree.map(lambda a, i=i: a[i], data.obs) for i in range(data.size)]
    background = data.background[0]
    results = {
        name: list(assimilate(trained["single"], problem, windows, background, mesh=m))
        for name, m in (("sharded", everywhere), ("single", single))
    }
    found["windows_results"] = len(results["sharded"])
    found["max_window_difference"] = max(
        float(np.max(np.abs(a.analysis - b.analysis)))
        for a, b in zip(results["sharded"], results["single"], strict=True)
    )
    # 4D-Var on independent windows (`assim-run method.cycle=false`): one compiled
    # L-BFGS per window, vmapped over 4 devices, against one device and against
    # one window's solve alone.
    lbfgs = Variational(optx.LBFGS(rtol=1e-6, atol=1e-6), 300)
    var = {
        name: list(assimilate(lbfgs, problem, windows, background, mesh=m))
        for name, m in (("sharded", everywhere), ("single", single))
    }
    found["var_results"] = len(var["sharded"])
    found["var_converged"] = [r.converged for r in var["sharded"]]
    found["var_max_difference"] = max(
        float(np.max(np.abs(a.analysis - b.analysis)))
        for a, b in zip(var["sharded"], var["single"], strict=True)
    )
    control, info = minimise(problem, windows[2], background, max_steps=300)
    found["var_minimise_converged"] = info.converged
    alone = problem.trajectory(problem.analysis(control, background), T)
    found["var_vs_minimise"] = float(np.max(np.abs(var["sharded"][2].analysis - alone)))
    # An ensemble filter with its 8 members split over the 4 devices: the same
    # analyses as on one device.
    from assim import ETKF, Ensemble, cycle

    members = Ensemble.sample(background, B, 8, jax.random.PRNGKey(0))
    split = members.shard(everywhere)
    found["ensemble_shard_devices"] = len(split.members.sharding.device_set)
    runs = {
        name: list(cycle(ETKF(inflation=1.05), problem, windows[:3], start))
        for name, start in (("sharded", split), ("single", members.shard(single)))
    }
    found["ensemble_max_difference"] = max(
        float(np.max(np.abs(a.analysis - b.analysis)))
        for a, b in zip(runs["sharded"], runs["single"], strict=True)
    )
    try:
        settings = TrainSettings(steps=1, batch_size=3)
        train(net, problem, data, settings, mesh=everywhere)
        found["indivisible"] = "accepted"
    except ValueError as e:
        found["indivisible"] = str(e)
    print(json.dumps(found))
    return 0


def analyse(model, window):
    net, problem = model
    return net(problem, window.obs, window.background)[0].initial_state


def distributed(net, problem, data, settings, mesh, found):
    """Train and assimilate over every process's devices; report the results."""
    with tempfile.TemporaryDirectory() as tmp:
        trained, records = train(
            net, problem, data, settings, mesh=mesh, checkpoint=Path(tmp) / "net.eqx"
        )
        found["checkpoint_written"] = (Path(tmp) / "net.eqx").is_file()
    found["process"] = jax.process_index()
    found["local_devices"] = jax.local_device_count()
    found["loss_sharded"] = [r["loss"] for r in records]
    found["params_sharded"] = flat_params(trained)
    sharded = shard_batch(jax.tree.map(lambda a: a[:4], data), mesh)
    found["shard_processes"] = len(
        {d.process_index for d in sharded.background.sharding.device_set}
    )
    found["local_shard_rows"] = [
        s.data.shape[0] for s in sharded.background.addressable_shards
    ]
    x = map_windows(analyse, (trained, problem), data, mesh=mesh)
    found["analysis_rows"] = int(x.shape[0])
    found["analysis_sharded"] = np.ravel(x).tolist()
    print(json.dumps(found), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
