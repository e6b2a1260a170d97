import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._grid import Grid
from .._model import AbstractModel, is_concrete


class Burgers(AbstractModel):
    """Viscous Burgers equation (scalar, 1D or 2D) in conservative form:

    `du/dt + sum_d d/dx_d (u^2 / 2) = nu Laplacian(u)`

    Periodic or homogeneous Dirichlet boundaries (from `grid`). Second-order centred
    finite differences for the flux divergence, the five-point (three-point) Laplacian
    for the viscosity. `L = nu Laplacian` has an exact FFT/DST inverse, which is also
    the Newton-Krylov preconditioner of fully implicit schemes. Units: `nu` in
    length^2/time.

    **Arguments:**

    - `grid`: the `Grid`.
    - `nu`: kinematic viscosity, a positive scalar.
    """

    grid: Grid
    nu: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.01)

    def __check_init__(self):
        if self.nu.ndim:
            raise ValueError(f"nu must be a scalar, got shape {self.nu.shape}")
        if is_concrete(self.nu) and not np.asarray(self.nu) > 0:
            raise ValueError(f"viscosity nu must be positive, got {float(self.nu)}")

    def linear(self, u):
        return self.nu * self.grid.laplacian(u)

    def nonlinear(self, u):
        flux = 0.5 * u**2
        return -sum(self.grid.gradient(flux, axis=a) for a in range(-self.grid.ndim, 0))

    def linear_inverse(self, rhs, eta):
        return self.grid.solve_helmholtz(rhs, eta * self.nu)

    def preconditioner(self, rhs, eta):
        return self.linear_inverse(rhs, eta)
