import diffrax
import equinox as eqx
import jax.numpy as jnp

from .._model import corrected_tendency
from .base import AbstractScheme


class DiffraxScheme(AbstractScheme):
    """One step of a diffrax solver (e.g. `Kvaerno5`, `KenCarp4`, `ImplicitEuler`).

    diffrax's implicit Runge-Kutta solvers differentiate each stage's root find with
    a *dense* Jacobian (optimistix `ImplicitAdjoint` with its default linear solver),
    so this scheme is for small states such as Lorenz-96. States larger than
    `max_state_size` are refused; grid models should use `ThetaMethod` or
    `IMEXRungeKutta`, whose solves are matrix-free.

    **Arguments:**

    - `solver`: a diffrax solver. Implicit ones need a root finder with explicit
      tolerances, since a constant step size carries none, e.g.
      `diffrax.Kvaerno5(root_finder=optimistix.Newton(rtol=1e-8, atol=1e-8))`.
    - `order_`: the solver's order (diffrax solvers report it through `order(terms)`).
    - `max_state_size`: the largest state accepted.
    """

    solver: diffrax.AbstractSolver
    order_: int = eqx.field(static=True, default=1)
    max_state_size: int = eqx.field(static=True, default=4096)

    @property
    def order(self) -> int:
        return self.order_

    def step(self, model, u, dt, correction=None):
        if u.size > self.max_state_size:
            raise ValueError(
                f"DiffraxScheme forms dense Jacobians; state size {u.size} exceeds "
                f"max_state_size={self.max_state_size}. Use ThetaMethod or "
                "IMEXRungeKutta for grid models."
            )
        f = corrected_tendency(model, correction)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: f(y)),
            self.solver,
            t0=0.0,
            t1=dt,
            dt0=dt,
            y0=u,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=diffrax.ConstantStepSize(),
            max_steps=1,
        )
        return sol.ys[0], {"newton_steps": jnp.array(0)}
