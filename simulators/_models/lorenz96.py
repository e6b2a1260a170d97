import jax.numpy as jnp
from jaxtyping import Array, Float

from .._grid import Grid
from .._model import AbstractModel


class Lorenz96(AbstractModel):
    """Lorenz-96 (Lorenz 1996, "Predictability: a problem partly solved"):

    `du_i/dt = (u_{i+1} - u_{i-2}) u_{i-1} - u_i + F`, cyclic in `i`.

    `L u = -u` (the damping, inverted exactly), `N` the advection and forcing.

    **Arguments:**

    - `n`: number of variables (40 in the standard setup).
    - `forcing`: `F` (8 gives chaos), a differentiable scalar.
    """

    grid: Grid
    forcing: Float[Array, ""]

    def __init__(self, n: int = 40, forcing: float | Array = 8.0):
        if n < 4:
            raise ValueError(f"Lorenz96 needs at least 4 variables, got {n}")
        self.grid = Grid((n,), (float(n),))
        self.forcing = jnp.asarray(forcing)

    def linear(self, u):
        return -u

    def nonlinear(self, u):
        return (jnp.roll(u, -1) - jnp.roll(u, 2)) * jnp.roll(u, 1) + self.forcing

    def linear_inverse(self, rhs, eta):
        return rhs / (1 + eta)

    def preconditioner(self, rhs, eta):
        return self.linear_inverse(rhs, eta)
