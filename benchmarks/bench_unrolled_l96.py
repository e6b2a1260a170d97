"""Do unrolled networks reach converged 4D-Var's accuracy on Lorenz-96, at a
fraction of its cost per window?

Lorenz-96 (40 variables, F = 8, IMEX ARS222 dt = 0.01), half of the variables
observed at random at each time with error std 1, windows of 5 observation times
0.05 apart; one fixed test set (its own truth run). Methods: the background (a
forecast: the truth 0.1 before the window plus N(0, 1) errors, run forward),
strong-constraint 4D-Var run to convergence (`assim.Variational`, L-BFGS), 4D-Var
stopped after K iterations, and the unrolled network (`assim.UnrolledVar`, K
layers, momentum, proximal CNN prior; and a ConvLSTM-solver network of
`--solver-layers` layers) trained supervised and trained with the masking loss (no
truth). RMSE of the analysed trajectory against the truth over the test windows
(± its standard error over windows), and wall time per window compiled as deployed
(one window per call, and all windows in one vmapped call).

`python benchmarks/bench_unrolled_l96.py` (about 5 minutes on 2 CPU cores with
`--steps 1500`; `--cache DIR` keeps the trained networks).
"""

import argparse
import time

import jax
from _common import (
    COLUMNS,
    add_common_arguments,
    analyser_method,
    background_method,
    comparison_rows,
    fit,
    innovation_scaled_b,
    l96_problem,
    l96_simulator,
    l96_unrolled,
    l96_windows,
    lbfgs,
    print_table,
    use_common_arguments,
)

from assim import WeightedLoss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--solver-layers",
        type=int,
        default=3,
        help="also train a network of this many layers with the ConvLSTM gradient "
        "solver (0: not)",
    )
    parser.add_argument("--train-windows", type=int, default=256)
    parser.add_argument("--test-windows", type=int, default=64)
    add_common_arguments(parser)
    args = parser.parse_args()
    use_common_arguments(args)
    t0 = time.perf_counter()
    T, K = 5, args.layers
    simulator = l96_simulator()
    data, climate = l96_windows(simulator, args.train_windows, T, observed=0.5, seed=1)
    validation, _ = l96_windows(simulator, 16, T, observed=0.5, seed=2)
    test, _ = l96_windows(simulator, args.test_windows, T, observed=0.5, seed=3)
    B, var_b = innovation_scaled_b(simulator.model.grid, climate, data)
    print(f"L96: background error variance from innovations {var_b:.3f}")
    problem = l96_problem(simulator, B)
    scale = data.observed_std()
    net = l96_unrolled(problem, K, data, scale, jax.random.PRNGKey(0))
    common = dict(steps=args.steps, batch_size=16)
    supervised = fit(
        net, problem, data, validation, loss=WeightedLoss.of(supervised=1.0), **common
    )
    masked = fit(
        net, problem, data, validation, loss=WeightedLoss.of(masking=1.0), **common
    )
    methods = [
        ("background", background_method(problem)),
        ("4D-Var, converged (L-BFGS)", analyser_method(lbfgs(1000), problem)),
        (f"4D-Var, {K} optimistix L-BFGS steps", analyser_method(lbfgs(K), problem)),
        (f"unrolled, {K} layers, untrained", analyser_method(net, problem)),
        (f"unrolled, {K} layers, supervised", analyser_method(supervised, problem)),
        (
            f"unrolled, {K} layers, masking (no truth)",
            analyser_method(masked, problem),
        ),
    ]
    if args.solver_layers:
        # The learned gradient solver (4DVarNet-style ConvLSTM update, with the
        # momentum) in place of the proximal CNN: fewer, cheaper layers.
        k = args.solver_layers
        key = jax.random.PRNGKey(0)
        lstm = l96_unrolled(
            problem, k, data, scale, key, gradient_solver=True, prior=None
        )
        for name, loss in (
            ("supervised", "supervised"),
            ("masking (no truth)", "masking"),
        ):
            trained = fit(
                lstm,
                problem,
                data,
                validation,
                loss=WeightedLoss.of(**{loss: 1.0}),
                **common,
            )
            methods.append(
                (
                    f"unrolled, {k} layers, ConvLSTM solver, {name}",
                    analyser_method(trained, problem),
                )
            )
    rows = comparison_rows(methods, test)
    print_table(
        f"Lorenz-96, half observed, noise 1, windows of {T} times "
        f"({args.test_windows} test windows)",
        COLUMNS,
        rows,
    )
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
