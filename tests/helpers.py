"""Shared test helpers: tree comparisons, the model/scheme lists, Taylor tests, small
Lorenz-96 twin windows."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import simulators as sim
from simulators import testing

# Tight solver settings for gradient checks in float64: Krylov solves accurate to
# ~1e-13 so that forward (JVP) and reverse (VJP) solves agree to ~1e-12.
TIGHT = sim.NewtonKrylov(rtol=1e-12, atol=1e-12, krylov_tol=1e-13, adjoint_tol=1e-13)


def tree_allclose(x, y, *, rtol=1e-10, atol=1e-12) -> bool:
    """Array leaves of `x` and `y` agree (static fields are not compared)."""
    lx, ly = (
        jax.tree.leaves(eqx.filter(x, eqx.is_array)),
        jax.tree.leaves(eqx.filter(y, eqx.is_array)),
    )
    return len(lx) == len(ly) and all(
        a.shape == b.shape and np.allclose(a, b, rtol=rtol, atol=atol)
        for a, b in zip(lx, ly, strict=True)
    )


def smooth_state(grid: sim.Grid, seed: int = 0, modes: int = 3) -> jax.Array:
    """A smooth random state on `grid` (a few low Fourier / sine modes)."""
    rng = np.random.default_rng(seed)
    out = 0.0
    mesh = grid.mesh()
    for _ in range(modes):
        term = 1.0
        for x, length in zip(mesh, grid.length, strict=True):
            k = rng.integers(1, 3)
            if grid.boundary == "dirichlet":
                term = term * jnp.sin(np.pi * k * x / length)
            else:
                term = term * jnp.sin(2 * np.pi * k * x / length + rng.uniform(0, 6))
        out = out + rng.normal() * term
    return jnp.asarray(out)  # the default float dtype (float64 in the tests)


def cases():
    """(id, simulator) pairs: every model with the schemes it is used with."""
    g1p = sim.Grid((16,), (1.0,))
    g1d = sim.Grid((15,), (1.0,), "dirichlet")
    g2p = sim.Grid((8, 8), (1.0, 1.0))
    g2d = sim.Grid((7, 9), (1.0, 1.2), "dirichlet")
    kappa1 = 0.02 * (1.5 + jnp.sin(2 * np.pi * g1d.mesh()[0]))
    kappa2 = 0.02 * (1.5 + jnp.cos(2 * np.pi * g2p.mesh()[1]))
    be, cn = sim.backward_euler(TIGHT), sim.crank_nicolson(TIGHT)
    mid = sim.ImplicitMidpoint(TIGHT)
    imex = sim.IMEXRungeKutta("ars222")
    return [
        (
            "ad1d-dirichlet-cn",
            sim.Simulator(sim.AdvectionDiffusion(g1d, kappa1, [0.3]), cn, 0.05),
        ),
        (
            "ad1d-dirichlet-imex",
            sim.Simulator(sim.AdvectionDiffusion(g1d, kappa1, [0.3]), imex, 0.05),
        ),
        (
            "ad2d-periodic-be",
            sim.Simulator(sim.AdvectionDiffusion(g2p, kappa2, [0.2, -0.1]), be, 0.05),
        ),
        (
            "ad2d-periodic-imex",
            sim.Simulator(sim.AdvectionDiffusion(g2p, kappa2, [0.2, -0.1]), imex, 0.05),
        ),
        ("burgers1d-periodic-cn", sim.Simulator(sim.Burgers(g1p, 0.02), cn, 0.05)),
        ("burgers2d-dirichlet-be", sim.Simulator(sim.Burgers(g2d, 0.02), be, 0.05)),
        ("burgers2d-periodic-imex", sim.Simulator(sim.Burgers(g2p, 0.02), imex, 0.02)),
        (
            "ks-imex",
            sim.Simulator(
                sim.KuramotoSivashinsky(sim.Grid((32,), (8 * np.pi,))), imex, 0.1
            ),
        ),
        (
            "ks-cn",
            sim.Simulator(
                sim.KuramotoSivashinsky(sim.Grid((32,), (8 * np.pi,))), cn, 0.1
            ),
        ),
        ("l96-midpoint", sim.Simulator(sim.Lorenz96(8), mid, 0.02)),
        ("l96-rk4", sim.Simulator(sim.Lorenz96(8), sim.RK4(), 0.02)),
        ("ns-imex", sim.Simulator(sim.NavierStokes2D(8, nu=0.05), imex, 0.05)),
        ("ns-be", sim.Simulator(sim.NavierStokes2D(8, nu=0.05), be, 0.05)),
    ]


def taylor_remainders(loss, x, direction, hs):
    """First- and second-order Taylor remainders of `loss` at `x` along `direction`
    (`simulators.testing.gradient_taylor_test`, the check users run).

    `r1(h) = |L(x + h d) - L(x)|` decays like h; `r2(h) = |L(x + h d) - L(x) -
    h <grad L, d>|` decays like h^2 when the gradient is right.
    """
    found = testing.gradient_taylor_test(loss, x, direction, steps=hs)
    return found.first_order, found.second_order


def assert_taylor_orders(loss, x, direction):
    """Taylor test at h = 1e-2 / 2^k, k < 4: the first-order remainder decays with
    order 1 (within 0.2) and the gradient-corrected one with order > 1.8."""
    hs = 1e-2 * 0.5 ** np.arange(4)
    r1, r2 = taylor_remainders(loss, x, direction, hs)
    assert np.all(np.abs(observed_orders(hs, r1) - 1) < 0.2), r1
    assert np.all(observed_orders(hs, r2) > 1.8), r2


observed_orders = testing.observed_orders


def finite_difference(fn, x, direction, scale=1.0):
    """Central difference of `fn` along `direction`, eps = sqrt(machine eps) x scale."""
    eps = float(np.sqrt(np.finfo(np.float64).eps)) * scale
    return (fn(x + eps * direction) - fn(x - eps * direction)) / (2 * eps)


def l96_twin_windows(n_windows: int, n_times: int, interval: int, *, spinup: int):
    """`(simulator, B, windows)`: consecutive windows of one Lorenz-96 truth run (40
    variables, RK4, dt 0.01), half of the variables observed at random at each of
    `n_times` times `interval` steps apart with N(0, 1) errors; `B` the truth's
    spectrum scaled by 0.05."""
    from assim import ObservationSet, SpectralCovariance

    l96 = sim.Simulator(sim.Lorenz96(40, 8.0), sim.RK4(), 0.01)
    rng = np.random.default_rng(0)
    u = l96.rollout(jnp.asarray(rng.normal(size=40)), spinup)[-1]
    T = n_times
    truth = np.asarray(l96.rollout(u, n_windows * T * interval)[::interval])
    windows = []
    for start in range(0, n_windows * T, T):
        states = truth[start : start + T]
        mask = rng.random(states.shape) < 0.5
        values = np.where(mask, states + rng.normal(size=states.shape), 0.0)
        windows.append(
            ObservationSet(
                jnp.asarray(values),
                jnp.asarray(mask),
                jnp.ones(states.shape),
                jnp.arange(T) * 1.0,
                jnp.asarray(states),
            )
        )
    B = SpectralCovariance.from_samples(l96.model.grid, truth, 0.05)
    return l96, B, windows


def tiny_l96_net(l96, B, n_times: int, interval: int):
    """`(net, problem)`: a 2-layer unrolled network (momentum, a small proximal CNN)
    and the window problem of the Lorenz-96 twin windows: the shared network of the
    sharding and streaming checks."""
    from assim import UnrolledVar, WindowProblem

    net = UnrolledVar(
        l96.model.grid,
        2,
        n_times=n_times,
        step=0.1,
        scale=3.6,
        momentum=True,
        prior="proximal",
        width=4,
        depth=2,
        key=jax.random.PRNGKey(0),
    )
    return net, WindowProblem(l96, B, interval)


def minimise(
    problem,
    window,
    background,
    *,
    method: str = "lbfgs",
    max_steps: int = 200,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    inner_steps: int = 20,
    inner_rtol: float = 1e-3,
):
    """`(control, info)` of `assim.Variational` with L-BFGS or incremental
    Gauss-Newton, jitted; `info`'s histories cut to the iterations taken."""
    import dataclasses

    import optimistix as optx

    from assim import OUTCOMES, Variational, incremental

    if method == "lbfgs":
        solver = optx.LBFGS(rtol=rtol, atol=atol)
    else:
        solver = incremental(
            rtol=rtol, atol=atol, inner_steps=inner_steps, inner_rtol=inner_rtol
        )
    analyser = Variational(solver, max_steps)
    control, info = eqx.filter_jit(analyser.solve)(problem, window, background)
    steps = int(info.steps)

    @dataclasses.dataclass
    class Summary:
        cost: np.ndarray
        grad_norm: np.ndarray
        steps: int
        result: str

        @property
        def converged(self):
            return self.result == "converged"

    summary = Summary(
        np.asarray(info.cost[: steps + 1]),
        np.asarray(info.grad_norm[: steps + 1]),
        steps,
        OUTCOMES[int(info.outcome)],
    )
    return control, summary


def plain_result(times, states):
    """A `WindowResult` of one converged step with `states` as analysis and
    background and no diagnostics (for writer tests)."""
    from assim._cycle import WindowResult

    return WindowResult(
        times=np.asarray(times),
        analysis=states,
        background=states,
        theta=None,
        steps=1,
        outcome="converged",
        cost=np.ones(2),
        grad_norm=np.ones(2),
        cost_history=np.ones(2),
        grad_norm_history=np.ones(2),
        diagnostics={},
    )
