import equinox as eqx
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, Float

from .._grid import Grid
from .._linear import nan_tolerant_solve
from .._model import AbstractModel, is_concrete


class AdvectionDiffusion(AbstractModel):
    """Advection-diffusion with a spatially varying diffusivity field:

    `du/dt = div(kappa(x) grad u) - v . grad u + s(x)`

    in 1D or 2D, periodic or homogeneous Dirichlet boundaries (from `grid`).
    Discretisation: conservative second-order finite volumes for the diffusion (face
    diffusivity = mean of the two cells), second-order centred differences for the
    advection. Units: `kappa` in length^2/time, `velocity` in length/time, `source`
    in state units/time.

    `L` (implicit in IMEX schemes) is the diffusion; `N` the advection and the source.
    With a constant `kappa`, `(I - eta L)^{-1}` is an exact FFT (periodic) or DST
    (Dirichlet) solve; with a field `kappa` it is a tridiagonal solve in 1D Dirichlet
    and otherwise conjugate gradients (the finite-volume diffusion is symmetric
    negative semidefinite, `I - eta L` SPD) preconditioned by the structured solve at
    the mean diffusivity, which also preconditions Newton-Krylov.

    **Arguments:**

    - `grid`: the `Grid`.
    - `kappa`: diffusivity, a positive scalar or a field of the grid's shape; the
      coefficient that assimilation estimates.
    - `velocity`: constant velocity, one component per axis in the grid's axis order
      (`(v_x,)` in 1D, `(v_y, v_x)` in 2D).
    - `source`: optional source term (scalar or field).
    """

    # The diffusion (tested): conjugate gradients. A subclass whose `linear` is not
    # symmetric negative semidefinite sets it to False.
    symmetric_linear = True

    grid: Grid
    kappa: Float[Array, "..."] = eqx.field(converter=jnp.asarray)
    velocity: Float[Array, " ndim"] = eqx.field(converter=jnp.asarray)
    source: Float[Array, "..."] = eqx.field(converter=jnp.asarray, default=0.0)

    def __check_init__(self):
        if self.kappa.ndim and self.kappa.shape != self.grid.shape:
            raise ValueError(
                f"kappa must be a scalar or have the grid's shape {self.grid.shape}, "
                f"got {self.kappa.shape}"
            )
        if self.velocity.shape != (self.grid.ndim,):
            raise ValueError(
                f"velocity must have {self.grid.ndim} component(s), got shape "
                f"{self.velocity.shape}"
            )
        if is_concrete(self.kappa) and not np.all(np.asarray(self.kappa) > 0):
            raise ValueError("diffusivity kappa must be positive everywhere")

    def linear(self, u):
        return self.grid.divergence_flux(self.kappa, u)

    def nonlinear(self, u):
        adv = sum(
            self.velocity[a] * self.grid.gradient(u, axis=a - self.grid.ndim)
            for a in range(self.grid.ndim)
        )
        return self.source - adv

    def _structured_inverse(self, rhs, eta, kappa):
        return self.grid.solve_helmholtz(rhs, eta * kappa)

    def linear_inverse(self, rhs, eta):
        if self.kappa.ndim == 0:
            return self._structured_inverse(rhs, eta, self.kappa)
        if self.grid.ndim == 1 and self.grid.boundary == "dirichlet":
            return self._tridiagonal_inverse(rhs, eta)
        return super().linear_inverse(rhs, eta)

    def _tridiagonal_inverse(self, rhs, eta):
        """1D Dirichlet with a kappa field: `I - eta L` is tridiagonal (lineax's
        Thomas solve, O(N), differentiated through its transpose)."""
        (dx,) = self.grid.spacing
        kp = jnp.pad(self.kappa, 1, mode="edge")
        faces = 0.5 * (kp[:-1] + kp[1:])  # faces[i] between cells i-1 and i
        c = eta / dx**2
        operator = lx.TridiagonalLinearOperator(
            1 + c * (faces[:-1] + faces[1:]), -c * faces[1:-1], -c * faces[1:-1]
        )
        return nan_tolerant_solve(operator, rhs, lx.Tridiagonal())

    def preconditioner(self, rhs, eta):
        return self._structured_inverse(rhs, eta, jnp.mean(self.kappa))
