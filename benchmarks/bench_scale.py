"""Scale: devices, long windows on large grids, archives larger than memory.

Sections (`--only NAME`; float32 throughout, as production runs are):

- `devices`: throughput (windows per second) of assimilation (`map_windows`: an
  unrolled network's analyses of a batch of windows, split over the devices) and
  of training (`train`: each step's batch split over the devices, the gradient
  all-reduced) against the number of devices: 1, 2 and 4 forced host devices
  (`XLA_FLAGS=--xla_force_host_platform_device_count=N`, one fresh process each),
  and every GPU when there is one. Workload: 2D advection-diffusion 64 x 64,
  windows of 5 observation times x 5 IMEX steps, a 4-layer unrolled network.
- `long_windows`: 4D-Var on 2D Navier-Stokes (Kolmogorov flow, 256 x 256, IMEX
  ARS222): XLA's temporary memory of the compiled cost gradient (what the
  gradient stores) against the window length in steps, 11 observation times per
  window, for a plain `lax.scan`, one stored state per step (`jax.checkpoint` of
  each step) and binomial checkpoints (`Simulator.checkpoints`); then a real
  4D-Var (L-BFGS) over 100 implicit steps with the binomial rollout: its wall time,
  the process's peak resident memory and the analysis error.
- `streaming`: archives of several NetCDF files (0.5 to 4 GB of observations,
  64 x 64, float32) written to disk, then, in a fresh process each, every window
  streamed through assimilation (`WindowStream`, read two windows ahead on a host
  thread) and 40 training steps drawn from the whole archive: the process's peak
  resident memory against the archive's size; then `assim-run` over the whole
  archive (a 1-layer network from one `assim-train` step, cycled; `analysis.nc`
  written window by window) up to `--run-max-gb`, with its peak memory.

`python benchmarks/bench_scale.py` (about 20 minutes on 2 CPU cores; the streaming
section writes up to 7.5 GB of archives and a 4 GB `analysis.nc` under `--scratch`,
removed afterwards).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GRID = 64
N_TIMES, INTERVAL = 5, 5


def peak_rss_mib() -> float:
    """The process's peak resident memory (`assim.runtime_summary`'s)."""
    import assim

    return assim.runtime_summary()["peak_host_memory_mib"]


def print_table(title, header, rows):
    print(f"\n{title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |", flush=True)


def machine() -> str:
    import jax

    kinds = sorted({d.device_kind for d in jax.devices()})
    return (
        f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__}, "
        f"{jax.default_backend()} ({', '.join(kinds)})"
    )


# ---------------------------------------------------------------- the workload


def advection_diffusion(n=GRID):
    import simulators as sim

    grid = sim.Grid((n, n), (1.0, 1.0))
    model = sim.AdvectionDiffusion(grid, 0.01, [0.3, 0.2])
    return sim.Simulator(model, sim.IMEXRungeKutta("ars222"), 0.01)


def unrolled_net(simulator, layers=4, n_times=N_TIMES, interval=INTERVAL):
    """`(net, problem)`: an unrolled network and its window problem."""
    import jax

    from assim import DiffusionCovariance, UnrolledVar, WindowProblem

    B = DiffusionCovariance(simulator.model.grid, 0.3, 0.1)
    problem = WindowProblem(simulator, B, interval)
    net = UnrolledVar(
        simulator.model.grid,
        layers,
        n_times=n_times,
        step=0.5,
        scale=1.0,
        momentum=True,
        prior="proximal",
        width=8,
        depth=2,
        key=jax.random.PRNGKey(0),
    )
    return net, problem


def synthetic_fields(rng, n_times, n=GRID, t0=0):
    """Smooth moving patterns, `(n_times, n, n)` float32: a cheap stand-in for a
    truth run (the streaming section measures memory, not skill)."""
    y, x = np.meshgrid(np.arange(n) / n, np.arange(n) / n, indexing="ij")
    t = (t0 + np.arange(n_times))[:, None, None] * 0.01
    phase = rng.uniform(0, 2 * np.pi, size=3)
    u = (
        np.sin(2 * np.pi * (x - 0.3 * t) + phase[0])
        + 0.5 * np.cos(2 * np.pi * (2 * y - 0.2 * t) + phase[1])
        + 0.3 * np.sin(2 * np.pi * (x + y) + phase[2])
    )
    return u.astype(np.float32)


def random_windows(n_windows, seed=0, n=GRID):
    """A batch of synthetic `n x n` windows (5% observed, noise 0.05) in memory."""
    import jax.numpy as jnp

    from assim import ObservationSet, windows_batch

    rng = np.random.default_rng(seed)
    windows = []
    for _ in range(n_windows):
        truth = synthetic_fields(rng, N_TIMES, n)
        mask = rng.random(truth.shape) < 0.05
        values = np.where(mask, truth + 0.05 * rng.normal(size=truth.shape), 0.0)
        windows.append(
            ObservationSet(
                jnp.asarray(values, jnp.float32),
                jnp.asarray(mask),
                jnp.full(truth.shape, 0.05, jnp.float32),
                jnp.arange(N_TIMES, dtype=jnp.float32),
                jnp.asarray(truth),
            )
        )
    return windows_batch(windows, (n, n))


# ------------------------------------------------------------------- devices


def worker_devices(args):
    """One device count (set by XLA_FLAGS in this process): windows per second."""
    import jax

    from assim import TrainSettings, batch_mesh, map_windows, train

    mesh = batch_mesh()
    net, problem = unrolled_net(advection_diffusion())
    data = random_windows(args.windows)

    def analyse(model, w):
        net, problem = model
        return net(problem, w.obs, w.background)[0].initial_state

    model = (net, problem)
    jax.block_until_ready(map_windows(analyse, model, data, mesh=mesh))  # compile
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        jax.block_until_ready(map_windows(analyse, model, data, mesh=mesh))
    assimilation = args.repeats * data.size / (time.perf_counter() - t0)
    settings = TrainSettings(
        steps=args.steps, batch_size=args.batch, validate_every=0, checkpoint_every=0
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.eqx"
        train(net, problem, data, settings, mesh=mesh, checkpoint=path)  # jit
        t0 = time.perf_counter()
        train(net, problem, data, settings, mesh=mesh, checkpoint=path)
        training = args.steps * args.batch / (time.perf_counter() - t0)
    return {
        "devices": jax.device_count(),
        "kind": jax.devices()[0].device_kind,
        "assimilation": assimilation,
        "training": training,
    }


def section_devices(args):
    rows, base = [], None
    counts = [1, 2, 4]
    for count in counts:
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
        found = run_worker("devices", env, args)
        base = base or found
        rows.append(
            (
                f"{count} forced CPU host device(s)",
                f"{found['assimilation']:.1f}",
                f"{found['assimilation'] / base['assimilation']:.2f}",
                f"{found['training']:.1f}",
                f"{found['training'] / base['training']:.2f}",
            )
        )
    gpu = run_worker("devices", {**os.environ, "JAX_PLATFORMS": "cuda"}, args)
    if gpu is not None:
        rows.append(
            (
                f"{gpu['devices']} x {gpu['kind']}",
                f"{gpu['assimilation']:.1f}",
                f"{gpu['assimilation'] / base['assimilation']:.2f}",
                f"{gpu['training']:.1f}",
                f"{gpu['training'] / base['training']:.2f}",
            )
        )
    else:
        print("  (no GPU here: the GPU row is left out)")
    print_table(
        f"Throughput against devices: advection-diffusion {GRID} x {GRID}, windows "
        f"of {N_TIMES} x {INTERVAL} IMEX steps, 4-layer unrolled network; "
        f"{args.windows} windows per assimilation call, training batch {args.batch}",
        [
            "devices",
            "assimilation windows/s",
            "speed-up",
            "training windows/s",
            "speed-up",
        ],
        rows,
    )


def run_worker(name, env, args, extra=()):
    """This script as a fresh process running one worker; its JSON, or `None` when
    the platform is missing (no GPU)."""
    command = [sys.executable, __file__, "--worker", name, *map(str, extra)]
    for key in ("windows", "repeats", "batch", "steps"):
        command += [f"--{key}", str(getattr(args, key))]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        if env.get("JAX_PLATFORMS") == "cuda":
            return None
        raise RuntimeError(f"worker {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------- long windows


def navier_stokes(n, **options):
    import simulators as sim

    model = sim.NavierStokes2D(n=n, nu=1e-3, alpha=0.1, amplitude=1.0, wavenumber=4)
    # dt: explicit advection at a CFL number of about 0.4 on 256 x 256.
    return sim.Simulator(model, sim.IMEXRungeKutta("ars222"), 0.0025, **options)


def ns_problem(n, steps, n_obs=11, seed=0):
    """`(truth simulator, background, obs, true trajectory)`: a spun-up Kolmogorov
    flow, 10% of the grid observed (noise 0.1) at `n_obs` times over `steps` steps,
    the background the truth plus a smooth error."""
    import jax
    import jax.numpy as jnp

    from assim import ObservationSet

    simulator = navier_stokes(n)
    rng = np.random.default_rng(seed)
    u0 = smooth_field(rng, n, 2.0)
    roll = jax.jit(lambda u: simulator.rollout(u, 500)[-1])
    u0 = roll(jnp.asarray(u0))
    interval = steps // (n_obs - 1)
    truth = jax.jit(lambda u: simulator.rollout(u, steps, every=interval))(u0)
    mask = rng.random(truth.shape) < 0.1
    noise = 0.1 * rng.normal(size=truth.shape)
    obs = ObservationSet(
        jnp.asarray(np.where(mask, np.asarray(truth) + noise, 0.0), jnp.float32),
        jnp.asarray(mask),
        jnp.full(truth.shape, 0.1, jnp.float32),
        jnp.arange(n_obs, dtype=jnp.float32) * interval * simulator.dt,
    )
    background = u0 + jnp.asarray(smooth_field(rng, n, 1.0))
    return interval, background, obs, truth


def smooth_field(rng, n, amplitude):
    k = np.fft.fftfreq(n, 1 / n)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    coeffs = (rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))) / (1 + k2)
    u = np.real(np.fft.ifft2(coeffs))
    return (amplitude * u / u.std()).astype(np.float32)


def var4d_problem(simulator, interval):
    from assim import DiffusionCovariance, WindowProblem

    B = DiffusionCovariance(simulator.model.grid, 1.0, 0.3)
    return WindowProblem(simulator, B, interval)


def gradient_temp_mib(problem, obs, background) -> float:
    import jax

    control = problem.initial_control(obs, background)
    grad = jax.jit(jax.grad(lambda c: problem.cost(c, obs, background)))
    analysis = grad.lower(control).compile().memory_analysis()
    return analysis.temp_size_in_bytes / 2**20


def section_long_windows(args):
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optimistix as optx

    from assim import Variational

    n = args.ns_grid
    variants = [
        ("plain scan", {}),
        ("one state per step", {"checkpoint": True}),
        (
            f"binomial, {args.checkpoints} checkpoints",
            {"checkpoints": args.checkpoints},
        ),
    ]
    rows = []
    for steps in args.ns_steps:
        interval = steps // 10
        background = jnp.zeros((n, n), jnp.float32)
        obs = ns_problem_shapes(n, 11, interval)
        row = [str(steps)]
        for _, options in variants:
            problem = var4d_problem(navier_stokes(n, **options), interval)
            row.append(f"{gradient_temp_mib(problem, obs, background):.1f}")
        rows.append(row)
        print("  ", row, flush=True)
    print_table(
        f"4D-Var gradient memory (MiB of XLA temporaries) against the window length: "
        f"Navier-Stokes {n} x {n}, 11 observation times",
        ["implicit steps", *(name for name, _ in variants)],
        rows,
    )
    # A real 4D-Var over the long window with the binomial rollout.
    steps = args.ns_run_steps
    interval, background, obs, truth = ns_problem(n, steps)
    # check_finite off: L-BFGS's line search backs off from a step that blows up.
    simulator = navier_stokes(n, checkpoints=args.checkpoints, check_finite=False)
    problem = var4d_problem(simulator, interval)
    lbfgs = Variational(optx.LBFGS(rtol=1e-6, atol=1e-6), args.ns_iterations)
    t0 = time.perf_counter()
    analysis, info = eqx.filter_jit(lbfgs)(problem, obs, background)
    wall = time.perf_counter() - t0
    x0 = analysis.initial_state
    costs = info.cost[: int(info.steps) + 1]
    analysis = jax.jit(lambda u: simulator.rollout(u, steps, every=interval))(x0)
    first = jax.jit(lambda u: simulator.rollout(u, steps, every=interval))(background)

    def rmse(a):
        return float(jnp.sqrt(jnp.mean((a - truth) ** 2)))

    print_table(
        f"4D-Var (optimistix L-BFGS, {int(info.steps)} steps) over {steps} implicit "
        "steps, "
        f"Navier-Stokes {n} x {n}, {args.checkpoints} binomial checkpoints",
        [
            "wall s",
            "peak RSS MiB",
            "gradient temporaries MiB",
            "RMSE background",
            "RMSE analysis",
            "cost reduction",
        ],
        [
            (
                f"{wall:.0f}",
                f"{peak_rss_mib():.0f}",
                f"{gradient_temp_mib(problem, obs, background):.1f}",
                f"{rmse(first):.3f}",
                f"{rmse(analysis):.3f}",
                f"{costs[0] / costs[-1]:.1f}x",
            )
        ],
    )


def ns_problem_shapes(n, n_obs, interval):
    """An observation window of the right shapes (for compiling only)."""
    import jax.numpy as jnp

    from assim import ObservationSet

    shape = (n_obs, n, n)
    return ObservationSet(
        jnp.zeros(shape, jnp.float32),
        jnp.ones(shape, bool),
        jnp.ones(shape, jnp.float32),
        jnp.arange(n_obs, dtype=jnp.float32) * interval,
    )


# ----------------------------------------------------------------- streaming

WINDOW = 10  # observation times per streamed window


def write_archive(folder: Path, gigabytes: float, file_gb: float = 0.25) -> int:
    """Files of `file_gb` each (obs float32 NaN where unobserved, 5% observed),
    `gigabytes` in all, written one at a time; returns the number of times."""
    import xarray as xr

    folder.mkdir(parents=True, exist_ok=True)
    file_gb = min(file_gb, gigabytes)
    per_time = GRID * GRID * 4
    times_per_file = int(file_gb * 2**30 / per_time) // WINDOW * WINDOW
    n_files = max(1, round(gigabytes / file_gb))
    rng = np.random.default_rng(0)
    coords = np.arange(GRID) / GRID
    for k in range(n_files):
        t0 = k * times_per_file
        truth = synthetic_fields(rng, times_per_file, t0=t0)
        mask = rng.random(truth.shape, dtype=np.float32) < 0.05
        obs = np.where(mask, truth + 0.05 * rng.normal(size=truth.shape), np.nan)
        split = np.zeros(times_per_file, np.int8)
        ds = xr.Dataset(
            {
                "obs": (("time", "y", "x"), obs.astype(np.float32)),
                "obs_error_std": ((), 0.05),
                "split": ("time", split),
            },
            coords={
                "time": (
                    "time",
                    (t0 + np.arange(times_per_file)) * 0.05,
                    {"units": "s"},
                ),
                "y": ("y", coords, {"units": "m"}),
                "x": ("x", coords, {"units": "m"}),
            },
        )
        ds.to_netcdf(folder / f"obs_{k:03d}.nc")
        del truth, mask, obs, ds
    return n_files * times_per_file


def worker_streaming(args):
    """Stream every window of the archive through an analysis, then train from it."""
    import jax
    import jax.numpy as jnp

    from assim import TrainSettings, WindowStream, open_archive, train

    net, problem = unrolled_net(
        advection_diffusion(), layers=1, n_times=WINDOW, interval=1
    )
    ds = open_archive(args.archive, chunk_times=WINDOW)
    stream = WindowStream(ds, WINDOW, prefetch=2, dtype=jnp.float32)
    background = jnp.full((GRID, GRID), 0.0, jnp.float32)
    analyse = jax.jit(lambda n, obs: n(problem, obs, background)[0].initial_state)
    baseline = peak_rss_mib()
    t0 = time.perf_counter()
    error = count = 0.0
    for obs in stream:
        x = analyse(net, obs)
        error += float(jnp.sum(jnp.where(obs.mask, (x - obs.values) ** 2, 0.0)))
        count += float(jnp.sum(obs.mask))
    wall = time.perf_counter() - t0
    after_assimilation = peak_rss_mib()
    settings = TrainSettings(
        steps=args.steps, batch_size=args.batch, validate_every=0, checkpoint_every=0
    )
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train(net, problem, stream, settings, checkpoint=Path(tmp) / "c.eqx")
    return {
        "windows": len(stream),
        "assimilation_s": wall,
        "windows_per_s": len(stream) / wall,
        "rmse_obs": float(np.sqrt(error / count)),
        "baseline_mib": baseline,
        "assimilation_peak_mib": after_assimilation,
        "training_s": time.perf_counter() - t1,
        "peak_mib": peak_rss_mib(),
    }


# The archive's model for the command-line run: 64 x 64 advection-diffusion with
# a known (scalar) diffusivity, one 0.05 step between observation times.
CLI_SIMULATOR = [
    f"simulator.model.grid.shape=[{GRID},{GRID}]",
    "simulator.dt=0.05",
    "simulator.parameter=null",
]
# Runs a hydra app and reports its peak resident memory (VmHWM, see
# `peak_rss_mib`) on stderr.
PEAK_RSS = (
    "import atexit, runpy, sys; atexit.register(lambda: print('PEAK_RSS_KIB', "
    "open('/proc/self/status').read().split('VmHWM:')[1].split()[0], "
    "file=sys.stderr)); app = sys.argv[1]; sys.argv = [app, *sys.argv[2:]]; "
    "runpy.run_module(app, run_name='__main__')"
)


def run_app(app: str, *overrides) -> float:
    """`python -m assim._cli.<app> overrides...` in a fresh process; its peak
    resident memory (MiB)."""
    command = [sys.executable, "-c", PEAK_RSS, f"assim._cli.{app}", *overrides]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"assim-{app} failed:\n{result.stderr[-3000:]}")
    peak = [ln for ln in result.stderr.splitlines() if ln.startswith("PEAK_RSS_KIB")]
    return int(peak[-1].split()[1]) / 1024


def cli_checkpoint(folder: Path, out: Path) -> Path:
    """A 1-layer network from one `assim-train` step on the archive (streamed)."""
    run_app(
        "train",
        f"hydra.run.dir={out}",
        *CLI_SIMULATOR,
        f"data.path={folder}",
        "data.stream=true",
        f"network.window_length={WINDOW}",
        "network.net.n_layers=1",
        "network.net.width=4",
        "network.net.depth=2",
        "network.learn_parameters=false",
        "training.steps=1",
        "training.batch_size=2",
        "float64=false",
        "progress=false",
    )
    return out / "checkpoint.eqx"


def section_streaming(args):
    scratch = Path(args.scratch)
    rows = []
    checkpoint = None
    try:
        for gigabytes in args.archive_gb:
            folder = scratch / f"archive_{gigabytes:g}gb"
            t0 = time.perf_counter()
            n_times = write_archive(folder, gigabytes)
            size = sum(f.stat().st_size for f in folder.glob("*.nc")) / 2**30
            print(
                f"  wrote {size:.2f} GiB ({n_times} times) in "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
            env = {**os.environ, "JAX_PLATFORMS": "cpu"}
            found = run_worker("streaming", env, args, ["--archive", folder])
            cli = "-"
            if gigabytes <= args.run_max_gb:
                # The whole archive through `assim-run` (cycled windows of the
                # network, analysis.nc written window by window).
                checkpoint = checkpoint or cli_checkpoint(folder, scratch / "train")
                peak = run_app(
                    "run",
                    f"hydra.run.dir={scratch / 'run'}",
                    "method=unrolled",
                    f"method.checkpoint={checkpoint}",
                    f"data.path={folder}",
                    "plot=false",
                    "progress=false",
                )
                metrics = json.loads((scratch / "run" / "metrics.json").read_text())
                written = (scratch / "run" / "analysis.nc").stat().st_size / 2**30
                cli = f"{peak:.0f} ({written:.2f} GiB written)"
                assert metrics["windows"] == found["windows"], metrics
                shutil.rmtree(scratch / "run")
            rows.append(
                (
                    f"{size:.2f}",
                    found["windows"],
                    f"{found['windows_per_s']:.0f}",
                    f"{found['baseline_mib']:.0f}",
                    f"{found['assimilation_peak_mib']:.0f}",
                    f"{found['peak_mib']:.0f}",
                    cli,
                )
            )
            print("  ", rows[-1], flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(
        f"Streaming an archive (files of 0.25 GiB, {GRID} x {GRID} float32, windows "
        f"of {WINDOW} times read 2 ahead, a 1-layer unrolled network; training "
        f"batch {args.batch}): peak resident memory of the process",
        [
            "archive GiB",
            "windows",
            "assimilated windows/s",
            "RSS before streaming MiB",
            "peak RSS, all windows assimilated MiB",
            f"peak RSS, + {args.steps} training steps MiB",
            "assim-run on the archive: peak RSS MiB",
        ],
        rows,
    )


# ---------------------------------------------------------------------- main

SECTIONS = {
    "devices": section_devices,
    "long_windows": section_long_windows,
    "streaming": section_streaming,
}
WORKERS = {"devices": worker_devices, "streaming": worker_streaming}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append")
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--archive")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--ns-grid", type=int, default=256)
    parser.add_argument("--ns-steps", type=int, nargs="+", default=[20, 50, 100, 200])
    parser.add_argument("--ns-run-steps", type=int, default=100)
    parser.add_argument("--ns-iterations", type=int, default=100)
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument(
        "--archive-gb", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0]
    )
    parser.add_argument(
        "--run-max-gb", type=float, default=2.0, help="assim-run up to this size"
    )
    parser.add_argument("--scratch", default=tempfile.gettempdir() + "/assim_scale")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    print(f"machine: {machine()}")
    for name in args.only or SECTIONS:
        t0 = time.perf_counter()
        print(f"\n== {name} ==", flush=True)
        SECTIONS[name](args)
        print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
