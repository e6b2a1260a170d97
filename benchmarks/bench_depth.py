"""How many layers for which observation noise, and does early stopping on the
validation masking loss pick a good network? Then: what does each learned part of
an unrolled network buy?

Lorenz-96 (40 variables, F = 8, IMEX ARS222 dt = 0.01), half of the variables
observed at random at each time, windows of 5 observation times 0.05 apart,
forecast backgrounds (`_common.l96_windows`); B the climatological covariance
scaled by the innovations. For each observation-error std in `--noise` and each
depth K in `--layers`: an `assim.UnrolledVar` (momentum, proximal CNN prior, steps
started at 1 / curvature) trained with the masking loss only (no truth) by
`assim.train`, validated every `--validate-every` steps on held-out windows (the
validation masking loss), and at each validation scored on a fixed test set
against the truth (RMSE over the test windows ± its standard error over windows).

Early stopping: per noise level, the (K, step) of the lowest validation masking
loss is the one a user without truth would pick; it is compared with the best test
RMSE over all (K, step), and called good when within one standard error of it.

Ablation (`--ablation-noise`, `--ablation-layers`): the full network (momentum,
continuation, learned proximal prior, untied layers, warm start, model-error
correction) and the same with each part removed in turn, each trained as above;
test RMSE of the final network.

Writes the RMSE-vs-K plot (`--plot`, one line per noise level) and prints the
tables. `python benchmarks/bench_depth.py` (about 25 minutes on 2 CPU cores with
the defaults).
"""

import argparse
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    add_common_arguments,
    analyser_method,
    app,
    innovation_scaled_b,
    l96_problem,
    l96_simulator,
    l96_unrolled,
    l96_windows,
    lbfgs,
    print_table,
    select,
    use_common_arguments,
)

from assim import (
    NeuralCorrection,
    TrainSettings,
    Variational,
    WeightedLoss,
    incremental,
    train,
)


def scorer(problem, test):
    """`net -> (rmse, standard error)` on the test windows (one compiled call)."""
    truth = np.asarray(test.obs.truth)

    @eqx.filter_jit
    def trajectories(net):
        return jax.vmap(analyser_method(net, problem))(test.obs, test.background)

    def score(net):
        x = np.asarray(trajectories(net))
        per = np.mean((x - truth) ** 2, axis=tuple(range(1, x.ndim)))  # per window
        rmse = float(np.sqrt(per.mean()))
        # delta method: se(sqrt(m)) = se(m) / (2 sqrt(m))
        error = float(per.std(ddof=1) / np.sqrt(len(per)) / (2 * rmse))
        if not np.isfinite(rmse):
            return np.inf, np.nan
        return rmse, error

    return score


def fit_scored(net, problem, data, validation, score, args):
    """Train with the masking loss; `[(step, validation masking loss, test rmse,
    its error)]` at each validation, and the wall time."""
    settings = TrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=3e-3,
        loss=WeightedLoss.of(masking=1.0),
        validate_every=args.validate_every,
        checkpoint_every=0,
    )
    history = []

    def on_validation(step, trained, scores):
        history.append((step, scores["loss"], *score(trained)))

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            train(
                net,
                problem,
                data,
                settings,
                validation=validation,
                checkpoint=Path(tmp) / "net.eqx",
                on_validation=on_validation,
            )
        except Exception as e:  # a diverged run: what was validated so far counts
            print(f"    training stopped: {str(e).splitlines()[0][:120]}", flush=True)
    return history, time.perf_counter() - t0


def setup(simulator, noise, args):
    """`(data, validation, test, problem, make_net)` of the Lorenz-96 windows."""
    data, climate = l96_windows(
        simulator, args.train_windows, 5, observed=0.5, seed=1, noise=noise
    )
    validation, _ = l96_windows(simulator, 32, 5, observed=0.5, seed=2, noise=noise)
    test, _ = l96_windows(
        simulator, args.test_windows, 5, observed=0.5, seed=3, noise=noise
    )
    B, _ = innovation_scaled_b(simulator.model.grid, climate, data)
    problem = l96_problem(simulator, B)
    scale = data.observed_std()

    def make_net(K, **options):
        return l96_unrolled(problem, K, data, scale, jax.random.PRNGKey(0), **options)

    return data, validation, test, problem, make_net


def bundled_setups(args):
    """`noise -> (data, validation, test, problem, make_net)` of the bundled problem
    at a smaller grid: a twin per noise level written by `assim-data` as the bundled
    dataset was (2D advection-diffusion, backward-Euler truth with a random
    diffusivity field, moving tracks observing 5% of the grid), at `--grid`^2, with
    windows of `--window` times; the networks built as `assim-train` builds them
    (IMEX ARS222) with K layers; the diffusivity field learned with
    `--learn-kappa`, else the model runs the prior diffusivity (a constant, whose
    implicit stages are FFT solves instead of GMRES, as `assim-train` runs it with
    `network.learn_parameters=false`)."""
    import xarray as xr
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from assim import split_windows, windows_batch
    from assim._config import build_network

    shape = f"simulator.model.grid.shape=[{args.grid},{args.grid}]"
    n_windows = args.train_windows + 32 + args.test_windows
    out = Path(tempfile.mkdtemp(prefix="bench_depth."))
    learn = f"network.learn_parameters={str(args.learn_kappa).lower()}"
    with initialize_config_module("assim.configs", version_base=None):
        cfg = compose("train", overrides=[shape, learn])
    interval = 5

    def setups(noise):
        path = out / f"noise{noise:g}.nc"
        app(
            "data",
            out,
            "simulator=advection_diffusion2d",
            shape,
            f"twin.noise_std={noise}",
            "twin.truth.missing_term.kind=none",
            f"twin.observation_interval={interval}",
            f"twin.window_length={args.window}",
            f"twin.n_times={n_windows * args.window}",
            f"twin.splits=[{args.train_windows / n_windows},{32 / n_windows},"
            f"{args.test_windows / n_windows}]",
            f"output={path}",
        )
        with xr.open_dataset(path) as ds:
            groups = split_windows(ds.load(), args.window, jnp.float64)
        data, validation, test = (
            windows_batch(groups[k], (args.grid, args.grid)) for k in (0, 1, 2)
        )
        scale = data.observed_std()

        def build(K):
            layered = OmegaConf.merge(cfg, {"network": {"net": {"n_layers": K}}})
            net, problem, _ = build_network(
                layered, n_times=args.window, interval=interval, scale=scale, seed=0
            )  # without --learn-kappa: the prior's constant kappa (a scalar)
            return net, problem

        def make_net(K, **options):
            if options:
                raise ValueError("the 2D study runs no ablation")
            net, problem = build(K)
            first = select(data.obs, 0)
            return net.with_stable_steps(problem, first, data.background[0])

        _, problem = build(1)
        return data, validation, test, problem, make_net

    return setups


def depth_study(setups, args, noises):
    results, reference = {}, {}  # noise -> K -> history; noise -> 4D-Var's
    for noise in noises:
        data, validation, test, problem, make_net = setups(noise)
        score = scorer(problem, test)
        reference[noise] = score(args.reference()) if args.reference else None
        if reference[noise] is not None:
            print(f"  noise {noise:g}: 4D-Var {reference[noise][0]:.3f}", flush=True)
        results[noise] = {}
        for K in args.layers:
            net = make_net(K)
            history, wall = fit_scored(net, problem, data, validation, score, args)
            results[noise][K] = history
            step, val, rmse, err = history[-1] if history else (0, np.nan, np.inf, 0)
            print(
                f"  noise {noise:g} K {K:2d}: final test RMSE {rmse:.3f} ± {err:.3f} "
                f"(validation masking {val:.4g}) trained in {wall:.0f} s",
                flush=True,
            )
    return results, reference


def depth_tables(results, reference, args, title):
    header = ["noise std", *[f"K = {K}" for K in args.layers]]
    if args.reference:
        header.append(args.reference_name)
    rows = []
    for noise, by_k in results.items():
        cells = []
        for K in args.layers:
            history = by_k[K]
            _, _, rmse, err = history[-1] if history else (0, 0, np.inf, np.nan)
            cells.append(f"{rmse:.3f} ± {err:.3f}")
        if args.reference:
            cells.append("{:.3f} ± {:.3f}".format(*reference[noise]))
        rows.append([f"{noise:g}", *cells])
    print_table(
        f"{title}: test RMSE of masking-trained UnrolledVar after {args.steps} "
        "steps (± standard error over test windows)",
        header,
        rows,
    )
    header = [
        "noise std",
        "best test RMSE (K, step)",
        "early stopping pick (K, step)",
        "its test RMSE",
        "within 1 SE",
        "last step, K by validation",
        "its test RMSE",
    ]
    rows = []
    for noise, by_k in results.items():
        points = [(K, *h) for K, history in by_k.items() for h in history]
        points = [p for p in points if np.isfinite(p[2]) and np.isfinite(p[3])]
        best = min(points, key=lambda p: p[3])
        picked = min(points, key=lambda p: p[2])
        finals = [(K, *h[-1]) for K, h in by_k.items() if h and np.isfinite(h[-1][1])]
        final_pick = min(finals, key=lambda p: p[2])
        within = picked[3] - best[3] <= best[4]
        rows.append(
            [
                f"{noise:g}",
                f"{best[3]:.3f} ± {best[4]:.3f} ({best[0]}, {best[1]})",
                f"({picked[0]}, {picked[1]})",
                f"{picked[3]:.3f} ± {picked[4]:.3f}",
                "yes" if within else "no",
                f"({final_pick[0]}, {final_pick[1]})",
                f"{final_pick[3]:.3f} ± {final_pick[4]:.3f}",
            ]
        )
    print_table(
        f"{title}: early stopping on the validation masking loss (over every K and "
        f"every validation, each {args.validate_every} steps)",
        header,
        rows,
    )


def plot(results, args, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for noise, by_k in results.items():
        Ks = [K for K in args.layers if by_k[K]]
        rmse = np.array([by_k[K][-1][2] for K in Ks])
        err = np.array([by_k[K][-1][3] for K in Ks])
        ax.errorbar(Ks, rmse / noise, err / noise, marker="o", capsize=3,
                    label=f"noise std {noise:g}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("layers K")
    ax.set_ylabel("test RMSE / observation noise std")
    ax.set_title(f"{title}, masking-trained, {args.steps} steps")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


ABLATIONS = [
    ("full", {}),
    ("- momentum", {"momentum": False}),
    ("- continuation", {"continuation": False}),
    ("- learned prior", {"prior": None, "untied": False}),  # nothing to untie
    ("- untied layers", {"untied": False}),
    ("- warm start", {"warm_start": False}),
    ("- model-error correction", {"correction": None}),
]


def ablation(simulator, args):
    data, validation, test, problem, make_net = setup(
        simulator, args.ablation_noise, args
    )
    score = scorer(problem, test)
    scale = data.observed_std()
    correction = NeuralCorrection(
        problem.simulator.model.grid, width=8, depth=2, kernel=3, rate=0.1,
        scale=scale, key=jax.random.PRNGKey(1),
    )  # fmt: skip
    full = {
        "momentum": True,
        "continuation": True,
        "prior": "proximal",
        "untied": True,
        "warm_start": True,
        "correction": correction,
    }
    rows = []
    for name, change in ABLATIONS:
        options = {**full, **change}
        net = make_net(args.ablation_layers, **options)
        history, wall = fit_scored(net, problem, data, validation, score, args)
        _, val, rmse, err = history[-1] if history else (0, np.nan, np.inf, np.nan)
        best = min(history, key=lambda h: h[1]) if history else (0, 0, np.inf, 0)
        print(f"  {name}: {rmse:.3f} ± {err:.3f} ({wall:.0f} s)", flush=True)
        rows.append(
            [
                name,
                f"{rmse:.3f} ± {err:.3f}",
                f"{val:.4g}",
                f"{best[2]:.3f} ± {best[3]:.3f} (step {best[0]})",
                f"{wall:.0f}",
            ]
        )
    print_table(
        f"Ablation: K = {args.ablation_layers}, noise std {args.ablation_noise:g}, "
        f"masking loss, {args.steps} steps (test RMSE ± standard error)",
        [
            "network",
            "final test RMSE",
            "validation masking",
            "test RMSE at best validation",
            "training s",
        ],
        rows,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.25, 0.5, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--validate-every", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-windows", type=int, default=128)
    parser.add_argument("--test-windows", type=int, default=64)
    parser.add_argument("--ablation-layers", type=int, default=4)
    parser.add_argument("--ablation-noise", type=float, default=1.0)
    parser.add_argument("--skip", choices=["depth", "ablation"], nargs="*", default=[])
    parser.add_argument(
        "--problem",
        choices=["lorenz96", "bundled"],
        default="lorenz96",
        help="bundled: the bundled 2D problem at --grid^2 (no ablation)",
    )
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--window", type=int, default=5, help="bundled: times/window")
    parser.add_argument(
        "--learn-kappa",
        action="store_true",
        help="bundled: the networks learn the diffusivity field (4D-Var estimates it)",
    )
    parser.add_argument("--no-reference", dest="reference", action="store_false")
    parser.add_argument(
        "--plot", type=Path, default=Path(__file__).parents[1] / "docs" / "depth.png"
    )
    add_common_arguments(parser)
    args = parser.parse_args()
    use_common_arguments(args)
    t0 = time.perf_counter()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    if args.problem == "bundled":
        title = f"bundled 2D problem at {args.grid}^2"
        setups = bundled_setups(args)
        args.reference_name = "4D-Var (5 Gauss-Newton{})".format(
            ", joint kappa" if args.learn_kappa else ", prior kappa"
        )
        args.reference = args.reference and (lambda: Variational(incremental(), 5))
        args.skip = ["ablation", *args.skip]
    else:
        title = "Lorenz-96"
        simulator = l96_simulator()
        setups = lambda n: setup(simulator, n, args)  # noqa: E731
        args.reference_name = "4D-Var, converged (L-BFGS)"
        args.reference = args.reference and (lambda: lbfgs(1000))
    if "depth" not in args.skip:
        found = depth_study(setups, args, args.noise)
        depth_tables(*found, args, title)
        plot(found[0], args, args.plot, title)
    if "ablation" not in args.skip:
        ablation(simulator, args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing
    main()
