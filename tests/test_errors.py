"""Bad input gets a clear error; solves that do not converge are reported."""

import dataclasses

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import smooth_state

import simulators as sim

GRID = sim.Grid((16,), (1.0,))


def _burgers(scheme=None, dt=0.1, nu=0.01):
    return sim.Simulator(sim.Burgers(GRID, nu), scheme or sim.backward_euler(), dt)


def test_wrong_state_shape():
    with pytest.raises(ValueError, match=r"state has shape \(17,\).*\(16,\)"):
        _burgers().step(jnp.zeros(17))


def test_wrong_state_dtype():
    with pytest.raises(TypeError, match="floating dtype"):
        _burgers().rollout(jnp.zeros(16, dtype=jnp.int32), 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_initial_state(bad):
    u0 = smooth_state(GRID).at[3].set(bad)
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(_burgers().rollout(u0, 2))
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(jax.jit(lambda u: _burgers().step(u))(u0))


@pytest.mark.parametrize("dt", [0.0, -0.1])
def test_non_positive_time_step(dt):
    with pytest.raises(ValueError, match="time step dt must be positive"):
        _burgers(dt=dt)


def test_non_positive_diffusivity():
    kappa = jnp.full(16, 0.1).at[4].set(0.0)
    with pytest.raises(ValueError, match="diffusivity kappa must be positive"):
        sim.AdvectionDiffusion(GRID, kappa, [1.0])
    with pytest.raises(ValueError, match="diffusivity kappa must be positive"):
        sim.AdvectionDiffusion(GRID, -1.0, [1.0])
    with pytest.raises(ValueError, match="viscosity nu must be positive"):
        sim.Burgers(GRID, -0.01)


def test_mismatched_parameter_shapes():
    with pytest.raises(ValueError, match="kappa must be a scalar or have the grid"):
        sim.AdvectionDiffusion(GRID, jnp.ones(15), [1.0])
    with pytest.raises(ValueError, match="velocity must have 1 component"):
        sim.AdvectionDiffusion(GRID, 0.1, [1.0, 2.0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"shape": (4, 4, 4), "length": (1, 1, 1)}, "1 or 2 dimensions"),
        ({"shape": (8,), "length": (-1.0,)}, "length must be positive"),
        ({"shape": (8,), "length": (1.0, 2.0)}, "does not match shape"),
        ({"shape": (8,), "length": (1.0,), "boundary": "neumann"}, "boundary must"),
    ],
)
def test_bad_grid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sim.Grid(**kwargs)


def test_bad_scheme_settings():
    with pytest.raises(ValueError, match="theta must lie in"):
        sim.ThetaMethod(theta=0.2)
    with pytest.raises(ValueError, match="unknown IMEX tableau"):
        sim.IMEXRungeKutta("ars999")
    with pytest.raises(ValueError, match="rtol must be positive"):
        sim.NewtonKrylov(rtol=-1.0)


def test_newton_not_converging_is_reported():
    """A Newton solve capped below what it needs raises instead of returning garbage."""
    scheme = sim.backward_euler(sim.NewtonKrylov(rtol=1e-12, atol=1e-12, max_steps=1))
    u0 = 3 * smooth_state(GRID)
    with pytest.raises(Exception, match="maximum number of steps was reached in the"):
        jax.block_until_ready(_burgers(scheme, dt=0.5).step(u0))


def test_failed_newton_is_nan_without_check_finite():
    """`Simulator(check_finite=False)` (a line search's trial points): a failed
    Newton solve gives NaN instead of raising, and a cost that treats a non-finite
    rollout as infinite has a finite gradient there (no adjoint solve sees NaN);
    a converged rollout is unchanged."""
    capped = sim.NewtonKrylov(rtol=1e-12, atol=1e-12, max_steps=1)
    strict = _burgers(sim.backward_euler(capped), dt=0.5)
    lenient = dataclasses.replace(strict, check_finite=False)
    u0 = 3 * smooth_state(GRID)
    assert jnp.all(jnp.isnan(lenient.rollout(u0, 3)[1:]))

    def cost(u, simulator):
        states = simulator.rollout(u, 3)
        finite = jnp.all(jnp.isfinite(states))
        value = jnp.sum(jnp.where(finite, states, 0.0) ** 2)
        return jnp.where(finite, value, jnp.inf)

    value, gradient = eqx.filter_jit(jax.value_and_grad(cost))(u0, lenient)
    assert value == jnp.inf and jnp.all(gradient == 0)
    good = _burgers(dt=0.1)
    np.testing.assert_array_equal(
        dataclasses.replace(good, check_finite=False).rollout(u0, 3),
        good.rollout(u0, 3),
    )


def test_unchecked_programs_hold_no_raising_check():
    """A linear solve that fails raises; traced inside `solves_without_raising` it
    gives NaN, derivatives included. A `Simulator(check_finite=False)` step or rollout
    through implicit stages (Newton-Krylov) and a kappa field's GMRES solves holds
    no host callback (which would keep its program out of JAX's persistent
    compilation cache); a checked one does."""
    from simulators._linear import nan_tolerant_solve

    matrix = jnp.diag(jnp.arange(1.0, 9.0)) + 0.1
    operator = lx.MatrixLinearOperator(matrix)
    capped = lx.GMRES(rtol=1e-12, atol=1e-12, max_steps=1, restart=1)
    rhs = jnp.ones(8)
    with pytest.raises(Exception, match="maximum number of solver steps"):
        jax.block_until_ready(nan_tolerant_solve(operator, rhs, capped))
    with sim.solves_without_raising():
        x = nan_tolerant_solve(operator, rhs, capped)
        gradient = jax.grad(lambda b: nan_tolerant_solve(operator, b, capped)[0])(rhs)
    assert jnp.all(jnp.isnan(x)) and jnp.all(jnp.isnan(gradient))
    with sim.solves_without_raising():  # a solve that converges is unchanged
        x = nan_tolerant_solve(operator, rhs, lx.LU())
    np.testing.assert_allclose(matrix @ x, rhs, rtol=1e-12)

    grid = sim.Grid((8, 8), (1.0, 1.0))
    kappa = 0.05 * (1.5 + jnp.sin(2 * np.pi * grid.mesh()[0]))
    model = sim.AdvectionDiffusion(grid, kappa, [1.0, 0.5])
    u0 = smooth_state(grid)
    for scheme in (sim.backward_euler(), sim.IMEXRungeKutta("ars222")):
        checked = sim.Simulator(model, scheme, 0.05)
        unchecked = dataclasses.replace(checked, check_finite=False)

        def rollout(s, u):
            return s.rollout(u, 3)

        text = eqx.filter_jit(rollout).lower(unchecked, u0).as_text()
        assert "callback" not in text
        step = eqx.filter_jit(lambda s, u: s.step(u))
        assert "callback" not in step.lower(unchecked, u0).as_text()
        assert "callback" in eqx.filter_jit(rollout).lower(checked, u0).as_text()
        np.testing.assert_allclose(  # two programs: their own rounding
            rollout(unchecked, u0), rollout(checked, u0), rtol=1e-12, atol=1e-14
        )


def test_krylov_not_converging_is_reported():
    scheme = sim.backward_euler(
        sim.NewtonKrylov(krylov_tol=1e-14, krylov_max_steps=2, restart=2)
    )
    kappa = 0.05 * (1.5 + jnp.sin(2 * np.pi * GRID.mesh()[0]))
    simulator = sim.Simulator(sim.AdvectionDiffusion(GRID, kappa, [3.0]), scheme, 0.5)
    with pytest.raises(Exception, match="maximum number of solver steps"):
        jax.block_until_ready(simulator.step(smooth_state(GRID)))


def test_diffrax_scheme_refuses_large_states():
    scheme = sim.DiffraxScheme(diffrax.Kvaerno3(), max_state_size=8)
    with pytest.raises(ValueError, match="dense Jacobians"):
        _burgers(scheme).step(smooth_state(GRID))
