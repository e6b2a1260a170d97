import jax.numpy as jnp

from .._model import corrected_tendency
from .base import AbstractScheme


class RK4(AbstractScheme):
    """The classical explicit fourth-order Runge-Kutta method (Kutta 1901)."""

    @property
    def order(self) -> int:
        return 4

    def step(self, model, u, dt, correction=None):
        f = corrected_tendency(model, correction)
        k1 = f(u)
        k2 = f(u + 0.5 * dt * k1)
        k3 = f(u + 0.5 * dt * k2)
        k4 = f(u + dt * k3)
        return u + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4), {"newton_steps": jnp.array(0)}
