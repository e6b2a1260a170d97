"""Can a physical parameter be learned from observations alone: Lorenz-96's F from
sparse noisy observations, by unrolled and bilevel training?

The published setting for learning without ground truth: Lorenz-96, noise std 1,
75% of the variables hidden at random at each time. F is learned from observations
only, starting from F = 7 (true 8): with the masking loss by the unrolled network
(`assim.UnrolledVar`) and by bilevel learning (`assim.BilevelVar`: converged 4D-Var,
implicit hypergradient), and by bilevel learning with the evidence loss (the
observations' marginal likelihood; the B scale learned too). The analysis RMSE
beside optimal interpolation and 4D-Var on the same test data.

`python benchmarks/bench_forcing.py` (about 40 minutes on 2 CPU cores).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
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
    oi_method,
    print_table,
    use_common_arguments,
)

from assim import BilevelVar, SpectralCovariance, WeightedLoss, WindowProblem


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--test-windows", type=int, default=64)
    parser.add_argument("--forcing-windows", type=int, default=512)
    parser.add_argument("--forcing-steps", type=int, default=400)
    parser.add_argument("--forcing-batch", type=int, default=16)
    parser.add_argument("--forcing-bilevel-steps", type=int, default=100)
    parser.add_argument("--forcing-bilevel-batch", type=int, default=8)
    parser.add_argument("--forcing-evidence-steps", type=int, default=600)
    parser.add_argument("--forcing-evidence-batch", type=int, default=32)
    add_common_arguments(parser)
    args = parser.parse_args()
    use_common_arguments(args)
    T, K = 8, args.layers
    true = l96_simulator(8.0)
    data, climate = l96_windows(true, args.forcing_windows, T, observed=0.25, seed=11)
    validation, _ = l96_windows(true, 16, T, observed=0.25, seed=12)
    test, _ = l96_windows(true, args.test_windows, T, observed=0.25, seed=13)
    grid = true.model.grid
    B, _ = innovation_scaled_b(grid, climate, data)
    problem = l96_problem(true, B, forcing=True)  # F = 8 exp(theta), learned
    theta0 = jnp.asarray(np.log(7.0 / 8.0))
    scale = data.observed_std()
    rows = []
    net = l96_unrolled(problem, K, data, scale, jax.random.PRNGKey(1), theta=theta0)
    trained = fit(
        net,
        problem,
        data,
        validation,
        steps=args.forcing_steps,
        batch_size=args.forcing_batch,
        loss=WeightedLoss.of(masking=1.0),
        learning_rate=1e-2,
    )
    bilevel = BilevelVar(theta=theta0, scale=scale, max_steps=1000)
    bilevel_trained = fit(
        bilevel,
        problem,
        data,
        validation,
        steps=args.forcing_bilevel_steps,
        batch_size=args.forcing_bilevel_batch,
        loss=WeightedLoss.of(masking=1.0),
        learning_rate=1e-2,
    )
    # Type-II maximum likelihood: F and the B scale by the observations' marginal
    # likelihood (Laplace approximation at the converged 4D-Var solution).
    evidence_trained = fit(
        bilevel,
        problem,
        data,
        validation,
        steps=args.forcing_evidence_steps,
        batch_size=args.forcing_evidence_batch,
        loss=WeightedLoss.of(evidence=1.0),
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
    known = l96_problem(true, B)
    wrong = l96_problem(l96_simulator(7.0), B)
    methods = [
        ("background", background_method(known)),
        (
            "optimal interpolation",
            oi_method(WindowProblem(true, B_clim), float(climate.mean())),
        ),
        ("4D-Var, converged, true F", analyser_method(lbfgs(1000), known)),
        ("4D-Var, converged, F = 7", analyser_method(lbfgs(1000), wrong)),
        (
            f"unrolled, {K} layers, masking, learned F",
            analyser_method(trained, problem),
        ),
        (
            "bilevel 4D-Var, masking, learned F",
            analyser_method(bilevel_trained.with_throw(False), problem),
        ),
        (
            "bilevel 4D-Var, evidence, learned F and B scale",
            analyser_method(evidence_trained.with_throw(False), problem),
        ),
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


if __name__ == "__main__":
    main()
