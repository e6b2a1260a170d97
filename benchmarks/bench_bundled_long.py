"""Does the diffusivity field a network learns on the bundled dataset keep
improving with longer training, and with which loss?

The masking network of `bench_bundled.py` (or `--losses`, e.g. the cost loss, with
`--refine` Gauss-Newton refinement) trained for longer at a constant learning rate
after warm-up, in chunks: after each chunk, the learned diffusivity's error and the
test windows' analysis RMSE. The chunks resume one training run (a constant
schedule makes it the uninterrupted run); `--checkpoint FILE` keeps it, so that a
stopped run continues. `--kappa-from analysis.nc` starts the diffusivity from
another estimate (e.g. `assim-run`'s joint 4D-Var): does the masking loss keep it?

`python benchmarks/bench_bundled_long.py --losses cost=1 --refine 1 --steps 120
--chunk 10` (about 55 s per step on 2 CPU cores).
"""

import argparse
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import xarray as xr
from _common import bundled_setup, kappa_error, print_table, select

from assim import (
    Analysis,
    Cost,
    Masking,
    Residual,
    Supervised,
    Term,
    TrainSettings,
    WeightedLoss,
    load_checkpoint,
    refine_analysis,
    train,
)
from assim._train import init_state, network, read_header


def loss_weights(text: str) -> dict:
    """`"cost=1,masking=0.5"` -> `{"cost": 1.0, "masking": 0.5}`."""
    pairs = (item.split("=") for item in text.split(","))
    return {name.strip(): float(weight) for name, weight in pairs}


def start_from_kappa(net, parameter, path, true):
    """`net` with its `theta` fitted (least squares in log kappa, Adam) to the
    diffusivity field `kappa` of an `assim-run` analysis file."""
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--test-windows", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--parameter-learning-rate", type=float, default=0.03)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--chunk", type=int, default=20)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument(
        "--losses",
        type=loss_weights,
        default={"masking": 1.0},
        help="the loss weights, e.g. masking=1 or cost=1,masking=1",
    )
    parser.add_argument(
        "--refine",
        type=int,
        default=0,
        help="the cost loss's Gauss-Newton refinement iterations",
    )
    parser.add_argument("--refine-cg", type=int, default=20)
    parser.add_argument(
        "--kappa-from",
        type=Path,
        default=None,
        help="start from the diffusivity of an assim-run analysis.nc",
    )
    args = parser.parse_args()
    ds, data, validation, test, net, problem, parameter = bundled_setup(
        args.layers, args.test_windows
    )
    true = np.asarray(ds["true_kappa"].values)
    if args.kappa_from is not None:
        net = start_from_kappa(net, parameter, args.kappa_from, true)
        net = net.with_stable_steps(problem, select(data.obs, 0), data.background[0])
    steps, chunk, refine = args.steps, args.chunk, args.refine
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = Path(tempfile.mkdtemp()) / "bundled_long.eqx"
    modules = {
        "supervised": Supervised(),
        "masking": Masking(),
        "residual": Residual(),
        "cost": Cost(refine, args.refine_cg),
    }
    loss = WeightedLoss({k: Term(modules[k], w) for k, w in args.losses.items()})

    def settings(n):
        return TrainSettings(
            steps=n,
            batch_size=min(data.size, 4),
            learning_rate=args.learning_rate,
            parameter_learning_rate=args.parameter_learning_rate,
            warmup_steps=5,
            final_fraction=1.0,
            loss=loss,
            validate_every=chunk,
            checkpoint_every=chunk,
        )

    done = 0
    if checkpoint.is_file():
        done = int(read_header(checkpoint)["step"])
        print(f"  resuming from step {done} ({checkpoint})")

    @eqx.filter_jit
    def analysis(net, obs, background):
        return net.trajectory(problem, obs, background)

    @eqx.filter_jit
    def refined(net, obs, background):
        x = net(problem, obs, background)[0].initial_state
        x = refine_analysis(
            net, problem, obs, background, x, steps=refine, cg_steps=args.refine_cg
        )
        model = net.model_problem(problem)
        return model.trajectory(Analysis(x), obs.n_times)

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
                problem,
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
        validation_loss = f"{validated[-1]:.1f}" if validated else ""
        row = [str(n), validation_loss, f"{error:.3f}", f"{rmse:.3f}"]
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
    title = f"Bundled dataset, network trained longer on {args.losses}"
    if refine:
        header.append(f"refined ({refine} x {args.refine_cg} CG) RMSE")
        title += f", cost refined by {refine} Gauss-Newton iterations"
    print_table(f"{title} (constant learning rate)", header, rows)


if __name__ == "__main__":
    main()
