"""Learned variational assimilation: unrolled networks against classical 4D-Var.

Sections (all in float64; `--only NAME` runs one):

- `l96`: Lorenz-96 (40 variables, F = 8, IMEX ARS222 dt = 0.01), half of the
  variables observed at random at each time with error std 1, windows of 5
  observation times 0.05 apart. One fixed test set (its own truth run). Methods:
  the background (a forecast: the truth 0.1 before the window plus N(0, 1) errors,
  run forward), strong-constraint 4D-Var run to convergence (L-BFGS), 4D-Var
  stopped after K iterations, and the unrolled network (K layers, momentum,
  proximal CNN prior) trained supervised and trained with the masking loss (no
  truth). RMSE of the analysed trajectory against the truth over the test windows
  and wall time per window (jitted, after compilation, one window at a time).
- `bundled`: the same comparison on the bundled 2D advection-diffusion dataset
  (32 x 32, window 10, the diffusivity field unknown and learned by the networks;
  the networks as `assim-train` builds them), plus the learned diffusivity's
  relative L2 error.
- `forcing`: the published setting for learning without ground truth: Lorenz-96,
  noise std 1, 75% of the variables hidden at random at each time. F is learned
  from observations only, starting from F = 7: with the masking loss by the
  unrolled network and by bilevel learning (converged 4D-Var, implicit
  hypergradient), and by bilevel learning with the evidence loss (the observations'
  marginal likelihood; the B scale learned too). The analysis RMSE beside optimal
  interpolation and 4D-Var on the same test data.
- `model_error`: the truth has a term the model lacks (Lorenz-96 plus `-0.03 u^3`);
  the unrolled network is trained with the masking loss with and without a learned
  model-error correction (a CNN added to the tendency inside the IMEX step).
  Forecast RMSE at the end of the window, and one window length beyond it.
- `memory`: peak training memory (XLA's compiled temporary buffers of the
  gradient of a training loss, `memory_analysis()`) against the number of layers /
  inner iterations K on a 64 x 64 advection-diffusion window: unrolled
  backpropagation storing every layer, the binomially checkpointed layer loop, and
  the implicit (bilevel) hypergradient.

`python benchmarks/bench_unrolled.py` (about 25 minutes on 2 CPU cores).
"""

import argparse
import tempfile
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import simulators as sim  # noqa: E402
from assim import (  # noqa: E402
    BilevelVar,
    DiffusionCovariance,
    NeuralCorrection,
    ObservationSet,
    SpectralCovariance,
    TrainSettings,
    UnrolledVar,
    refine_analysis,
    train,
    windows_batch,
)
from assim._twin import MissingTerm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
L96_INTERVAL = 5


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


def cache_path(net, settings: TrainSettings) -> Path:
    """`--cache` file of `net` trained with `settings`: a hash of the training
    settings that change the result and of the untrained network's leaves."""
    import hashlib

    key = repr(
        (
            settings.steps,
            settings.batch_size,
            sorted(dict(settings.losses).items()),
            settings.learning_rate,
        )
    )
    if settings.parameter_learning_rate is not None:
        key += repr(settings.parameter_learning_rate)
    key += repr(
        jax.tree.map(
            lambda a: np.asarray(a).sum(), eqx.filter(net, eqx.is_inexact_array)
        )
    )
    return CACHE / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.eqx"


def fit(
    net,
    data,
    validation,
    *,
    steps,
    batch_size,
    losses,
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
        losses=losses,
        validate_every=max(steps // 4, 1),
        checkpoint_every=0,
    )
    cached = None if CACHE is None else cache_path(net, settings)
    if cached is not None and cached.is_file():
        print(f"    loaded {losses} {steps} steps from {cached}", flush=True)
        return eqx.tree_deserialise_leaves(cached, net)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trained, records = train(
            net,
            data,
            settings,
            validation=validation,
            checkpoint=Path(tmp) / "net.eqx",
        )
    wall = time.perf_counter() - t0
    print(
        f"    trained {losses} {steps} steps in {wall:.0f} s, final loss "
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


def background_method(net):
    return lambda obs, bg: net.trajectory(bg, obs.n_times)


def var_method(var):
    return lambda obs, bg: var.analysis(obs, bg)


def oi_method(oi: BilevelVar, climate_mean: float):
    """Optimal interpolation at each observation time: the climatological mean
    updated by that time's observations with the climatological covariance (a
    quadratic problem, so the converged 3D-Var of `oi` is the OI analysis)."""

    def method(obs, background):
        mean = jnp.full_like(background, climate_mean)

        def at(t):
            single = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, t, 1), obs)
            return oi(single, mean)

        return jax.vmap(at)(jnp.arange(obs.n_times))

    return method


def l96_unrolled(simulator, B, K, data, scale, key, **options):
    """A K-layer network for the windows of `data` (momentum and a proximal CNN
    unless `options` say otherwise), its steps started at 1 / curvature of the
    first window."""
    options = {"momentum": True, "prior": "proximal", **options}
    first = select(data.obs, 0)
    net = UnrolledVar(
        simulator,
        B,
        K,
        observation_interval=L96_INTERVAL,
        n_times=first.n_times,
        scale=scale,
        width=16,
        depth=3,
        kernel=5,
        key=key,
        **options,
    )
    return net.with_stable_steps(first, data.background[0])


def section_l96(args):
    T, K = 5, args.layers
    simulator = l96_simulator()
    data, climate = l96_windows(simulator, args.train_windows, T, observed=0.5, seed=1)
    validation, _ = l96_windows(simulator, 16, T, observed=0.5, seed=2)
    test, _ = l96_windows(simulator, args.test_windows, T, observed=0.5, seed=3)
    B, var_b = innovation_scaled_b(simulator.model.grid, climate, data)
    print(f"L96: background error variance from innovations {var_b:.3f}")
    var = BilevelVar(simulator, B, observation_interval=L96_INTERVAL, max_steps=1000)
    truncated = BilevelVar(
        simulator, B, observation_interval=L96_INTERVAL, max_steps=K, throw=False
    )
    scale = data.observed_std()
    net = l96_unrolled(simulator, B, K, data, scale, jax.random.PRNGKey(0))
    supervised = fit(
        net,
        data,
        validation,
        steps=args.steps,
        batch_size=16,
        losses={"supervised": 1.0},
    )
    masked = fit(
        net,
        data,
        validation,
        steps=args.steps,
        batch_size=16,
        losses={"masking": 1.0},
    )
    methods = [
        ("background", background_method(net)),
        ("4D-Var, converged (L-BFGS)", var_method(var)),
        (f"4D-Var, {K} optimistix L-BFGS steps", var_method(truncated)),
        (f"unrolled, {K} layers, untrained", net.analysis),
        (f"unrolled, {K} layers, supervised", supervised.analysis),
        (f"unrolled, {K} layers, masking (no truth)", masked.analysis),
    ]
    if args.solver_layers:
        # The learned gradient solver (4DVarNet-style ConvLSTM update, with the
        # momentum) in place of the proximal CNN: fewer, cheaper layers.
        k = args.solver_layers
        lstm = l96_unrolled(
            simulator,
            B,
            k,
            data,
            scale,
            jax.random.PRNGKey(0),
            gradient_solver=True,
            prior=None,
        )
        for name, loss in (
            ("supervised", "supervised"),
            ("masking (no truth)", "masking"),
        ):
            trained = fit(
                lstm,
                data,
                validation,
                steps=args.steps,
                batch_size=16,
                losses={loss: 1.0},
            )
            methods.append(
                (f"unrolled, {k} layers, ConvLSTM solver, {name}", trained.analysis)
            )
    rows = comparison_rows(methods, test)
    print_table(
        f"Lorenz-96, half observed, noise 1, windows of {T} times "
        f"({args.test_windows} test windows)",
        COLUMNS,
        rows,
    )


def bundled_setup(args):
    """The bundled dataset's training / validation / test windows and the untrained
    network as `assim-train` builds it: `(cfg, ds, data, validation, test, net,
    parameter, interval)`."""
    import xarray as xr
    from hydra import compose, initialize_config_module

    from assim._cli.network import build_network
    from assim._cli.train import split_windows

    with initialize_config_module("assim.configs", version_base=None):
        cfg = compose("train", overrides=[f"network.n_layers={args.bundled_layers}"])
    ds = xr.open_dataset(ROOT / "datasets" / "advection_diffusion2d.nc")
    length = int(ds.attrs["window_length"])
    interval = int(ds.attrs["observation_interval_steps"])
    groups = split_windows(ds, length, jnp.float64)
    shape = tuple(ds["obs"].shape[1:])
    data, validation, test = (windows_batch(groups[k], shape) for k in (0, 1, 2))
    if args.bundled_test_windows:
        test = select(test, slice(0, args.bundled_test_windows))
    scale = data.observed_std()
    net, parameter = build_network(
        cfg.simulator,
        cfg.network,
        n_times=length,
        interval=interval,
        scale=scale,
        seed=0,
    )
    net = net.with_stable_steps(select(data.obs, 0), data.background[0])
    print(
        f"bundled: {data.size} training, {validation.size} validation, "
        f"{test.size} test windows"
    )
    return cfg, ds, data, validation, test, net, parameter, interval


def kappa_error(parameter, theta, true) -> float:
    kappa = np.asarray(parameter.value(theta))
    return float(np.linalg.norm(kappa - true) / np.linalg.norm(true))


def section_bundled(args):
    from assim._cli.common import build_simulator

    cfg, ds, data, validation, test, net, parameter, interval = bundled_setup(args)
    simulator, _ = build_simulator(cfg.simulator)  # the prior diffusivity
    B = net.background_covariance
    var = BilevelVar(simulator, B, observation_interval=interval, max_steps=1000)
    K = net.n_layers
    truncated = BilevelVar(
        simulator, B, observation_interval=interval, max_steps=K, throw=False
    )
    true = np.asarray(ds["true_kappa"].values)
    oracle = eqx.tree_at(
        lambda v: v.simulator.model.kappa, var, jnp.asarray(true, jnp.float64)
    )
    kw = dict(
        steps=args.bundled_steps,
        batch_size=min(data.size, 4),
        learning_rate=args.bundled_learning_rate,
        parameter_learning_rate=args.bundled_parameter_learning_rate,
    )
    supervised = fit(net, data, validation, losses={"supervised": 1.0}, **kw)
    masked = fit(net, data, validation, losses={"masking": 1.0}, **kw)
    methods = [
        ("background (observation mean)", background_method(net)),
        ("4D-Var, converged (L-BFGS), prior kappa", var_method(var)),
        (f"4D-Var, {K} optimistix L-BFGS steps, prior kappa", var_method(truncated)),
        ("4D-Var, converged, true kappa (oracle)", var_method(oracle)),
        (f"unrolled, {K} layers, supervised", supervised.analysis),
        (f"unrolled, {K} layers, masking (no truth)", masked.analysis),
    ]
    # One pass: these take seconds to minutes per window.
    rows = comparison_rows(methods, test, repeats=1)
    for name, trained in (("supervised", supervised), ("masking", masked)):
        error = kappa_error(parameter, trained.theta, true)
        print(f"  learned kappa ({name}): relative L2 error {error:.3f}")
        rows.append(
            (f"diffusivity field, {name} network", f"rel. L2 {error:.3f}", "", "")
        )
    prior = kappa_error(parameter, jnp.zeros_like(net.theta), true)
    rows.append(("diffusivity field, prior", f"rel. L2 {prior:.3f}", "", ""))
    print_table(
        "Bundled dataset (2D advection-diffusion, 32 x 32, tracks, window 10)",
        COLUMNS,
        rows,
    )


def start_from_kappa(net, parameter, path, true):
    """`net` with its `theta` fitted (least squares in log kappa, Adam) to the
    diffusivity field `kappa` of an `assim-run` analysis file."""
    import optax
    import xarray as xr

    with xr.open_dataset(path) as ds:
        target = jnp.log(jnp.asarray(ds["kappa"].values, jnp.float64))
    optimiser = optax.adam(0.05)

    @jax.jit
    def step(theta, state):
        misfit = lambda t: jnp.sum((jnp.log(parameter.value(t)) - target) ** 2)  # noqa: E731
        updates, state = optimiser.update(jax.grad(misfit)(theta), state)
        return optax.apply_updates(theta, updates), state

    theta = jnp.zeros_like(net.theta)
    state = optimiser.init(theta)
    for _ in range(3000):
        theta, state = step(theta, state)
    print(
        f"  starting from the diffusivity of {path}: rel. L2 "
        f"{kappa_error(parameter, theta, true):.3f}"
    )
    return eqx.tree_at(lambda n: n.theta, net, theta)


def section_bundled_long(args):
    """The masking network of `bundled` (or `--bundled-long-losses`, e.g. the cost
    loss) trained for longer, at a constant learning rate after warm-up
    (`--bundled-long-*`), in chunks: after each chunk, the
    learned diffusivity's error and the test window's analysis RMSE. The chunks
    resume one training run (a constant schedule makes it the uninterrupted run);
    `--bundled-long-checkpoint FILE` keeps it, so that a stopped run continues.
    `--bundled-long-kappa-from analysis.nc` starts the diffusivity from another
    estimate (e.g. `assim-run`'s joint 4D-Var): does the masking loss keep it?"""
    from assim import init_state, load_checkpoint, read_header
    from assim._train import network

    _, ds, data, validation, test, net, parameter, _ = bundled_setup(args)
    true = np.asarray(ds["true_kappa"].values)
    if args.bundled_long_kappa_from is not None:
        net = start_from_kappa(net, parameter, args.bundled_long_kappa_from, true)
        net = net.with_stable_steps(select(data.obs, 0), data.background[0])
    steps, chunk = args.bundled_long_steps, args.bundled_long_chunk
    checkpoint = args.bundled_long_checkpoint
    if checkpoint is None:
        checkpoint = Path(tempfile.mkdtemp()) / "bundled_long.eqx"

    def settings(n):
        return TrainSettings(
            steps=n,
            batch_size=min(data.size, 4),
            learning_rate=args.bundled_learning_rate,
            parameter_learning_rate=args.bundled_long_parameter_learning_rate,
            warmup_steps=5,
            final_fraction=1.0,
            losses=args.bundled_long_losses,
            cost_refine=args.bundled_long_refine,
            cost_refine_cg=args.bundled_long_refine_cg,
            validate_every=chunk,
            checkpoint_every=chunk,
        )

    done = 0
    if checkpoint.is_file():
        done = int(read_header(checkpoint)["step"])
        print(f"  resuming from step {done} ({checkpoint})")
    analysis = eqx.filter_jit(lambda n, o, b: n.analysis(o, b))
    refine = args.bundled_long_refine

    @eqx.filter_jit
    def refined(net, obs, background):
        x = net(obs, background)
        cg = args.bundled_long_refine_cg
        x = refine_analysis(net, obs, background, x, steps=refine, cg_steps=cg)
        return net.trajectory(x, obs.n_times)

    rows = []
    t0 = time.perf_counter()
    for n in range(chunk, steps + 1, chunk):
        if n < done:
            continue  # only the last checkpoint is kept
        if n == done:
            state, _ = load_checkpoint(checkpoint, init_state(net, settings(n)))
            trained, records = network(net, state), []
        else:
            trained, records = train(
                net,
                data,
                settings(n),
                validation=validation,
                checkpoint=checkpoint,
                resume=n > chunk,
            )
        validated = [r["validation"]["loss"] for r in records if "validation" in r]
        trajectories = jax.vmap(analysis, in_axes=(None, 0, 0))(
            trained, test.obs, test.background
        )
        rmse = float(jnp.sqrt(jnp.mean((trajectories - test.obs.truth) ** 2)))
        error = kappa_error(parameter, trained.theta, true)
        loss = f"{validated[-1]:.1f}" if validated else ""
        row = [str(n), loss, f"{error:.3f}", f"{rmse:.3f}"]
        if refine:  # the analysis the cost loss is evaluated at
            trajectories = jax.vmap(refined, in_axes=(None, 0, 0))(
                trained, test.obs, test.background
            )
            error = jnp.sqrt(jnp.mean((trajectories - test.obs.truth) ** 2))
            row.append(f"{float(error):.3f}")
        rows.append(tuple(row))
        print(f"  step {n} ({time.perf_counter() - t0:.0f} s): {row}", flush=True)
        # Each chunk's `train` compiles its own step (the step count is part of the
        # settings); without dropping the old executables, XLA's CPU JIT runs out
        # of code memory after about a dozen chunks ("Unable to allocate section
        # memory").
        jax.clear_caches()
    header = ["step", "validation loss", "kappa rel. L2", "test analysis RMSE"]
    title = f"Bundled dataset, network trained longer on {args.bundled_long_losses}"
    if refine:
        header.append(f"refined ({refine} x {args.bundled_long_refine_cg} CG) RMSE")
        title += f", cost refined by {refine} Gauss-Newton iterations"
    print_table(f"{title} (constant learning rate)", header, rows)


def set_forcing(simulator, theta):
    return eqx.tree_at(lambda s: s.model.forcing, simulator, 8.0 * jnp.exp(theta))


def section_forcing(args):
    T, K = 8, args.layers
    true = l96_simulator(8.0)
    data, climate = l96_windows(true, args.forcing_windows, T, observed=0.25, seed=11)
    validation, _ = l96_windows(true, 16, T, observed=0.25, seed=12)
    test, _ = l96_windows(true, args.test_windows, T, observed=0.25, seed=13)
    grid = true.model.grid
    B, _ = innovation_scaled_b(grid, climate, data)
    wrong = l96_simulator(7.0)
    theta0 = jnp.asarray(np.log(7.0 / 8.0))
    scale = data.observed_std()
    rows = []
    net = l96_unrolled(
        true,
        B,
        K,
        data,
        scale,
        jax.random.PRNGKey(1),
        theta=theta0,
        set_parameters=set_forcing,
    )
    trained = fit(
        net,
        data,
        validation,
        steps=args.forcing_steps,
        batch_size=args.forcing_batch,
        losses={"masking": 1.0},
        learning_rate=1e-2,
    )
    bilevel = BilevelVar(
        true,
        B,
        observation_interval=L96_INTERVAL,
        theta=theta0,
        set_parameters=set_forcing,
        scale=scale,
        max_steps=1000,
    )
    bilevel_trained = fit(
        bilevel,
        data,
        validation,
        steps=args.forcing_bilevel_steps,
        batch_size=args.forcing_bilevel_batch,
        losses={"masking": 1.0},
        learning_rate=1e-2,
    )
    # Type-II maximum likelihood: F and the B scale by the observations' marginal
    # likelihood (Laplace approximation at the converged 4D-Var solution).
    evidence_trained = fit(
        bilevel,
        data,
        validation,
        steps=args.forcing_evidence_steps,
        batch_size=args.forcing_evidence_batch,
        losses={"evidence": 1.0},
        learning_rate=1e-2,
    )
    learned_scale = float(np.exp(evidence_trained.log_scale))
    print(f"  B scale learned by the evidence: {learned_scale:.3f}")
    estimates = {}
    for name, model in (
        (f"unrolled, {K} layers, masking", trained),
        ("bilevel 4D-Var, implicit hypergradient, masking", bilevel_trained),
        ("bilevel 4D-Var, implicit hypergradient, evidence", evidence_trained),
    ):
        F = float(8.0 * np.exp(model.theta))
        estimates[name] = F
        print(f"  F learned by {name}: {F:.4f} (bias {100 * (F - 8) / 8:+.2f}%)")
    # The analyses on the test windows.
    B_clim = SpectralCovariance.from_samples(grid, climate)
    oi = BilevelVar(true, B_clim, observation_interval=L96_INTERVAL, max_steps=1000)
    var = BilevelVar(true, B, observation_interval=L96_INTERVAL, max_steps=1000)
    var_wrong = BilevelVar(wrong, B, observation_interval=L96_INTERVAL, max_steps=1000)
    methods = [
        ("background", background_method(net)),
        ("optimal interpolation", oi_method(oi, float(climate.mean()))),
        ("4D-Var, converged, true F", var_method(var)),
        ("4D-Var, converged, F = 7", var_method(var_wrong)),
        (f"unrolled, {K} layers, masking, learned F", trained.analysis),
        ("bilevel 4D-Var, masking, learned F", bilevel_trained.analysis),
        ("bilevel 4D-Var, evidence, learned F and B scale", evidence_trained.analysis),
    ]
    table = comparison_rows(methods, test)
    for name, F in estimates.items():
        rows.append((name, f"{F:.4f}", f"{100 * (F - 8) / 8:+.2f}%"))
    print_table(
        "Lorenz-96 F recovery: 75% hidden at random, noise std 1, F = 7 at start",
        ["learned by", "F (true 8)", "bias"],
        rows,
    )
    print_table(
        f"Lorenz-96, 75% hidden, noise 1, windows of {T} times: analyses",
        COLUMNS,
        table,
    )


def section_model_error(args):
    T, K = 8, args.layers
    rate = 0.03
    truth_model = l96_simulator(8.0, MissingTerm("cubic", rate))
    n_forecast = T - 1  # observation intervals beyond the window
    data, climate = l96_windows(
        truth_model, args.train_windows, T + n_forecast, observed=0.5, seed=21
    )
    test, _ = l96_windows(
        truth_model, args.test_windows, T + n_forecast, observed=0.5, seed=23
    )

    # The networks see the first T times; the rest is the forecast's verification.
    def cut(batch):
        obs = jax.tree.map(lambda a: a[:, :T], batch.obs)
        return type(batch)(obs, batch.background)

    data_window, validation = cut(data), cut(select(data, slice(0, 16)))
    B, _ = innovation_scaled_b(truth_model.model.grid, climate, data)
    scale = data.observed_std()
    # The typical size of the missing tendency, from the observations' spread.
    correction = NeuralCorrection(
        truth_model.model.grid,
        16,
        2,
        5,
        scale=scale,
        rate=1.0,
        key=jax.random.PRNGKey(3),
    )
    nets = {}
    for name, model in (
        ("without correction", l96_simulator(8.0)),
        ("with learned correction", l96_simulator(8.0, correction)),
    ):
        net = l96_unrolled(model, B, K, data_window, scale, jax.random.PRNGKey(2))
        nets[name] = fit(
            net,
            data_window,
            validation,
            steps=args.model_error_steps,
            batch_size=16,
            losses={"masking": 1.0},
        )
    truth = np.asarray(test.obs.truth)
    rows, errors = [], []
    for name, net in nets.items():

        def forecast(obs, background, net=net):
            window = jax.tree.map(lambda a: a[:T], obs)
            return net.trajectory(net(window, background), T + n_forecast)

        *_, trajectories = evaluate(forecast, test)
        end = np.sqrt(np.mean((trajectories[:, T - 1] - truth[:, T - 1]) ** 2))
        beyond = np.sqrt(np.mean((trajectories[:, -1] - truth[:, -1]) ** 2))
        errors.append(np.asarray([end, beyond]))
        rows.append((name, f"{end:.3f}", f"{beyond:.3f}"))
        print(
            f"  {name}: end of window {end:.3f}, "
            f"{n_forecast} intervals beyond {beyond:.3f}"
        )
    reduction = 100 * (1 - errors[1] / errors[0])
    print(f"  reduction: {reduction[0]:.0f}% at the end, {reduction[1]:.0f}% beyond")
    rows.append(("reduction", f"{reduction[0]:.0f}%", f"{reduction[1]:.0f}%"))
    print_table(
        f"Model error: truth = Lorenz-96 - {rate} u^3, model = Lorenz-96; unrolled "
        f"networks ({K} layers) trained with the masking loss",
        ["model", "RMSE at window end", f"RMSE {n_forecast * 0.05:.2f} beyond"],
        rows,
    )


def section_memory(args):
    grid = sim.Grid((64, 64), (1.0, 1.0), "periodic")
    model = sim.AdvectionDiffusion(grid, kappa=0.02, velocity=(0.1, 0.2))
    simulator = sim.Simulator(model, sim.IMEXRungeKutta("ars222"), 0.02)
    B = DiffusionCovariance(grid, 0.3, 0.1)
    T, interval = 5, 5
    rng = np.random.default_rng(0)
    states = jnp.asarray(rng.normal(size=(T, *grid.shape)))
    obs = ObservationSet(
        states,
        jnp.asarray(rng.random(states.shape) < 0.1),
        jnp.full(states.shape, 0.1),
        jnp.arange(T) * 1.0,
        states,
    )
    background = jnp.zeros(grid.shape)

    def set_kappa(s, theta):
        return eqx.tree_at(lambda s: s.model.kappa, s, 0.02 * jnp.exp(theta))

    def temp_mib(net):
        params, static = eqx.partition(net, net.trainable())

        def loss(p):
            n = eqx.combine(p, static)
            return jnp.mean((n.analysis(obs, background) - obs.truth) ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes / 2**20

    state_mib = grid.shape[0] * grid.shape[1] * 8 / 2**20
    rows = []
    for K in args.memory_layers:
        common = dict(
            observation_interval=interval,
            theta=jnp.asarray(0.0),
            set_parameters=set_kappa,
            key=jax.random.PRNGKey(0),
        )
        stored = temp_mib(UnrolledVar(simulator, B, K, **common))
        checkpointed = temp_mib(UnrolledVar(simulator, B, K, checkpoints=2, **common))
        implicit = temp_mib(
            BilevelVar(
                simulator,
                B,
                observation_interval=interval,
                theta=jnp.asarray(0.0),
                set_parameters=set_kappa,
                max_steps=K,
            )
        )
        rows.append((str(K), f"{stored:.1f}", f"{checkpointed:.1f}", f"{implicit:.1f}"))
        print(
            f"  K={K}: {stored:.1f} / {checkpointed:.1f} / {implicit:.1f} MiB",
            flush=True,
        )
    print_table(
        "Peak training memory (MiB of XLA temporaries, gradient of a loss of the "
        f"analysis; 64 x 64 grid, window of {T} times x {interval} IMEX steps; "
        f"one state is {state_mib:.2f} MiB)",
        [
            "K (layers / inner iterations)",
            "unrolled, every layer stored",
            "unrolled, 2 binomial checkpoints",
            "bilevel, implicit hypergradient",
        ],
        rows,
    )


SECTIONS = {
    "l96": section_l96,
    "bundled": section_bundled,
    "bundled_long": section_bundled_long,
    "forcing": section_forcing,
    "model_error": section_model_error,
    "memory": section_memory,
}


def loss_weights(text: str) -> dict:
    """`"cost=1,masking=0.5"` -> `{"cost": 1.0, "masking": 0.5}`."""
    pairs = (item.split("=") for item in text.split(","))
    return {name.strip(): float(weight) for name, weight in pairs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--solver-layers",
        type=int,
        default=3,
        help="l96: also train a network of this many layers with the ConvLSTM "
        "gradient solver (0: not)",
    )
    parser.add_argument("--train-windows", type=int, default=256)
    parser.add_argument("--test-windows", type=int, default=64)
    parser.add_argument("--bundled-layers", type=int, default=5)
    parser.add_argument("--bundled-steps", type=int, default=60)
    parser.add_argument("--bundled-test-windows", type=int, default=0)
    parser.add_argument("--bundled-learning-rate", type=float, default=1e-2)
    parser.add_argument("--bundled-parameter-learning-rate", type=float, default=None)
    parser.add_argument("--bundled-long-steps", type=int, default=240)
    parser.add_argument("--bundled-long-chunk", type=int, default=20)
    parser.add_argument(
        "--bundled-long-parameter-learning-rate", type=float, default=0.03
    )
    parser.add_argument("--bundled-long-checkpoint", type=Path, default=None)
    parser.add_argument(
        "--bundled-long-losses",
        type=loss_weights,
        default={"masking": 1.0},
        help="bundled_long: the loss weights, e.g. masking=1 or cost=1,masking=1",
    )
    parser.add_argument(
        "--bundled-long-refine",
        type=int,
        default=0,
        help="bundled_long: the cost loss's Gauss-Newton refinement iterations",
    )
    parser.add_argument("--bundled-long-refine-cg", type=int, default=20)
    parser.add_argument(
        "--bundled-long-kappa-from",
        type=Path,
        default=None,
        help="bundled_long: start from the diffusivity of an assim-run analysis.nc",
    )
    parser.add_argument("--forcing-windows", type=int, default=512)
    parser.add_argument("--forcing-steps", type=int, default=400)
    parser.add_argument("--forcing-batch", type=int, default=16)
    parser.add_argument("--forcing-bilevel-steps", type=int, default=100)
    parser.add_argument("--forcing-bilevel-batch", type=int, default=8)
    parser.add_argument("--forcing-evidence-steps", type=int, default=600)
    parser.add_argument("--forcing-evidence-batch", type=int, default=32)
    parser.add_argument("--model-error-steps", type=int, default=300)
    parser.add_argument(
        "--memory-layers", type=int, nargs="+", default=[2, 4, 8, 16, 32]
    )
    parser.add_argument("--cache", type=Path, help="keep trained networks here")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timings: the best of this many passes"
    )
    args = parser.parse_args()
    global CACHE, REPEATS
    CACHE, REPEATS = args.cache, args.repeats
    for name in args.only or SECTIONS:
        t0 = time.perf_counter()
        print(f"\n== {name} ==", flush=True)
        SECTIONS[name](args)
        print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
