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
    `(A sin(k_f y), 0)`). Pseudo-spectral, the advection in Basdevant's form with
    2/3-rule dealiasing of the vorticity and of the products; `L = nu Laplacian
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

    def _multipliers(self, dtype, dealiased: bool = False):
        """Spectral constants (NumPy, in `dtype`'s precision): `(u, v)` from `w_hat`
        (`i k_y / |k|^2`, `-i k_x / |k|^2`, zero mean; times the 2/3-rule mask `M`
        if `dealiased`) and the dealiased derivatives of the Basdevant form,
        `(k_y^2 - k_x^2) M` and `-k_x k_y M`."""
        ky, kx = self.grid.numpy_wavenumbers()
        k2 = kx**2 + ky**2
        inverse = np.where(k2 > 0, 1.0 / np.where(k2 > 0, k2, 1.0), 0.0)
        mask = self.grid.numpy_dealias_mask()
        inverse = inverse * mask if dealiased else inverse
        complex_, real = jnp.dtype(dtype), jnp.finfo(dtype).dtype
        return (
            (1j * ky * inverse).astype(complex_),
            (-1j * kx * inverse).astype(complex_),
            ((ky**2 - kx**2) * mask).astype(real),
            (-kx * ky * mask).astype(real),
        )

    def _velocity(self, w_hat):
        to_u, to_v, _, _ = self._multipliers(w_hat.dtype)
        return self.grid.ifft(to_u * w_hat), self.grid.ifft(to_v * w_hat)

    def nonlinear_spectral(self, w_hat):
        # 2/3-rule dealiasing of both factors and of the product (Orszag 1971): the
        # product of the truncated fields is exact, so the advection is that of the
        # vorticity's resolved modes alone. In Basdevant's (1983) form of `u . grad
        # w` (= div(u w), the flow being divergence-free), `(d_xx - d_yy)(u v) +
        # d_xy(v^2 - u^2)`: four transforms (two inverse, two forward) instead of
        # the advective form's five, and two stored fields per evaluation for the
        # adjoint instead of four; the same values to rounding (tested).
        to_u, to_v, d_uv, d_vv_uu = self._multipliers(w_hat.dtype, dealiased=True)
        u, v = self.grid.ifft(to_u * w_hat), self.grid.ifft(to_v * w_hat)
        advection = d_uv * self.grid.fft(u * v) + d_vv_uu * self.grid.fft(v * v - u * u)
        forcing_hat = np.fft.rfft2(self._forcing_shape()).astype(w_hat.dtype)
        return self.amplitude.astype(w_hat.real.dtype) * forcing_hat - advection
