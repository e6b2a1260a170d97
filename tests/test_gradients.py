"""Adjoint dot-product tests, Taylor tests and implicit-vs-unrolled gradients."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import (
    TIGHT,
    cases,
    observed_orders,
    smooth_state,
    taylor_remainders,
    tree_allclose,
)

import simulators as sim
from simulators import testing

CASES = cases()


def _random_like(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jr.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [jr.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)],
    )


@pytest.mark.parametrize("name,simulator", CASES, ids=[c[0] for c in CASES])
def test_adjoint_dot_product(name, simulator, getkey):
    """<J v, w> = <v, J^T w> for (u0, parameters, dt) -> u_1 and -> u_3.

    One step and a three-step rollout, every model with its schemes, float64.
    """
    dyn, static = eqx.partition(simulator, eqx.is_inexact_array)
    u0 = smooth_state(simulator.model.grid)

    @jax.jit
    def states(u, d):
        return eqx.combine(d, static).rollout(u, 3)[jnp.array([1, 3])]

    for i in range(2):  # the one-step and the three-step state
        found = testing.adjoint_test(
            lambda x, i=i: states(*x)[i], (u0, dyn), key=getkey(), rtol=1e-10
        )
        # Both sides go through Krylov solves converged to 1e-13: 1e-10 has headroom.
        assert found.passed, (i, str(found))


def _rollout_loss(simulator, n_steps=4):
    target = smooth_state(simulator.model.grid, seed=7)
    return lambda u0: jnp.mean((simulator.rollout(u0, n_steps)[1:] - target) ** 2)


HS = 1e-2 * 0.5 ** np.arange(4)


def _assert_taylor(r1, r2):
    # First-order remainder decays like h, the gradient-corrected one like h^2.
    # 0.2 slack absorbs the pre-asymptotic curvature at the largest h.
    assert np.all(np.abs(observed_orders(HS, r1) - 1) < 0.2), r1
    assert np.all(observed_orders(HS, r2) > 1.8), r2


@pytest.mark.parametrize(
    "name", ["burgers2d-dirichlet-be", "ks-imex", "ns-be", "l96-midpoint"]
)
def test_taylor_initial_state(name, getkey):
    simulator = dict(CASES)[name]
    u0 = smooth_state(simulator.model.grid)
    loss = jax.jit(_rollout_loss(simulator))
    direction = jr.normal(getkey(), u0.shape, u0.dtype)
    _assert_taylor(*taylor_remainders(loss, u0, direction, HS))


@pytest.mark.parametrize(
    "name,field",
    [
        ("burgers1d-periodic-cn", "nu"),
        ("l96-midpoint", "forcing"),
        ("ns-be", "nu"),
        ("ns-imex", "amplitude"),
    ],
)
def test_taylor_scalar_parameter(name, field):
    simulator = dict(CASES)[name]
    u0 = smooth_state(simulator.model.grid)

    @jax.jit
    def loss(value):
        model = eqx.tree_at(lambda m: getattr(m, field), simulator.model, value)
        return _rollout_loss(eqx.tree_at(lambda s: s.model, simulator, model))(u0)

    x = getattr(simulator.model, field)
    _assert_taylor(*taylor_remainders(loss, x, jnp.ones_like(x) * x, HS))


@pytest.mark.parametrize(
    "name", ["burgers1d-periodic-cn", "ad2d-periodic-be", "l96-midpoint"]
)
def test_second_derivatives_through_newton_krylov(name, getkey):
    """Hessian-vector products of a rollout loss in `(u0, parameters)` through the
    Newton-Krylov stages, reverse over reverse and reverse over forward, against
    central differences of the gradient (float64). Forward over reverse is refused
    by JAX (the stage's reverse rule is a `custom_vjp`)."""
    simulator = dict(CASES)[name]
    dyn, static = eqx.partition(simulator, eqx.is_inexact_array)
    x = (smooth_state(simulator.model.grid), dyn)

    def loss(x):
        u0, d = x
        return _rollout_loss(eqx.combine(d, static), n_steps=3)(u0)

    v, w = _random_like(x, getkey()), _random_like(x, getkey())

    def dot(a, b):
        pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        return sum(jnp.vdot(p, q) for p, q in pairs)

    grad = jax.jit(jax.grad(loss))
    rev_rev = jax.jit(jax.grad(lambda x: dot(jax.grad(loss)(x), v)))(x)
    rev_fwd = jax.jit(jax.grad(lambda x: jax.jvp(loss, (x,), (v,))[1]))(x)
    eps = 1e-5

    def shifted(sign):
        return grad(jax.tree.map(lambda a, b: a + sign * eps * b, x, v))

    fd = dot(jax.tree.map(lambda a, b: (a - b) / (2 * eps), shifted(1), shifted(-1)), w)
    # Central differences: O(eps^2) truncation, O(1e-16 / eps) round-off.
    np.testing.assert_allclose(dot(rev_rev, w), fd, rtol=1e-6)
    np.testing.assert_allclose(dot(rev_fwd, w), fd, rtol=1e-6)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(jax.grad(loss), (x,), (v,))


@pytest.mark.parametrize(
    "name", ["ad1d-dirichlet-cn", "ad2d-periodic-be", "ad2d-periodic-imex"]
)
def test_taylor_kappa_field(name, getkey):
    simulator = dict(CASES)[name]
    u0 = smooth_state(simulator.model.grid)

    @jax.jit
    def loss(log_kappa):
        s = eqx.tree_at(lambda s: s.model.kappa, simulator, jnp.exp(log_kappa))
        return _rollout_loss(s)(u0)

    log_kappa = jnp.log(simulator.model.kappa)
    direction = jr.normal(getkey(), log_kappa.shape, log_kappa.dtype)
    _assert_taylor(*taylor_remainders(loss, log_kappa, direction, HS))


@pytest.mark.parametrize(
    "name", ["ad1d-dirichlet-cn", "burgers2d-dirichlet-be", "ns-be", "l96-midpoint"]
)
def test_implicit_gradient_matches_unrolled(name):
    """The implicit-function-theorem gradient equals differentiating through Newton."""
    simulator = dict(CASES)[name]
    unrolled_solver = dataclasses.replace(TIGHT, adjoint="unrolled")
    unrolled = eqx.tree_at(lambda s: s.scheme.solver, simulator, unrolled_solver)
    u0 = smooth_state(simulator.model.grid)

    def gradient(s):
        dyn, static = eqx.partition(s, eqx.is_inexact_array)

        def loss(u, d):
            return _rollout_loss(eqx.combine(d, static), n_steps=3)(u)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(u0, dyn)

    g_implicit, g_unrolled = gradient(simulator), gradient(unrolled)
    assert tree_allclose(g_implicit, g_unrolled, rtol=1e-8, atol=1e-12)
    # And the unrolled path really is a different computation: it differentiates
    # the Newton loop with a checkpointed adjoint instead of one transpose solve.
    assert unrolled.scheme.solver.adjoint == "unrolled"


def test_gradient_matches_finite_differences():
    """An independent check of the kappa-field gradient against central differences."""
    from helpers import finite_difference

    simulator = dict(CASES)["ad1d-dirichlet-cn"]
    u0 = smooth_state(simulator.model.grid)

    def loss(log_kappa):
        s = eqx.tree_at(lambda s: s.model.kappa, simulator, jnp.exp(log_kappa))
        return _rollout_loss(s)(u0)

    log_kappa = jnp.log(simulator.model.kappa)
    direction = jnp.cos(jnp.arange(log_kappa.size) * 0.7)
    fd = finite_difference(jax.jit(loss), log_kappa, direction)
    ad = jnp.vdot(jax.jit(jax.grad(loss))(log_kappa), direction)
    # Central differences at eps ~ 1.5e-8 carry ~1e-8 relative error.
    assert abs(fd - ad) / abs(ad) < 1e-6


def test_rollout_checkpointing_does_not_change_gradient():
    simulator = dict(CASES)["burgers1d-periodic-cn"]
    u0 = smooth_state(simulator.model.grid)
    checkpointed = dataclasses.replace(simulator, checkpoint=True)
    g1 = jax.grad(_rollout_loss(simulator))(u0)
    g2 = jax.grad(_rollout_loss(checkpointed))(u0)
    assert tree_allclose(g1, g2, rtol=1e-12)
    assert isinstance(simulator.scheme, sim.ThetaMethod)


def _navier_stokes(n=16, **options):
    model = sim.NavierStokes2D(n=n, nu=1e-3, alpha=0.1, amplitude=1.0, wavenumber=2)
    return sim.Simulator(model, sim.IMEXRungeKutta("ars222"), 0.05, **options)


@pytest.mark.parametrize("every", [1, 4])
def test_binomial_checkpoints_give_the_same_rollout_and_gradient(every):
    plain = _navier_stokes()
    binomial = _navier_stokes(checkpoints=3)
    u0 = 3.0 * smooth_state(plain.model.grid, seed=2)

    def loss(simulator):
        return lambda u: jnp.sum(jnp.sin(simulator.rollout(u, 24, every=every)))

    assert plain.rollout(u0, 24, every=every).shape == (24 // every + 1, 16, 16)
    assert tree_allclose(
        plain.rollout(u0, 24, every=every), plain.rollout(u0, 24)[::every]
    )
    assert tree_allclose(
        binomial.rollout(u0, 24, every=every), plain.rollout(u0, 24, every=every)
    )
    assert tree_allclose(
        jax.grad(loss(binomial))(u0), jax.grad(loss(plain))(u0), rtol=1e-11
    )


def _gradient_memory(simulator, u0, n_steps) -> int:
    """Bytes of XLA temporaries of the compiled gradient of an n-step rollout that
    keeps its final state only."""

    def loss(u):
        return jnp.sum(simulator.rollout(u, n_steps, every=n_steps)[-1] ** 2)

    grad = jax.jit(jax.grad(loss))
    return grad.lower(u0).compile().memory_analysis().temp_size_in_bytes


def test_binomial_checkpoints_keep_gradient_memory_flat_in_steps():
    plain, binomial = _navier_stokes(32), _navier_stokes(32, checkpoints=4)
    u0 = smooth_state(plain.model.grid)
    plain_mem = [_gradient_memory(plain, u0, n) for n in (16, 64)]
    binomial_mem = [_gradient_memory(binomial, u0, n) for n in (16, 64)]
    assert plain_mem[1] > 3.0 * plain_mem[0]  # stores every step's internals
    assert binomial_mem[1] < 1.1 * binomial_mem[0]  # 4 states, whatever the steps
    assert binomial_mem[1] < 0.2 * plain_mem[1]


def test_rollout_arguments_are_checked():
    simulator = _navier_stokes(8)
    u0 = jnp.zeros((8, 8))
    with pytest.raises(ValueError, match="every must be a positive divisor"):
        simulator.rollout(u0, 10, every=3)
    with pytest.raises(ValueError, match="not available with binomial checkpoints"):
        _navier_stokes(8, checkpoints=2).rollout(u0, 4, with_info=True)
    with pytest.raises(ValueError, match="checkpoints must be None or >= 1"):
        _navier_stokes(8, checkpoints=0)


def _burgers_2d(solver, n=16):
    grid = sim.Grid((n, n), (1.0, 1.0))
    return sim.Simulator(
        sim.Burgers(grid, 2e-3), sim.backward_euler(solver), 0.5 * grid.spacing[0]
    )


def test_krylov_counter_tallies_forward_tangent_and_transpose_solves():
    """One forward Krylov solve per Newton step, one tangent solve per stage under
    `jvp`, one transpose solve per stage under `grad`; GMRES(5) iterations in whole
    restart cycles."""
    counter = sim.KrylovCounter()
    simulator = _burgers_2d(sim.NewtonKrylov(counter=counter))
    u0 = smooth_state(simulator.model.grid)
    _, info = simulator.rollout(u0, 4, with_info=True)
    forward = counter.totals()["forward"]
    assert forward["solves"] == int(jnp.sum(info["newton_steps"])) > 4
    assert forward["iterations"] % 5 == 0 and forward["iterations"] > 0
    counter.reset()
    jax.jvp(lambda u: simulator.rollout(u, 4)[-1], (u0,), (u0,))
    assert counter.totals()["tangent"]["solves"] == 4
    assert "transpose" not in counter.totals()
    counter.reset()
    jax.grad(lambda u: jnp.sum(simulator.rollout(u, 4)[-1] ** 2))(u0)
    totals = counter.totals()
    assert totals["transpose"]["solves"] == 4 and "tangent" not in totals
    assert counter.iterations_per_solve()["transpose"] >= 5


def test_default_adjoint_tolerance_keeps_the_adjoint_exact_enough(getkey):
    """The default derivative solves (as tight as the forward Newton, float64): the
    adjoint dot-product test holds to 1e-10, and the gradient matches the one from
    solves converged to 1e-13 to 1e-8."""
    simulator = _burgers_2d(sim.NewtonKrylov())
    u0 = smooth_state(simulator.model.grid)
    found = testing.adjoint_test(
        lambda u: simulator.rollout(u, 3)[-1], u0, key=getkey(), rtol=1e-10
    )
    assert found.passed, str(found)
    loss = _rollout_loss(simulator)
    tight = _rollout_loss(
        dataclasses.replace(simulator, scheme=sim.backward_euler(TIGHT))
    )
    assert tree_allclose(jax.grad(loss)(u0), jax.grad(tight)(u0), rtol=1e-8)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_bicgstab_stages_match_gmres(dtype):
    """`NewtonKrylov(krylov="bicgstab")`: the same rollout and implicit gradient as
    GMRES, to the solves' tolerance, for a float64 and a float32 state (x64 on,
    as it must be: the next test), with its own iteration counts."""
    found = {}
    for kind in ("gmres", "bicgstab"):
        counter = sim.KrylovCounter()
        simulator = _burgers_2d(sim.NewtonKrylov(krylov=kind, counter=counter))
        u0 = smooth_state(simulator.model.grid).astype(dtype)
        found[kind] = jax.value_and_grad(_rollout_loss(simulator))(u0)
        assert set(counter.totals()) == {"forward", "transpose"}
    (v0, g0), (v1, g1) = found["gmres"], found["bicgstab"]
    tol = 1e-8 if dtype == jnp.float64 else 1e-4
    np.testing.assert_allclose(v1, v0, rtol=tol)
    assert float(jnp.max(jnp.abs(g1 - g0)) / jnp.max(jnp.abs(g0))) < tol


def test_bicgstab_without_x64_is_refused():
    """Without `jax_enable_x64` lineax's BiCGStab reads a negative `rho`, `alpha` or
    `omega` as a breakdown (a float32 main-job window failed on it): refused with a
    message that names the switch and the alternative."""
    with jax.enable_x64(False):  # the model's constants in float32 too
        simulator = _burgers_2d(sim.NewtonKrylov(krylov="bicgstab"))
        u0 = smooth_state(simulator.model.grid).astype(jnp.float32)
        with pytest.raises(ValueError, match="jax_enable_x64.*krylov='gmres'"):
            simulator.rollout(u0, 1)
