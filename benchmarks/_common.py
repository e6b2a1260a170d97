"""What the learned-assimilation benchmarks share: Lorenz-96 twin windows with
forecast backgrounds, B from innovation statistics, timing of compiled methods
(one window per call, and batched), training through `assim.train` with an
optional cache of trained networks, and Markdown tables.

A method here is `method(obs, background) -> trajectory` built from a library
analyser and the window problem, as `assim-run` runs it."""

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optimistix as optx  # noqa: E402

import simulators as sim  # noqa: E402
from assim import (  # noqa: E402
    Analysis,
    ObservationSet,
    SpectralCovariance,
    TrainSettings,
    UnrolledVar,
    Variational,
    WindowProblem,
    train,
    windows_batch,
)

ROOT = Path(__file__).resolve().parents[1]
L96_INTERVAL = 5
CACHE: Path | None = None  # --cache DIR: trained networks kept between runs
REPEATS = 5  # --repeats: timings are the best of this many passes


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", type=Path, help="keep trained networks here")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timings: the best of this many passes"
    )


def use_common_arguments(args) -> None:
    global CACHE, REPEATS
    CACHE, REPEATS = args.cache, args.repeats


def l96_simulator(forcing=8.0, correction=None):
    return sim.Simulator(
        sim.Lorenz96(40, forcing), sim.IMEXRungeKutta("ars222"), 0.01, correction
    )


def l96_windows(
    simulator,
    n_windows,
    n_times,
    *,
    observed,
    seed,
    noise=1.0,
    background_lag=2,
    background_std=1.0,
):
    """Windows of one truth run (`n_times` observation times `L96_INTERVAL` steps
    apart, windows `n_times + background_lag` observation times apart), sparse noisy
    observations (each variable observed with probability `observed` at each time)
    and forecast backgrounds: the truth `background_lag` observation times before
    the window plus N(0, background_std^2), run forward."""
    rng = np.random.default_rng(seed)
    stride = n_times + background_lag
    roll = eqx.filter_jit(lambda s, u, n: s.rollout(u, n))
    u0 = roll(simulator, jnp.asarray(rng.normal(size=40)), 2000)[-1]
    n_obs = n_windows * stride + background_lag
    truth = np.asarray(roll(simulator, u0, n_obs * L96_INTERVAL)[::L96_INTERVAL])
    starts = background_lag + stride * np.arange(n_windows)
    perturbed = truth[starts - background_lag] + background_std * rng.normal(
        size=(n_windows, 40)
    )
    forecast = eqx.filter_jit(
        jax.vmap(
            lambda s, u: s.rollout(u, background_lag * L96_INTERVAL)[-1],
            in_axes=(None, 0),
        )
    )
    backgrounds = np.asarray(forecast(simulator, jnp.asarray(perturbed)))
    windows = []
    for start in starts:
        states = truth[start : start + n_times]
        mask = rng.random(states.shape) < observed
        values = np.where(mask, states + noise * rng.normal(size=states.shape), 0.0)
        windows.append(
            ObservationSet(
                jnp.asarray(values),
                jnp.asarray(mask),
                jnp.full(states.shape, noise),
                jnp.arange(n_times) * L96_INTERVAL * simulator.dt,
                jnp.asarray(states),
            )
        )
    return windows_batch(windows, (40,), list(backgrounds)), truth


def innovation_b_variance(data) -> float:
    """Background-error variance from innovation statistics at the first time
    (`var(y - x_b) - sigma_o^2`; no truth)."""
    mask = np.asarray(data.obs.mask[:, 0])
    d = np.asarray(data.obs.values[:, 0]) - np.asarray(data.background)
    sigma2 = np.asarray(data.obs.error_std[:, 0]) ** 2
    return float(np.mean(d[mask] ** 2) - np.mean(sigma2[mask]))


def innovation_scaled_b(grid, climate, data):
    """`(B, sigma_b^2)`: the climatological covariance's shape, scaled to the
    background-error variance that the innovations give."""
    var_b = innovation_b_variance(data)
    scale = var_b / float(climate.var(axis=0).mean())
    return SpectralCovariance.from_samples(grid, climate, scale), var_b


def select(batch, index):
    return jax.tree.map(lambda a: a[index], batch)


def array_jit(fn, *example):
    """`(compiled, arrays)`: `fn(*args)` compiled by `jax.jit` as a function of the
    list of array leaves of `args` only (the method `fn`, trained or configured, is
    a compile-time constant, as when it is deployed on a stream of windows; any
    other leaves of `args` fixed from `example`), and `arrays(*args)`, that list.
    A call then costs jax's C++ dispatch of a few arrays; `eqx.filter_jit` with the
    method as an argument also partitions and hashes its pytree on every call,
    about 0.16 ms for an unrolled network here, which would dwarf the compiled
    work of one small window."""
    leaves, treedef = jax.tree.flatten(example)
    where = [i for i, leaf in enumerate(leaves) if eqx.is_array(leaf)]

    def call(values):
        full = list(leaves)
        for i, value in zip(where, values, strict=True):
            full[i] = value
        return fn(*jax.tree.unflatten(treedef, full))

    def arrays(*args):
        found = jax.tree.leaves(args)
        return [found[i] for i in where]

    return jax.jit(call), arrays


class Timed:
    """`method(obs, background) -> trajectory` compiled two ways (`array_jit`: the
    method a constant, each call's arrays flattened beforehand): one window per
    call (latency) and all windows of `data` in one vmapped call (throughput,
    without the per-call dispatch). Each `time()` is one pass of both; the minima
    over passes are kept."""

    def __init__(self, method, data):
        self.data = data
        first = (select(data.obs, 0), data.background[0])
        self.fn, arrays = array_jit(method, *first)
        self.windows = [
            arrays(select(data.obs, i), data.background[i]) for i in range(data.size)
        ]
        self.batched, arrays = array_jit(jax.vmap(method), data.obs, data.background)
        self.all_windows = arrays(data.obs, data.background)
        jax.block_until_ready(self.fn(self.windows[0]))
        jax.block_until_ready(self.batched(self.all_windows))
        self.per_window = self.per_window_batched = np.inf
        self.trajectories = None

    def time(self):
        t0 = time.perf_counter()
        trajectories = [jax.block_until_ready(self.fn(w)) for w in self.windows]
        elapsed = (time.perf_counter() - t0) / self.data.size
        self.per_window = min(self.per_window, elapsed)
        self.trajectories = trajectories
        t0 = time.perf_counter()
        jax.block_until_ready(self.batched(self.all_windows))
        elapsed = (time.perf_counter() - t0) / self.data.size
        self.per_window_batched = min(self.per_window_batched, elapsed)

    def result(self):
        """`(rmse, its standard error over windows, seconds per window, seconds per
        window in a batch, analyses)`."""
        trajectories = np.stack([np.asarray(t) for t in self.trajectories])
        truth = np.asarray(self.data.obs.truth)
        per = np.sqrt(
            np.mean((trajectories - truth) ** 2, axis=tuple(range(1, truth.ndim)))
        )
        rmse = float(np.sqrt(np.mean(per**2)))
        error = float(per.std(ddof=1) / np.sqrt(len(per))) if len(per) > 1 else np.nan
        return rmse, error, self.per_window, self.per_window_batched, trajectories


def evaluate(method, data, repeats=None):
    """`Timed(method, data).result()` after the best of `repeats` passes (default
    `--repeats`)."""
    timed = Timed(method, data)
    for _ in range(REPEATS if repeats is None else repeats):
        timed.time()
    return timed.result()


CACHE: Path | None = None  # --cache DIR: trained networks kept between runs
REPEATS = 5  # --repeats: timings are the best of this many passes


def cache_path(net, problem, settings: TrainSettings) -> Path:
    """`--cache` file of `net` trained with `settings` on `problem`: a hash of the
    training settings that change the result, of the untrained network's leaves
    and of the problem's."""
    key = repr(
        (
            settings.steps,
            settings.batch_size,
            settings.loss.terms,
            settings.learning_rate,
        )
    )
    if settings.parameter_learning_rate is not None:
        key += repr(settings.parameter_learning_rate)
    key += repr(
        jax.tree.map(
            lambda a: np.asarray(a).sum(),
            eqx.filter((net, problem), eqx.is_inexact_array),
        )
    )
    return CACHE / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.eqx"


def fit(
    net,
    problem,
    data,
    validation,
    *,
    steps,
    batch_size,
    loss,
    learning_rate=3e-3,
    parameter_learning_rate=None,
):
    """Train with `assim.train` (checkpoints in a temporary directory). With
    `--cache DIR`, a network trained before with the same settings is loaded
    instead (its file is named by a hash of the settings and the network)."""
    settings = TrainSettings(
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        parameter_learning_rate=parameter_learning_rate,
        loss=loss,
        validate_every=max(steps // 4, 1),
        checkpoint_every=0,
    )
    names = [name for name, _ in loss.terms]
    cached = None if CACHE is None else cache_path(net, problem, settings)
    if cached is not None and cached.is_file():
        print(f"    loaded {names} {steps} steps from {cached}", flush=True)
        return eqx.tree_deserialise_leaves(cached, net)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trained, records = train(
            net,
            problem,
            data,
            settings,
            validation=validation,
            checkpoint=Path(tmp) / "net.eqx",
        )
    wall = time.perf_counter() - t0
    print(
        f"    trained {names} {steps} steps in {wall:.0f} s, final loss "
        f"{records[-1]['loss']:.4g}",
        flush=True,
    )
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        eqx.tree_serialise_leaves(cached, trained)
    return trained


COLUMNS = ["method", "analysis RMSE", "ms / window", "ms / window, batched"]


def print_table(title, header, rows):
    print(f"\n{title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)


def comparison_rows(methods, test, repeats=None):
    """Table rows of `methods` on `test`. The passes are interleaved (each pass
    times every method once) so that the machine's slow spells fall on all of them
    alike and the time ratios are measured side by side."""
    timed = [(name, Timed(method, test)) for name, method in methods]
    for _ in range(REPEATS if repeats is None else repeats):
        for _, t in timed:
            t.time()
    rows = []
    for name, t in timed:
        rmse, err, per, batched, _ = t.result()
        rows.append(
            (
                name,
                f"{rmse:.3f} ± {err:.3f}",
                f"{per * 1e3:.2f}",
                f"{batched * 1e3:.2f}",
            )
        )
        print(
            f"  {name}: {rmse:.3f} ± {err:.3f}, {per * 1e3:.2f} ms/window, "
            f"{batched * 1e3:.2f} ms/window batched",
            flush=True,
        )
    return rows


def lbfgs(max_steps: int) -> Variational:
    """4D-Var by optimistix L-BFGS (tolerances 1e-6), at most `max_steps`
    iterations."""
    return Variational(optx.LBFGS(rtol=1e-6, atol=1e-6), max_steps)


def analyser_method(analyser, problem):
    """`(obs, background) -> trajectory` of any analyser on `problem`."""

    def method(obs, background):
        analysis, _ = analyser(problem, obs, background)
        model = analyser.model_problem(problem)
        return model.trajectory(analysis, obs.n_times)

    return method


def background_method(problem):
    return lambda obs, bg: problem.trajectory(Analysis(bg), obs.n_times)


def oi_method(problem: WindowProblem, climate_mean: float):
    """Optimal interpolation at each observation time: the climatological mean
    updated by that time's observations with the climatological covariance of
    `problem` (a quadratic problem, so its converged 3D-Var is the OI analysis)."""
    converged = lbfgs(1000)

    def method(obs, background):
        mean = jnp.full_like(background, climate_mean)

        def at(t):
            single = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, t, 1), obs)
            return converged(problem, single, mean)[0].initial_state

        return jax.vmap(at)(jnp.arange(obs.n_times))

    return method


def l96_unrolled(problem, K, data, scale, key, **options):
    """A K-layer network for the windows of `data` (momentum and a proximal CNN
    unless `options` say otherwise), its steps started at 1 / curvature of the
    first window."""
    options = {"momentum": True, "prior": "proximal", **options}
    first = select(data.obs, 0)
    net = UnrolledVar(
        problem.simulator.model.grid,
        K,
        n_times=first.n_times,
        scale=scale,
        width=16,
        depth=3,
        kernel=5,
        key=key,
        **options,
    )
    return net.with_stable_steps(problem, first, data.background[0])


def kappa_error(parameter, theta, true) -> float:
    kappa = np.asarray(parameter.value(theta))
    return float(np.linalg.norm(kappa - true) / np.linalg.norm(true))


def set_forcing(simulator, theta):
    return eqx.tree_at(lambda s: s.model.forcing, simulator, 8.0 * jnp.exp(theta))


def l96_problem(simulator, B, *, forcing: bool = False) -> WindowProblem:
    """The Lorenz-96 windows' problem; `forcing`: F = 8 exp(theta) is unknown
    (prior N(0, 1) on theta)."""
    if not forcing:
        return WindowProblem(simulator, B, L96_INTERVAL)
    return WindowProblem(
        simulator,
        B,
        L96_INTERVAL,
        set_parameters=set_forcing,
        parameter_background=jnp.asarray(0.0),
        parameter_std=1.0,
    )


def bundled_setup(layers: int, test_windows: int = 0):
    """The bundled dataset's training / validation / test windows, and the untrained
    network and its problem as `assim-train` builds them from its default config
    (`assim._config.build_network`): `(ds, data, validation, test, net, problem,
    parameter)`."""
    import xarray as xr
    from hydra import compose, initialize_config_module

    from assim import bundled_dataset, split_windows
    from assim._config import build_network

    with initialize_config_module("assim.configs", version_base=None):
        cfg = compose("train", overrides=[f"network.net.n_layers={layers}"])
    ds = xr.open_dataset(bundled_dataset())
    length = int(ds.attrs["window_length"])
    interval = int(ds.attrs["observation_interval_steps"])
    groups = split_windows(ds, length, jnp.float64)
    shape = tuple(ds["obs"].shape[1:])
    data, validation, test = (windows_batch(groups[k], shape) for k in (0, 1, 2))
    if test_windows:
        test = select(test, slice(0, test_windows))
    scale = data.observed_std()
    net, problem, parameter = build_network(
        cfg, n_times=length, interval=interval, scale=scale, seed=0
    )
    net = net.with_stable_steps(problem, select(data.obs, 0), data.background[0])
    print(
        f"bundled: {data.size} training, {validation.size} validation, "
        f"{test.size} test windows"
    )
    return ds, data, validation, test, net, problem, parameter


def app(name, run_dir, *overrides):
    """Run `assim-<name>` with `overrides` in `run_dir`; its stderr on failure."""
    command = [
        sys.executable,
        "-m",
        f"assim._cli.{name}",
        f"hydra.run.dir={run_dir}",
        *([] if name == "data" else ["progress=false"]),
        *overrides,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
