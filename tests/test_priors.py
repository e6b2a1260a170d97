"""Non-smooth priors and their solvers: exact proximal operators (against
scikit-image's Chambolle TV denoiser), FISTA and ADMM on one convex problem, the
unrolled Gauss-Newton and ADMM layers' gradients, untied prior layers."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.restoration import denoise_tv_chambolle

import simulators as sim
from assim import (
    ADMM,
    DiagonalCovariance,
    DiffusionCovariance,
    L1Prior,
    ObservationSet,
    ProximalGradient,
    TotalVariation,
    UnrolledADMM,
    UnrolledGaussNewton,
    UnrolledVar,
    Variational,
    WindowProblem,
    incremental,
)
from assim._priors import haar, soft_threshold


def _prox_objective(prior, x, step):
    return lambda z: prior(z) + jnp.sum((z - x) ** 2) / (2 * step)


def _assert_minimises(objective, z, seed=0):
    """`z` minimises the convex `objective`: no random small move lowers it (a
    subgradient test that holds for non-smooth objectives)."""
    rng = np.random.default_rng(seed)
    value = objective(z)
    for _ in range(20):
        d = jnp.asarray(rng.normal(size=z.shape))
        for eps in (1e-3, 1e-5):
            assert objective(z + eps * d) >= value - 1e-12, eps


@pytest.mark.parametrize("shape", [(40,), (10, 12)])
def test_tv_prox_matches_scikit_image(shape):
    """Isotropic TV with Neumann differences is scikit-image's Chambolle denoiser
    (`weight` = the prox's `step * weight`); both converged, they agree to 1e-6 (the
    dual iteration's error falls as 1/iterations^2; 2000 reach 1e-7 here)."""
    rng = np.random.default_rng(0)
    f = np.zeros(shape)
    f[tuple(slice(n // 4, 3 * n // 4) for n in shape)] = 1.0
    f += 0.3 * rng.normal(size=shape)
    reference = denoise_tv_chambolle(f, weight=0.2, eps=0.0, max_num_iter=100_000)
    prior = TotalVariation(0.1, iterations=2000)
    out = jax.jit(prior.prox)(jnp.asarray(f), 2.0)
    np.testing.assert_allclose(out, reference, atol=1e-6)


@pytest.mark.parametrize("isotropic", [True, False])
def test_periodic_tv_prox_minimises_its_objective(isotropic):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 8)))
    prior = TotalVariation(0.3, periodic=True, isotropic=isotropic, iterations=3000)
    z = jax.jit(prior.prox)(x, 1.0)
    _assert_minimises(jax.jit(_prox_objective(prior, x, 1.0)), z)
    # A constant is a fixed point (zero total variation); the mean is kept.
    np.testing.assert_allclose(prior.prox(jnp.full((8, 8), 2.0), 1.0), 2.0)
    np.testing.assert_allclose(jnp.mean(z), jnp.mean(x), atol=1e-12)


def test_l1_priors_are_exact():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(8, 16)))
    # The Haar transform is orthonormal and inverted exactly.
    c = haar(x, 3)
    np.testing.assert_allclose(jnp.sum(c**2), jnp.sum(x**2), rtol=1e-13)
    np.testing.assert_allclose(haar(c, 3, inverse=True), x, atol=1e-13)
    # Identity basis: soft thresholding, elementwise.
    expected = np.sign(x) * np.maximum(np.abs(x) - 0.6, 0)
    np.testing.assert_allclose(L1Prior(0.3).prox(x, 2.0), expected, atol=1e-15)
    np.testing.assert_allclose(soft_threshold(x, 0.6), expected, atol=1e-15)
    wavelet = L1Prior(0.2, basis="haar", levels=2)
    z = wavelet.prox(x, 1.5)
    _assert_minimises(_prox_objective(wavelet, x, 1.5), z)
    with pytest.raises(ValueError, match="divisible by 4"):
        wavelet(jnp.zeros((6, 8)))


def _observed(states):
    """Half of the points of `states` (3 times 0.04 apart) observed, noise 0.1."""
    rng = np.random.default_rng(0)
    mask = rng.random(states.shape) < 0.5
    values = np.where(mask, states + 0.1 * rng.normal(size=states.shape), 0.0)
    return ObservationSet(
        jnp.asarray(values),
        jnp.asarray(mask),
        jnp.full(states.shape, 0.1),
        jnp.arange(3) * 0.04,
        states,
    )


def _step_twin(n=24, scheme=None):
    """A linear window (periodic advection-diffusion) of a step in the state, half
    of the points observed at 3 times with noise 0.1."""
    grid = sim.Grid((n,), (1.0,))
    x = np.asarray(grid.coordinates(0))
    simulator = sim.Simulator(
        sim.AdvectionDiffusion(grid, 0.002, [0.5]),
        scheme or sim.crank_nicolson(),
        0.02,
    )
    truth = jnp.asarray(np.where((x > 0.25) & (x < 0.6), 1.0, 0.0))
    window = _observed(simulator.rollout(truth, 4)[::2])
    return simulator, window, truth


def test_admm_and_fista_reach_the_same_minimiser():
    """4D-Var of a linear model with a TV prior is convex: ADMM (Gauss-Newton
    x-updates, the exact TV prox, the penalty balanced) and FISTA converge to one
    minimiser; ADMM with its penalty fixed takes more iterations. (IMEX: the
    model's steps are FFT solves, not Newton-Krylov, for the thousands of
    iterations.)"""
    simulator, window, truth = _step_twin(scheme=sim.IMEXRungeKutta("ars222"))
    problem = WindowProblem(simulator, DiagonalCovariance(1.0), 2)
    background = jnp.zeros_like(truth)
    prior = TotalVariation(0.5, periodic=True, iterations=400)
    fista = ProximalGradient(prior, max_steps=2000, rtol=1e-8)
    a, info_a = eqx.filter_jit(fista)(problem, window, background)
    exact = incremental(rtol=1e-12, atol=1e-12, inner_steps=48, inner_rtol=1e-12)
    admm = ADMM(
        prior,
        penalty=10.0,
        inner=Variational(exact, max_steps=1),
        max_steps=1000,
        rtol=1e-7,
        atol=1e-10,
    )
    b, info_b = eqx.filter_jit(admm)(problem, window, background)
    fixed = eqx.filter_jit(dataclasses.replace(admm, adaptive=False))
    _, info_fixed = fixed(problem, window, background)
    assert int(info_a.outcome) == 0 and int(info_b.outcome) == 0
    # The balanced penalty converges in fewer iterations than the fixed one.
    assert int(info_fixed.outcome) == 0 and info_b.steps < info_fixed.steps
    np.testing.assert_allclose(a.initial_state, b.initial_state, atol=1e-5)
    cost_a, cost_b = info_a.cost[info_a.steps], info_b.cost[info_b.steps]
    np.testing.assert_allclose(cost_a, cost_b, rtol=1e-7)
    # FISTA's objective never rises by more than a restart's worth.
    costs = np.asarray(info_a.cost[: int(info_a.steps) + 1])
    assert costs[-1] < costs[0]


def _burgers_window():
    grid = sim.Grid((16,), (1.0,))
    x = np.asarray(grid.coordinates(0))
    simulator = sim.Simulator(sim.Burgers(grid, 0.02), sim.crank_nicolson(), 0.02)
    truth = jnp.asarray(np.sin(2 * np.pi * x))
    window = _observed(simulator.rollout(truth, 4)[::2])
    problem = WindowProblem(simulator, DiffusionCovariance(grid, 0.5, 0.1), 2)
    return problem, window, 0.7 * truth, truth


@pytest.mark.parametrize("kind", ["gauss_newton", "admm"])
def test_unrolled_layers_gradients_match_central_differences(kind):
    """The learned steps, dampings, penalties and prior weights of the unrolled
    Gauss-Newton and ADMM layers on a nonlinear (Burgers) window: the gradient
    through the layers (lineax CG differentiated implicitly, converged here) is the
    central difference of the loss to 1e-6."""
    problem, window, background, truth = _burgers_window()
    if kind == "gauss_newton":
        net = UnrolledGaussNewton(3, step=0.8, damping=0.1, cg_steps=40, cg_rtol=1e-13)
    else:
        prior = TotalVariation(0.1, periodic=True, iterations=50)
        net = UnrolledADMM(3, prior, penalty=1.0, cg_steps=40, cg_rtol=1e-13)
    params, static = eqx.partition(net, net.trainable())

    def loss(p):
        analysis, _ = eqx.combine(p, static)(problem, window, background)
        return jnp.sum((analysis.initial_state - truth) ** 2)

    grad = eqx.filter_jit(eqx.filter_grad(loss))(params)
    rng = np.random.default_rng(1)
    d = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
    eps = 1e-6
    shifted = lambda s: jax.tree.map(lambda a, b: a + s * eps * b, params, d)  # noqa: E731
    loss = jax.jit(loss)
    fd = (loss(shifted(1)) - loss(shifted(-1))) / (2 * eps)
    analytic = sum(
        jnp.vdot(a, b)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(d), strict=False)
    )
    np.testing.assert_allclose(analytic, fd, rtol=1e-4, atol=1e-9)


def test_untrained_unrolled_gauss_newton_is_incremental_4dvar():
    """One layer, full step, no damping to speak of and converged CG: the minimiser
    of a linear window's 4D-Var, as Variational(incremental) finds it."""
    simulator, window, truth = _step_twin(16)
    grid = simulator.model.grid
    problem = WindowProblem(simulator, DiffusionCovariance(grid, 0.5, 0.1), 2)
    background = jnp.zeros_like(truth)
    net = UnrolledGaussNewton(1, damping=1e-12, cg_steps=64, cg_rtol=1e-13)
    a, _ = net(problem, window, background)
    exact = incremental(rtol=1e-12, atol=1e-12, inner_steps=64, inner_rtol=1e-13)
    b, _ = Variational(exact, max_steps=3)(problem, window, background)
    np.testing.assert_allclose(a.initial_state, b.initial_state, atol=1e-8)


def test_untied_layers_have_a_prior_each(getkey):
    grid = sim.Grid((16,), (1.0,))
    small = dict(prior="proximal", step=0.01, width=4, depth=2)
    tied = UnrolledVar(grid, 3, **small, key=getkey())
    untied = UnrolledVar(grid, 3, **small, untied=True, key=getkey())
    first = jax.tree.leaves(eqx.filter(tied.prior, eqx.is_array))[0]
    stacked = jax.tree.leaves(eqx.filter(untied.prior, eqx.is_array))[0]
    assert stacked.shape == (3, *first.shape)
    # Layer k uses the k-th prior: perturbing the last layer's alone changes the
    # output (an untrained prior's last convolution is zero: identity layers).
    problem, window, background, _ = _burgers_window()
    a, _ = untied(problem, window, background)
    bias = lambda m: m.prior.net.layers[-1].bias  # noqa: E731
    moved = eqx.tree_at(bias, untied, bias(untied).at[2].set(0.1))
    b, _ = moved(problem, window, background)
    assert not np.allclose(a.initial_state, b.initial_state)
    with pytest.raises(ValueError, match="untied"):
        UnrolledVar(grid, 3, untied=True, key=getkey())
