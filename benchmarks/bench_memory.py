"""How does training memory grow with the number of layers / inner iterations K:
unrolled backpropagation storing every layer, the binomially checkpointed layer
loop, and the implicit (bilevel) hypergradient?

Peak training memory is XLA's compiled temporary buffers of the gradient of a loss
of the analysis (`memory_analysis()`), on a 64 x 64 advection-diffusion window (5
observation times x 5 IMEX steps, the diffusivity learned).

`python benchmarks/bench_memory.py` (about 2 minutes on 2 CPU cores).
"""

import argparse

import _common  # noqa: F401  (float64)
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _common import print_table

import simulators as sim
from assim import (
    BilevelVar,
    DiffusionCovariance,
    ObservationSet,
    UnrolledVar,
    WindowProblem,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--memory-layers", type=int, nargs="+", default=[2, 4, 8, 16, 32]
    )
    args = parser.parse_args()
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

    problem = WindowProblem(
        simulator,
        B,
        interval,
        set_parameters=set_kappa,
        parameter_background=jnp.asarray(0.0),
        parameter_std=1.0,
    )

    def temp_mib(net):
        params, static = eqx.partition(net, net.trainable())

        def loss(p):
            n = eqx.combine(p, static)
            trajectory = n.trajectory(problem, obs, background)
            return jnp.mean((trajectory - obs.truth) ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes / 2**20

    state_mib = grid.shape[0] * grid.shape[1] * 8 / 2**20
    rows = []
    for K in args.memory_layers:
        common = dict(theta=jnp.asarray(0.0), key=jax.random.PRNGKey(0))
        stored = temp_mib(UnrolledVar(grid, K, **common))
        checkpointed = temp_mib(UnrolledVar(grid, K, checkpoints=2, **common))
        implicit = temp_mib(BilevelVar(theta=jnp.asarray(0.0), max_steps=K))
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


if __name__ == "__main__":
    main()
