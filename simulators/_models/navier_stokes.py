import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._grid import Grid
from .._model import AbstractSpectralModel, is_concrete


class NavierStokes2D(AbstractSpectralModel):
    """2D incompressible Navier-Stokes in vorticity form on a periodic square:

    `dw/dt + u . grad w = nu Laplacian(w) - alpha w + f(y)`,
    `u = (d psi/dy, -d psi/dx)`, `Laplacian(psi) = -w`,

    with Kolmogorov forcing `f(y) = -A k_f cos(k_f y)` (the curl of the body force
    `(A sin(k_f y), 0)`). Pseudo-spectral with 2/3-rule dealiasing; `L = nu Laplacian
    - alpha` is diagonal in Fourier space and treated implicitly by IMEX schemes
    (as in jax-cfd and exponax). Units: `nu` in length^2/time, `alpha` in 1/time.

    **Arguments:**

    - `n`: grid points per side (square grid, domain `[0, 2 pi)^2` unless `length`).
    - `nu`: viscosity. `alpha`: linear drag. `amplitude`: forcing amplitude `A`.
    - `wavenumber`: forcing wavenumber `k_f` (static).
    - `length`: side of the square domain.
    """

    grid: Grid
    nu: Float[Array, ""]
    alpha: Float[Array, ""]
    amplitude: Float[Array, ""]
    wavenumber: int = eqx.field(static=True)

    def __init__(
        self,
        n: int = 64,
        nu: float | Array = 1e-3,
        alpha: float | Array = 0.1,
        amplitude: float | Array = 1.0,
        wavenumber: int = 4,
        length: float = 2 * np.pi,
    ):
        self.grid = Grid((n, n), (length, length))
        self.nu = jnp.asarray(nu)
        self.alpha = jnp.asarray(alpha)
        self.amplitude = jnp.asarray(amplitude)
        self.wavenumber = int(wavenumber)

    def __check_init__(self):
        if is_concrete(self.nu) and not np.asarray(self.nu) > 0:
            raise ValueError(f"viscosity nu must be positive, got {float(self.nu)}")
        if is_concrete(self.alpha) and np.asarray(self.alpha) < 0:
            raise ValueError(f"drag alpha must be non-negative, got {self.alpha}")

    def linear_symbol(self):
        ky, kx = self.grid.wavenumbers()
        return -self.nu * (kx**2 + ky**2) - self.alpha

    def _forcing_shape(self) -> np.ndarray:
        n = self.grid.shape[0]
        y = np.arange(n)[:, None] * self.grid.spacing[0] * np.ones((1, n))
        k = 2 * np.pi * self.wavenumber / self.grid.length[0]
        return -k * np.cos(k * y)

    def forcing(self) -> Array:
        """The vorticity forcing `f(y)`."""
        return self.amplitude * self._forcing_shape()

    def velocity(self, w: Array) -> tuple[Array, Array]:
        """`(u, v)` from the vorticity through the stream function."""
        return self._velocity(self.grid.fft(w))

    def _velocity(self, w_hat):
        ky, kx = self.grid.wavenumbers()
        k2 = kx**2 + ky**2
        psi_hat = jnp.where(k2 > 0, w_hat / jnp.where(k2 > 0, k2, 1.0), 0.0)
        return self.grid.ifft(1j * ky * psi_hat), self.grid.ifft(-1j * kx * psi_hat)

    def nonlinear_spectral(self, w_hat):
        ky, kx = self.grid.wavenumbers()
        u, v = self._velocity(w_hat)
        advection = u * self.grid.ifft(1j * kx * w_hat) + v * self.grid.ifft(
            1j * ky * w_hat
        )
        forcing_hat = self.amplitude * np.fft.rfft2(self._forcing_shape())
        return forcing_hat - self.grid.fft(advection) * self.grid.dealias_mask()
