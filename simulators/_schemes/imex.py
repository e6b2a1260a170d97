from typing import Literal

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._model import AbstractSpectralModel
from .base import AbstractScheme

_G = 1 - 1 / np.sqrt(2)
_D = 1 - 1 / (2 * _G)

# (explicit A, explicit b, implicit A, implicit b, order). Ascher, Ruuth & Spiteri,
# "Implicit-explicit Runge-Kutta methods for time-dependent partial differential
# equations", Appl. Numer. Math. 25 (1997): forward-backward Euler (1,1,1), the
# L-stable ARS(2,2,2) and ARS(4,4,3).
_TABLEAUX = {
    "euler": (
        [[0, 0], [1, 0]],
        [1, 0],
        [[0, 0], [0, 1]],
        [0, 1],
        1,
    ),
    "ars222": (
        [[0, 0, 0], [_G, 0, 0], [_D, 1 - _D, 0]],
        [_D, 1 - _D, 0],
        [[0, 0, 0], [0, _G, 0], [0, 1 - _G, _G]],
        [0, 1 - _G, _G],
        2,
    ),
    "ars443": (
        [
            [0, 0, 0, 0, 0],
            [1 / 2, 0, 0, 0, 0],
            [11 / 18, 1 / 18, 0, 0, 0],
            [5 / 6, -5 / 6, 1 / 2, 0, 0],
            [1 / 4, 7 / 4, 3 / 4, -7 / 4, 0],
        ],
        [1 / 4, 7 / 4, 3 / 4, -7 / 4, 0],
        [
            [0, 0, 0, 0, 0],
            [0, 1 / 2, 0, 0, 0],
            [0, 1 / 6, 1 / 2, 0, 0],
            [0, -1 / 2, 1 / 2, 1 / 2, 0],
            [0, 3 / 2, -3 / 2, 1 / 2, 1 / 2],
        ],
        [0, 3 / 2, -3 / 2, 1 / 2, 1 / 2],
        3,
    ),
}


class IMEXRungeKutta(AbstractScheme):
    """Implicit-explicit Runge-Kutta: stiff linear part `L` implicit, `N` explicit.

    Stage `i`: `Y_i = (I - dt a_ii L)^{-1} [u_n + dt sum_{j<i} (ahat_ij N(Y_j)
    + a_ij L Y_j)]`, then `u_{n+1} = u_n + dt sum_j (bhat_j N(Y_j) + b_j L Y_j)`.
    Each implicit stage is the model's structured `linear_inverse` (FFT/DST
    diagonalisation where the operator allows), whose adjoint is its transpose. For
    spectral models (`AbstractSpectralModel`) the stages run on the
    Fourier coefficients, where `L` is diagonal, as exponax and dinosaur do. A
    `correction` is added to the explicit part `N`.

    **Arguments:**

    - `tableau`: `"euler"` (forward-backward Euler, order 1), `"ars222"` (order 2) or
      `"ars443"` (order 3), from Ascher, Ruuth & Spiteri (1997).
    """

    tableau: Literal["euler", "ars222", "ars443"] = eqx.field(
        static=True, default="ars443"
    )

    def __check_init__(self):
        if self.tableau not in _TABLEAUX:
            raise ValueError(
                f"unknown IMEX tableau {self.tableau!r}; choose from {list(_TABLEAUX)}"
            )

    @property
    def order(self) -> int:
        return _TABLEAUX[self.tableau][4]

    def step(self, model, u, dt, correction=None):
        if not isinstance(model, AbstractSpectralModel):

            def explicit(y):
                n = model.nonlinear(y)
                return n if correction is None else n + correction(y)

            return self._stages(u, dt, explicit, model.linear, model.linear_inverse), {
                "newton_steps": jnp.array(0)
            }

        # Spectral models: step the Fourier coefficients, where L is diagonal, so
        # that no transform is spent on the implicit part.
        grid, symbol = model.grid, model.linear_symbol()

        def explicit_hat(y_hat):
            n_hat = model.nonlinear_spectral(y_hat)
            if correction is not None:
                n_hat = n_hat + grid.fft(correction(grid.ifft(y_hat)))
            return n_hat

        u_hat = self._stages(
            grid.fft(u),
            dt,
            explicit_hat,
            lambda y_hat: symbol * y_hat,
            lambda r_hat, eta: r_hat / (1 - eta * symbol),
        )
        return grid.ifft(u_hat).astype(u.dtype), {"newton_steps": jnp.array(0)}

    def _stages(self, u, dt, explicit, linear, linear_inverse):
        a_ex, b_ex, a_im, b_im, _ = _TABLEAUX[self.tableau]
        k_ex, k_im = [], []
        for i in range(len(b_ex)):
            y = u
            for j in range(i):
                if a_ex[i][j]:
                    y = y + dt * a_ex[i][j] * k_ex[j]
                if a_im[i][j]:
                    y = y + dt * a_im[i][j] * k_im[j]
            needs_ex = b_ex[i] or any(row[i] for row in a_ex[i + 1 :])
            needs_im = b_im[i] or any(row[i] for row in a_im[i + 1 :])
            if a_im[i][i]:
                rhs = y
                y = linear_inverse(rhs, dt * a_im[i][i])
                # L Y_i from the stage equation, saving an application of L; the
                # round-off it adds is multiplied back by dt a_ii in every use.
                k_im.append((y - rhs) / (dt * a_im[i][i]) if needs_im else None)
            else:
                k_im.append(linear(y) if needs_im else None)
            k_ex.append(explicit(y) if needs_ex else None)
        out = u
        for i in range(len(b_ex)):
            if b_ex[i]:
                out = out + dt * b_ex[i] * k_ex[i]
            if b_im[i]:
                out = out + dt * b_im[i] * k_im[i]
        return out
