"""Does a learned model-error correction inside the implicit step improve the
forecast when the model lacks a term of the truth?

The truth is Lorenz-96 plus `-0.03 u^3`; the model is Lorenz-96. Unrolled networks
(`assim.UnrolledVar`, K layers) are trained with the masking loss with and without
a learned correction (`assim.NeuralCorrection`, a CNN added to the tendency inside
the IMEX step). Forecast RMSE at the end of the window, and one window length
beyond it.

`python benchmarks/bench_model_error.py` (about 5 minutes on 2 CPU cores).
"""

import argparse

import jax
import numpy as np
from _common import (
    add_common_arguments,
    evaluate,
    fit,
    innovation_scaled_b,
    l96_problem,
    l96_simulator,
    l96_unrolled,
    l96_windows,
    print_table,
    select,
    use_common_arguments,
)

from assim import Analysis, NeuralCorrection, WeightedLoss
from assim._twin import MissingTerm


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--train-windows", type=int, default=256)
    parser.add_argument("--test-windows", type=int, default=64)
    parser.add_argument("--model-error-steps", type=int, default=300)
    add_common_arguments(parser)
    args = parser.parse_args()
    use_common_arguments(args)
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
    problem = l96_problem(l96_simulator(8.0), B)
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
    for name, learned in (
        ("without correction", None),
        ("with learned correction", correction),
    ):
        net = l96_unrolled(
            problem, K, data_window, scale, jax.random.PRNGKey(2), correction=learned
        )
        nets[name] = fit(
            net,
            problem,
            data_window,
            validation,
            steps=args.model_error_steps,
            batch_size=16,
            loss=WeightedLoss.of(masking=1.0),
        )
    truth = np.asarray(test.obs.truth)
    rows, errors = [], []
    for name, net in nets.items():

        def forecast(obs, background, net=net):
            window = jax.tree.map(lambda a: a[:T], obs)
            analysis, _ = net(problem, window, background)
            model = net.model_problem(problem)
            return model.trajectory(Analysis(analysis.initial_state), T + n_forecast)

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


if __name__ == "__main__":
    main()
