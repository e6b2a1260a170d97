"""Does an accelerator pay off? One command, the same table on a GPU and on a CPU.

Sections (`--only NAME ...`; float32 unless a row says f64):

- `windows`: one 4D-Var window of the main job (`assim-run`'s defaults: 2D
  advection-diffusion, incremental Gauss-Newton 5 x 20 CG, the diffusivity field
  estimated) at several grid sizes, on twin data from the library's twin generator
  (what `assim-data` writes). Seconds per window as the library runs it (the whole
  Gauss-Newton solve, outer and inner loops, one compiled program) beside the same
  iterations driven from Python (one compiled call per outer iteration, as before
  the solve was compiled whole): their difference is the per-iteration dispatch
  cost. Also the compile time and the analysis error.
- `gradients`: gradient / forward time of 20-step rollouts, 2D Burgers (backward
  Euler, Newton-GMRES, implicit adjoint; float32 and float64, with the Krylov
  iterations per step of the forward and transpose solves) and 2D Navier-Stokes
  (IMEX ARS(2,2,2), FFT solves; float32 and float64).
- `throughput`: windows per second of an unrolled network (4 layers, after
  `--train-steps` training steps; the training's own windows per second too) and of
  converged 4D-Var (`assimilate`: independent windows vmapped in batches), 64 x 64
  (`--throughput-grid`).
- `cli`: the bundled main job (`assim-run`, no arguments) twice into one fresh
  compilation cache: wall time, compile time, RMSE and diffusivity error.

Every section also reports the device's peak memory (`memory_stats()` on a GPU;
the process's peak resident memory on a CPU, which has no device statistics).

`python benchmarks/bench_accelerator.py` picks its sizes by backend: on a GPU
windows at 32, 128 and 512, gradients at 256-2048 (about 5 minutes on one GPU); on a
CPU windows at 32 and 64, gradients at 64-256. `--json FILE` also writes the table,
rewritten after every row, so that a run stopped part-way (a device session's time
limit) keeps what it measured; `--budget-s S` starts no size or section after S
seconds and lists what it left out as skipped.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from bench_scale import advection_diffusion, random_windows, unrolled_net  # noqa: E402
from bench_simulators import (  # noqa: E402
    N_STEPS,
    _initial_state,
    _ours,
    krylov_per_step,
    measure,
)

import assim  # noqa: E402
import simulators as sim  # noqa: E402

SECTIONS = ("windows", "gradients", "throughput", "cli")


def on_accelerator() -> bool:
    return jax.default_backend() != "cpu"


def peak_memory_mib() -> float:
    """The device's peak allocation (GPU/TPU), else the process's peak RSS."""
    runtime = assim.runtime_summary()
    return runtime["peak_device_memory_mib"] or runtime["peak_host_memory_mib"]


class Progress:
    """The results as they come: each row printed and the JSON (if any) rewritten
    at once; a size or section not started once `budget_s` seconds have passed is
    recorded in `found["skipped"]`."""

    def __init__(self, found: dict, path: Path | None, budget_s: float | None):
        self.found, self.path, self.budget_s = found, path, budget_s
        self.start = time.perf_counter()

    def add(self, section: str, row: dict) -> None:
        row["peak_mib"] = peak_memory_mib()
        self.found.setdefault(section, []).append(row)
        print(f"{section}: {row}", flush=True)
        self.save()

    def allows(self, what: str) -> bool:
        spent = time.perf_counter() - self.start
        if self.budget_s is None or spent < self.budget_s:
            return True
        self.found.setdefault("skipped", []).append(what)
        print(f"skipped ({spent:.0f} s > --budget-s {self.budget_s:g}): {what}")
        self.save()
        return False

    def save(self) -> None:
        if self.path is not None:
            write_json(self.found, self.path)


def _median_time(fn, *args, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# ------------------------------------------------------------------- windows


def main_job_window(n: int, seed: int = 0):
    """`(analyser, problem, window, background)`: the first window of a twin of the
    main job at `n x n`, built from `assim-run`'s and `assim-data`'s own configs."""
    from hydra import compose, initialize_config_module

    from assim import WindowStream, obs_mean_background
    from assim._config import build_problem, generate_twin, instantiate_trusted
    from assim._observations import observation_interval

    shape = f"[{n},{n}]"
    with initialize_config_module("assim.configs", version_base=None):
        cfg = compose(
            "run",
            overrides=[
                f"simulator.model.grid.shape={shape}",
                "twin.n_times=10",
                "twin.window_length=5",
                "twin.spinup_steps=20",
            ],
        )
    ds = generate_twin(cfg.simulator, cfg.twin, seed)
    interval = observation_interval(ds, float(cfg.simulator.dt))
    problem, _ = build_problem(cfg.simulator, cfg.problem, interval)
    dtype = jnp.zeros(()).dtype
    window = WindowStream(ds, int(ds.attrs["window_length"]), prefetch=0, dtype=dtype)[
        0
    ]
    background = obs_mean_background(window, (n, n)).astype(dtype)
    return instantiate_trusted(cfg.method.analyser), problem, window, background


def host_driven(analyser, problem, window, background, steps: int):
    """The same Gauss-Newton iterations, each outer iteration (its CG inner loop and
    the cost and gradient norm the library records) one compiled call from Python.
    Returns a function of no arguments that runs them and returns the analysis."""
    full = problem
    problem = problem.tolerating_blow_up()
    solver = analyser.solver

    def fn(y, args):
        return problem.residuals(y, *args), None

    args = (window, background)
    y0 = problem.initial_control(window, background)
    structs = eqx.filter_eval_shape(fn, y0, args)

    @eqx.filter_jit
    def init(y, args):
        return solver.init(fn, y, args, {}, *structs, frozenset())

    @eqx.filter_jit
    def step(y, state, args):
        y, state, _ = solver.step(fn, y, args, {}, state, frozenset())
        return y, state, problem.value_and_grad_norm(y, *args)

    def run():
        y, state = y0, init(y0, args)
        for _ in range(steps + 1):  # optimistix's first step evaluates the start
            y, state, _ = step(y, state, args)
        return full.analysis(y, background)

    return run


def section_windows(sizes, repeats: int, progress: Progress) -> None:
    for n in sizes:
        if not progress.allows(f"windows {n}^2"):
            continue
        analyser, problem, window, background = main_job_window(n)
        solve = eqx.filter_jit(lambda w, b, a=analyser, p=problem: a(p, w, b))
        t0 = time.perf_counter()
        analysis, info = jax.block_until_ready(solve(window, background))
        compile_s = time.perf_counter() - t0
        compiled = _median_time(solve, window, background, repeats=repeats)
        steps = int(info.steps)
        driven = host_driven(analyser, problem, window, background, steps)
        driven_analysis = jax.block_until_ready(driven())
        from_host = _median_time(driven, repeats=repeats)
        # The two ran the same iterations: the same analysis up to rounding.
        gap = float(
            jnp.max(jnp.abs(driven_analysis.initial_state - analysis.initial_state))
        )
        truth = window.truth[0]
        rmse = float(jnp.sqrt(jnp.mean((analysis.initial_state - truth) ** 2)))
        before = float(jnp.sqrt(jnp.mean((background - truth) ** 2)))
        progress.add(
            "windows",
            {
                "grid": n,
                "outer_iterations": steps,
                "compile_s": compile_s,
                "window_s": compiled,
                "host_driven_s": from_host,
                "dispatch_share": max(from_host - compiled, 0.0) / from_host,
                "host_driven_max_difference": gap,
                "rmse_background": before,
                "rmse_analysis": rmse,
            },
        )


# ----------------------------------------------------------------- gradients


def section_gradients(sizes, repeats: int, progress: Progress) -> None:
    for n in sizes:
        if not progress.allows(f"gradients {n}^2"):
            continue
        for x64 in (False, True):
            with jax.enable_x64(x64):  # the model's constants in that precision too
                grid = sim.Grid((n, n), (1.0, 1.0))
                burgers = sim.Burgers(grid, 2e-3)
                dt = 0.5 * grid.spacing[0]
                u0 = _initial_state((n, n)).astype(jnp.float64 if x64 else jnp.float32)
                simulator = sim.Simulator(burgers, sim.backward_euler(), dt)
                fwd, loss, steps = _ours(simulator)
                label = f"{'f64' if x64 else 'f32'} Burgers BE Newton-GMRES"
                row = measure("burgers2d", n, label, fwd, loss, u0, repeats, steps)
                progress.add("gradients", row | krylov_per_step(burgers, dt, u0))
        for x64 in (False, True):
            with jax.enable_x64(x64):
                ns = sim.NavierStokes2D(n, nu=1e-3, alpha=0.0, amplitude=0.0)
                u0 = _initial_state((n, n))
                u0 = u0 / jnp.max(jnp.abs(jnp.stack(ns.velocity(u0))))
                u0 = u0.astype(jnp.float64 if x64 else jnp.float32)
                dt = 0.5 * np.pi / n
                simulator = sim.Simulator(ns, sim.IMEXRungeKutta("ars222"), dt)
                fwd, loss, _ = _ours(simulator)
                label = f"{'f64' if x64 else 'f32'} Navier-Stokes IMEX ARS(2,2,2)"
                row = measure("navier-stokes2d", n, label, fwd, loss, u0, repeats)
                progress.add("gradients", row)


# ---------------------------------------------------------------- throughput


def section_throughput(
    n_windows: int, train_steps: int, n: int, progress: Progress
) -> None:
    from assim import (
        TrainSettings,
        Variational,
        assimilate,
        incremental,
        map_windows,
        train,
    )

    net, problem = unrolled_net(advection_diffusion(n))
    data = random_windows(n_windows, n=n)
    # Steps stable on the first window, as assim-train starts them.
    first = jax.tree.map(lambda a: a[0], data.obs)
    net = net.with_stable_steps(problem, first, data.background[0])

    def add(row):
        progress.add("throughput", {"grid": n} | row)

    settings = TrainSettings(
        steps=train_steps, batch_size=min(8, n_windows), validate_every=0,
        checkpoint_every=0,
    )  # fmt: skip
    stamps = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.eqx"
        on_step = lambda step, _: stamps.append(time.perf_counter())  # noqa: E731
        net = train(net, problem, data, settings, checkpoint=path, on_step=on_step)[0]
    # The first step compiles: the rate is over the later ones.
    seconds = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
    add(
        {
            "method": f"training (batches of {settings.batch_size}, after the first "
            "step)",
            "windows_per_s": settings.batch_size / seconds,
        }
    )

    def analyse(model, w):
        net, problem = model
        return net(problem, w.obs, w.background)[0].initial_state

    model = (net, problem)
    truth = np.asarray(data.obs.truth[:, 0])  # each window's initial state

    def rmse(initial_states) -> float:
        return float(np.sqrt(np.mean((np.asarray(initial_states) - truth) ** 2)))

    jax.block_until_ready(map_windows(analyse, model, data))  # compile
    seconds = _median_time(lambda: map_windows(analyse, model, data))
    add(
        {
            "method": f"unrolled network, {net.n_layers} layers",
            "windows_per_s": data.size / seconds,
            "rmse": rmse(map_windows(analyse, model, data)),
        }
    )
    analyser = Variational(incremental(inner_steps=20), max_steps=5)
    windows = [jax.tree.map(lambda a, i=i: a[i], data.obs) for i in range(data.size)]
    backgrounds = {id(w): b for w, b in zip(windows, data.background, strict=True)}

    def run_4dvar():  # each window from its own background, as the network's
        found = assimilate(analyser, problem, windows, lambda w: backgrounds[id(w)])
        return np.stack([r.analysis[0] for r in found])

    jax.block_until_ready(run_4dvar())  # compile
    seconds = _median_time(run_4dvar, repeats=1)
    add(
        {
            "method": "4D-Var, 5 Gauss-Newton x 20 CG, batches of 16",
            "windows_per_s": data.size / seconds,
            "rmse": rmse(run_4dvar()),
        }
    )
    add({"method": "background", "rmse": rmse(data.background)})


# ----------------------------------------------------------------------- cli


def section_cli(progress: Progress) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for label in ("empty cache", "warm cache"):
            if not progress.allows(f"cli, {label}"):
                continue
            out = Path(tmp) / label.replace(" ", "_")
            command = [
                sys.executable,
                "-P",  # the installed package, not a source tree in the working dir
                "-m",
                "assim._cli.run",
                f"hydra.run.dir={out}",
                f"compilation_cache.dir={cache}",
            ]
            t0 = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, env=os.environ)
            wall = time.perf_counter() - t0
            metrics = json.loads((out / "metrics.json").read_text())
            progress.add(
                "cli",
                {
                    "run": label,
                    "wall_s": wall,
                    "compile_s": metrics["compilation"]["compile_s"],
                    "programs": metrics["compilation"]["programs"],
                    "cache_hits": metrics["compilation"]["cache_hits"],
                    "rmse": metrics["rmse_truth"],
                    "kappa_rel_l2": metrics["parameters"]["kappa"]["relative_l2_error"],
                },
            )


# --------------------------------------------------------------------- table


def machine() -> str:
    device = jax.devices()[0]
    return (
        f"{device.device_kind} ({jax.default_backend()}, {jax.device_count()} "
        f"device(s)), host {platform.machine()} with {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}"
    )


def _f(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def print_tables(found: dict) -> None:
    print(f"\nmachine: {found['machine']}")
    if "windows" in found:
        header = (
            "grid | GN iterations | compile s | window s (compiled) | window s "
            "(Python-driven) | dispatch share | RMSE bg -> an | peak MiB"
        )
        print(f"\n| {header} |")
        print("|---" * 8 + "|")
        for r in found["windows"]:
            print(
                f"| {r['grid']}^2 | {r['outer_iterations']} | {_f(r['compile_s'])} | "
                f"{_f(r['window_s'])} | {_f(r['host_driven_s'])} | "
                f"{r['dispatch_share']:.0%} | {r['rmse_background']:.3f} -> "
                f"{r['rmse_analysis']:.3f} | {r['peak_mib']:.0f} |"
            )
    if "gradients" in found:
        print("\n| case | N | forward s | grad s | grad/fwd | Krylov it./step fwd | "
              "Krylov it./step adjoint | peak MiB |")  # fmt: skip
        print("|---" * 8 + "|")
        for r in found["gradients"]:
            print(
                f"| {r['method']} | {r['size']} | {_f(r['forward_s'])} | "
                f"{_f(r['grad_s'])} | {r['ratio']:.2f} | "
                f"{_f(r.get('krylov_forward'), '.0f')} | "
                f"{_f(r.get('krylov_transpose'), '.0f')} | {r['peak_mib']:.0f} |"
            )
    if found.get("throughput"):
        n = found["throughput"][0]["grid"]
        print(f"\n| {n}^2 windows | windows/s | RMSE (initial state) | peak MiB |")
        print("|---|---|---|---|")
        for r in found["throughput"]:
            print(
                f"| {r['method']} | {_f(r.get('windows_per_s'))} | "
                f"{_f(r.get('rmse'), '.3f')} | {r['peak_mib']:.0f} |"
            )
    if "cli" in found:
        print(
            "\n| `assim-run` (bundled) | wall s | compile s | programs (cache hits) "
            "| RMSE | kappa rel. L2 |"
        )
        print("|---" * 6 + "|")
        for r in found["cli"]:
            print(
                f"| {r['run']} | {r['wall_s']:.1f} | {r['compile_s']:.1f} | "
                f"{r['programs']} ({r['cache_hits']}) | "
                f"{r['rmse']:.4f} | {r['kappa_rel_l2']:.4f} |"
            )
    if found.get("skipped"):
        print(f"\nskipped (--budget-s): {', '.join(found['skipped'])}")


def write_json(found: dict, path: Path) -> None:
    """Written whole or not at all (a temporary file renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(found, indent=1))
    tmp.replace(path)


def run(args) -> dict:
    gpu = on_accelerator()
    window_sizes = args.window_sizes or ([32, 128, 512] if gpu else [32, 64])
    gradient_sizes = args.gradient_sizes or (
        [256, 512, 1024, 2048] if gpu else [64, 128, 256]
    )
    found = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "steps": N_STEPS}
    progress = Progress(found, args.json, args.budget_s)
    only = set(args.only or SECTIONS)
    if "windows" in only:
        section_windows(window_sizes, args.repeats, progress)
    if "gradients" in only:
        section_gradients(gradient_sizes, args.repeats, progress)
    if "throughput" in only and progress.allows("throughput"):
        grid = args.throughput_grid
        section_throughput(args.windows, args.train_steps, grid, progress)
    if "cli" in only:
        section_cli(progress)
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS)
    parser.add_argument("--window-sizes", type=int, nargs="+")
    parser.add_argument("--gradient-sizes", type=int, nargs="+")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--throughput-grid", type=int, default=64)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--budget-s", type=float)
    args = parser.parse_args(argv)
    with jax.enable_x64(False):  # float32 (the f64 rows switch it on themselves)
        found = run(args)
    print_tables(found)
    if args.json is not None:
        write_json(found, args.json)
    return found


if __name__ == "__main__":
    main()
