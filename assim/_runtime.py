"""Where a computation runs: backend, devices, precision and peak memory."""

from pathlib import Path

import jax


def peak_host_memory_mib() -> float:
    """The process's peak resident set size so far: Linux's `VmHWM` (which starts
    afresh at `exec`, unlike `ru_maxrss`, which a child inherits from its parent)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def runtime_summary() -> dict:
    """Where this process computes (the CLIs write it to `metrics.json` as
    `runtime`): JAX's backend, device kind and count, processes, version,
    precision, and the peak memory so far: the first device's peak allocation
    where its backend reports one (a GPU's; None on a CPU), in MiB, and the
    process's peak resident memory (`peak_host_memory_mib`)."""
    device = jax.devices()[0]
    peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "jax": jax.__version__,
        "float64": bool(jax.config.jax_enable_x64),
        "peak_device_memory_mib": None if peak is None else peak / 2**20,
        "peak_host_memory_mib": peak_host_memory_mib(),
    }
