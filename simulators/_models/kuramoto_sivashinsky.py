import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._grid import Grid
from .._model import AbstractSpectralModel


class KuramotoSivashinsky(AbstractSpectralModel):
    """Kuramoto-Sivashinsky equation on a periodic domain:

    `du/dt = -u du/dx - a d^2u/dx^2 - b d^4u/dx^4`

    Pseudo-spectral (Fourier, 2/3-rule dealiasing of the quadratic term). The default
    domain length 32 pi with 128 modes is the data-assimilation literature's setup
    (Kassam & Trefethen, SIAM J. Sci. Comput. 26, 2005), observed every dt = 0.5.
    `L = -d^2/dx^2 - d^4/dx^4` is diagonal in Fourier space (IMEX schemes invert it
    exactly).

    **Arguments:**

    - `grid`: a periodic 1D `Grid`; default `Grid((128,), (32 pi,))`.
    - `anti_diffusion`, `hyper_diffusion`: the coefficients `a` and `b` (1 in the
      standard equation; positive), e.g. unknowns estimated by assimilation.
    """

    grid: Grid = Grid((128,), (32 * np.pi,))
    anti_diffusion: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=1.0)
    hyper_diffusion: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=1.0)

    def __check_init__(self):
        if self.grid.ndim != 1 or self.grid.boundary != "periodic":
            raise ValueError("KuramotoSivashinsky needs a periodic 1D grid")

    def linear_symbol(self):
        (k,) = self.grid.wavenumbers()
        return self.anti_diffusion * k**2 - self.hyper_diffusion * k**4

    def nonlinear_spectral(self, u_hat):
        (k,) = self.grid.wavenumbers()
        u = self.grid.ifft(u_hat)
        return -0.5j * k * self.grid.fft(u**2) * self.grid.dealias_mask()
