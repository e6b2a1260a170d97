"""The public gradient checks (`simulators.testing`) pass on shipped models and
catch a user model with a wrong adjoint or a wrong tangent."""

import jax
import jax.numpy as jnp
import numpy as np
from helpers import TIGHT, smooth_state

import simulators as sim
from simulators import testing


class WrongTransposeLorenz96(sim.Lorenz96):
    """Lorenz-96 whose structured solve `(1 + eta)^-1` is written as a linear solve
    with a hand-written transpose that is 5% off: the forward model and its
    tangent are right, its adjoint is not (the bug of a wrong transpose solve)."""

    def linear_inverse(self, rhs, eta):
        return jax.lax.custom_linear_solve(
            lambda x: (1 + eta) * x,
            rhs,
            solve=lambda _, b: b / (1 + eta),
            transpose_solve=lambda _, b: 1.05 * b / (1 + eta),
        )


@jax.custom_jvp
def _advection(u):
    return (jnp.roll(u, -1) - jnp.roll(u, 2)) * jnp.roll(u, 1)


@_advection.defjvp
def _advection_jvp(primals, tangents):
    (u,), (du,) = primals, tangents
    # Wrong: the product rule's second half is missing.
    return _advection(u), (jnp.roll(du, -1) - jnp.roll(du, 2)) * jnp.roll(u, 1)


class WrongTangentLorenz96(sim.Lorenz96):
    """Lorenz-96 whose advection carries a hand-written derivative that drops a
    term: tangent and adjoint agree with each other, both are wrong."""

    def nonlinear(self, u):
        return _advection(u) + self.forcing


def _l96(model):
    return sim.Simulator(model, sim.IMEXRungeKutta("ars222"), 0.01)


def test_checks_pass_on_shipped_models():
    burgers = sim.Simulator(
        sim.Burgers(sim.Grid((16,), (1.0,)), 0.02), sim.backward_euler(TIGHT), 0.05
    )
    found = testing.check_simulator(burgers, smooth_state(burgers.model.grid))
    assert set(found) == {
        "tangent_linear",
        "adjoint",
        "gradient",
        "implicit_vs_unrolled",
    }
    for name, result in found.items():
        assert result.passed, (name, str(result))
    assert found["adjoint"].relative_error < 1e-10
    assert np.all(found["gradient"].orders > 1.9)
    assert found["implicit_vs_unrolled"].relative_error < 1e-7
    l96 = _l96(sim.Lorenz96(8))
    u0 = 8 + jnp.sin(jnp.arange(8.0))
    found = testing.check_simulator(l96, u0)
    assert "implicit_vs_unrolled" not in found  # an IMEX scheme: no Newton solve
    assert found["adjoint"].relative_error < 1e-13  # exact solves: round-off
    assert all(r.passed for r in found.values()), found


def test_checks_catch_a_wrong_adjoint():
    simulator = _l96(WrongTransposeLorenz96(8))
    u0 = 8 + jnp.sin(jnp.arange(8.0))
    found = testing.check_simulator(simulator, u0)
    assert found["tangent_linear"].passed  # the forward model is right
    assert not found["adjoint"].passed
    assert found["adjoint"].relative_error > 1e-3
    assert "FAILED" in str(found["adjoint"])
    assert not found["gradient"].passed  # the gradient comes from the adjoint
    assert np.all(found["gradient"].orders < 1.2)


def test_checks_catch_a_wrong_tangent():
    simulator = _l96(WrongTangentLorenz96(8))
    u0 = 8 + jnp.sin(jnp.arange(8.0))
    found = testing.check_simulator(simulator, u0)
    assert found["adjoint"].passed  # consistent with each other
    assert not found["tangent_linear"].passed
    assert not found["gradient"].passed
