"""On the bundled dataset, how close do trained networks come to 4D-Var, and how
well do they learn the unknown diffusivity field?

The bundled 2D advection-diffusion dataset (32 x 32, moving tracks, window 10, the
diffusivity field unknown and learned by the networks, which are built as
`assim-train` builds them). Methods: the background (the observation mean),
converged 4D-Var with the prior diffusivity, 4D-Var stopped after K iterations,
converged 4D-Var with the true diffusivity (an oracle), and the unrolled network
trained supervised and with the masking loss (no truth); plus the learned
diffusivity's relative L2 error.

`python benchmarks/bench_bundled.py` (about 20 minutes on 2 CPU cores).
"""

import argparse

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from _common import (
    COLUMNS,
    add_common_arguments,
    analyser_method,
    background_method,
    bundled_setup,
    comparison_rows,
    fit,
    kappa_error,
    lbfgs,
    print_table,
    use_common_arguments,
)

from assim import WeightedLoss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundled-layers", type=int, default=5)
    parser.add_argument("--bundled-steps", type=int, default=60)
    parser.add_argument("--bundled-test-windows", type=int, default=0)
    parser.add_argument("--bundled-learning-rate", type=float, default=1e-2)
    parser.add_argument("--bundled-parameter-learning-rate", type=float, default=None)
    add_common_arguments(parser)
    args = parser.parse_args()
    use_common_arguments(args)
    ds, data, validation, test, net, problem, parameter = bundled_setup(
        args.bundled_layers, args.bundled_test_windows
    )
    K = net.n_layers
    prior = problem.with_prior_parameters()  # the prior diffusivity, a constant
    true = np.asarray(ds["true_kappa"].values)
    oracle = eqx.tree_at(
        lambda p: p.simulator.model.kappa, prior, jnp.asarray(true, jnp.float64)
    )
    kw = dict(
        steps=args.bundled_steps,
        batch_size=min(data.size, 4),
        learning_rate=args.bundled_learning_rate,
        parameter_learning_rate=args.bundled_parameter_learning_rate,
    )
    supervised = fit(
        net, problem, data, validation, loss=WeightedLoss.of(supervised=1.0), **kw
    )
    masked = fit(
        net, problem, data, validation, loss=WeightedLoss.of(masking=1.0), **kw
    )
    methods = [
        ("background (observation mean)", background_method(prior)),
        (
            "4D-Var, converged (L-BFGS), prior kappa",
            analyser_method(lbfgs(1000), prior),
        ),
        (
            f"4D-Var, {K} optimistix L-BFGS steps, prior kappa",
            analyser_method(lbfgs(K), prior),
        ),
        (
            "4D-Var, converged, true kappa (oracle)",
            analyser_method(lbfgs(1000), oracle),
        ),
        (f"unrolled, {K} layers, supervised", analyser_method(supervised, problem)),
        (
            f"unrolled, {K} layers, masking (no truth)",
            analyser_method(masked, problem),
        ),
    ]
    # One pass: these take seconds to minutes per window.
    rows = comparison_rows(methods, test, repeats=1)
    for name, trained in (("supervised", supervised), ("masking", masked)):
        error = kappa_error(parameter, trained.theta, true)
        print(f"  learned kappa ({name}): relative L2 error {error:.3f}")
        rows.append(
            (f"diffusivity field, {name} network", f"rel. L2 {error:.3f}", "", "")
        )
    error = kappa_error(parameter, parameter.zeros(), true)
    rows.append(("diffusivity field, prior", f"rel. L2 {error:.3f}", "", ""))
    print_table(
        "Bundled dataset (2D advection-diffusion, 32 x 32, tracks, window 10)",
        COLUMNS,
        rows,
    )


if __name__ == "__main__":
    main()
