import dataclasses

import equinox as eqx
import jax.numpy as jnp

from .._model import corrected_tendency
from .._solve import NewtonKrylov
from .base import AbstractScheme


class ThetaMethod(AbstractScheme):
    """The theta method, fully implicit in the (corrected) tendency `f`:

    `u_{n+1} - theta dt f(u_{n+1}) = u_n + (1 - theta) dt f(u_n)`.

    `theta = 1` is backward Euler (order 1, L-stable), `theta = 1/2` is Crank-Nicolson
    (order 2, A-stable; Crank & Nicolson 1947). The stage equation is solved by a
    matrix-free Newton-Krylov method and differentiated by the implicit function
    theorem (`NewtonKrylov`).

    **Arguments:**

    - `theta`: implicitness in `[1/2, 1]`.
    - `solver`: the `NewtonKrylov` settings.
    """

    theta: float = eqx.field(static=True, default=1.0)
    solver: NewtonKrylov = NewtonKrylov()

    def __check_init__(self):
        if not 0.5 <= self.theta <= 1.0:
            raise ValueError(f"theta must lie in [0.5, 1], got {self.theta}")

    @property
    def order(self) -> int:
        return 2 if self.theta == 0.5 else 1

    @property
    def newton_krylov(self) -> NewtonKrylov:
        return self.solver

    def with_newton_krylov(self, solver: NewtonKrylov):
        return dataclasses.replace(self, solver=solver)

    def step(self, model, u, dt, correction=None):
        rhs = u
        if self.theta < 1:
            f = corrected_tendency(model, correction)
            rhs = u + (1 - self.theta) * dt * f(u)
        u_next, steps = self.solver.solve(model, correction, rhs, self.theta * dt)
        return u_next, {"newton_steps": steps}


def backward_euler(solver: NewtonKrylov | None = None) -> ThetaMethod:
    """Backward (implicit) Euler: `ThetaMethod(theta=1)`."""
    return ThetaMethod(theta=1.0, solver=solver or NewtonKrylov())


def crank_nicolson(solver: NewtonKrylov | None = None) -> ThetaMethod:
    """Crank-Nicolson (trapezoidal rule): `ThetaMethod(theta=1/2)`."""
    return ThetaMethod(theta=0.5, solver=solver or NewtonKrylov())


class ImplicitMidpoint(AbstractScheme):
    """The implicit midpoint rule `u_{n+1} = u_n + dt f((u_n + u_{n+1}) / 2)`.

    Order 2, symplectic, A-stable (Hairer, Lubich & Wanner, *Geometric Numerical
    Integration*, 2006). Written as a backward-Euler half step to the midpoint
    `w - dt/2 f(w) = u_n` followed by the extrapolation `u_{n+1} = 2 w - u_n`.
    """

    solver: NewtonKrylov = NewtonKrylov()

    @property
    def order(self) -> int:
        return 2

    @property
    def newton_krylov(self) -> NewtonKrylov:
        return self.solver

    def with_newton_krylov(self, solver: NewtonKrylov):
        return dataclasses.replace(self, solver=solver)

    def step(self, model, u, dt, correction=None):
        w, steps = self.solver.solve(model, correction, u, 0.5 * jnp.asarray(dt))
        return 2 * w - u, {"newton_steps": steps}
