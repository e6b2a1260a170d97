"""Uniform rectilinear grids and their finite-difference / spectral operators."""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

Boundary = Literal["periodic", "dirichlet"]


def _dst1(x: Array, axis: int) -> Array:
    """Type-I discrete sine transform along `axis` through an FFT of the odd extension.

    X_k = sum_n x_n sin(pi (n + 1)(k + 1) / (N + 1)); its inverse is 2 / (N + 1) DST-I.
    """
    x = jnp.moveaxis(x, axis, -1)
    zero = jnp.zeros_like(x[..., :1])
    y = jnp.concatenate([zero, x, zero, -x[..., ::-1]], axis=-1)
    n = x.shape[-1]
    out = -jnp.imag(jnp.fft.fft(y, axis=-1)[..., 1 : n + 1]) / 2
    return jnp.moveaxis(out, -1, axis)


class Grid(eqx.Module):
    """A uniform grid on [0, L_y] x [0, L_x] (or [0, L] in 1D).

    Axes follow the CF order `(y, x)`: the last axis is `x`. With `boundary="periodic"`
    the points are `x_i = i dx`, `dx = L / N`; with `boundary="dirichlet"` they are the
    interior points `x_i = (i + 1) dx`, `dx = L / (N + 1)`, and the state is zero on the
    boundary (homogeneous Dirichlet).

    **Arguments:**

    - `shape`: number of points per axis, `(nx,)` or `(ny, nx)`.
    - `length`: domain length per axis, same order as `shape`.
    - `boundary`: `"periodic"` or `"dirichlet"`.
    """

    shape: tuple[int, ...] = eqx.field(static=True, converter=tuple)
    length: tuple[float, ...] = eqx.field(static=True, converter=tuple)
    boundary: Boundary = eqx.field(static=True, default="periodic")

    def __check_init__(self):
        if len(self.shape) not in (1, 2):
            raise ValueError(f"Grid supports 1 or 2 dimensions, got shape {self.shape}")
        if len(self.length) != len(self.shape):
            raise ValueError(
                f"Grid length {self.length} does not match shape {self.shape}"
            )
        if any(int(n) < 3 for n in self.shape):
            raise ValueError(f"Grid needs at least 3 points per axis, got {self.shape}")
        if any(not float(ell) > 0 for ell in self.length):
            raise ValueError(f"Grid length must be positive, got {self.length}")
        if self.boundary not in ("periodic", "dirichlet"):
            raise ValueError(
                f"boundary must be 'periodic' or 'dirichlet', got {self.boundary!r}"
            )

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Grid spacing per axis."""
        extra = 0 if self.boundary == "periodic" else 1
        return tuple(
            ell / (n + extra) for ell, n in zip(self.length, self.shape, strict=True)
        )

    def coordinates(self, axis: int) -> Float[Array, " n"]:
        """1D coordinates of the points along `axis`."""
        n, dx = self.shape[axis], self.spacing[axis]
        offset = 0.0 if self.boundary == "periodic" else 1.0
        return (jnp.arange(n) + offset) * dx

    def mesh(self) -> tuple[Array, ...]:
        """Coordinate arrays broadcast to `shape` (`(x,)` in 1D, `(y, x)` in 2D)."""
        return tuple(
            jnp.meshgrid(
                *[self.coordinates(a) for a in range(self.ndim)], indexing="ij"
            )
        )

    # ---------------------------------------------------------------- spectral
    def wavenumbers(self) -> tuple[Array, ...]:
        """Angular wavenumbers of `rfftn` on the grid, broadcastable (periodic only)."""
        return tuple(jnp.asarray(k) for k in self.numpy_wavenumbers())

    def numpy_wavenumbers(self) -> tuple[np.ndarray, ...]:
        """`wavenumbers()` as NumPy arrays (float64): constants for spectral
        multipliers built at trace time, cast to the state's precision by the
        caller."""
        if self.boundary != "periodic":
            raise ValueError("wavenumbers are defined for periodic grids only")
        ks = []
        for a, (n, dx) in enumerate(zip(self.shape, self.spacing, strict=True)):
            if a == self.ndim - 1:
                k = 2 * np.pi * np.fft.rfftfreq(n, d=dx)
            else:
                k = 2 * np.pi * np.fft.fftfreq(n, d=dx)
            bshape = [1] * self.ndim
            bshape[a] = k.size
            ks.append(k.reshape(bshape))
        return tuple(ks)

    def dealias_mask(self) -> Array:
        """The 2/3-rule mask in `rfftn` space (Orszag 1971)."""
        return jnp.asarray(self.numpy_dealias_mask())

    def numpy_dealias_mask(self) -> np.ndarray:
        """`dealias_mask()` as a NumPy array."""
        mask = np.array(True)
        for k, dx in zip(self.numpy_wavenumbers(), self.spacing, strict=True):
            mask = mask & (np.abs(k) < (2.0 / 3.0) * np.pi / dx)
        return mask

    def fft(self, u: Array) -> Array:
        return jnp.fft.rfftn(u, axes=self._axes)

    def ifft(self, u_hat: Array) -> Array:
        return jnp.fft.irfftn(u_hat, s=self.shape, axes=self._axes)

    @property
    def _axes(self) -> tuple[int, ...]:
        return tuple(range(-self.ndim, 0))

    # ------------------------------------------------------- finite differences
    def _pad(self, u: Array, axis: int, mode: str) -> Array:
        widths = [(0, 0)] * u.ndim
        widths[axis] = (1, 1)
        if self.boundary == "periodic":
            return jnp.pad(u, widths, mode="wrap")
        return jnp.pad(u, widths, mode=mode)

    def gradient(self, u: Array, axis: int) -> Array:
        """Second-order centred first derivative along spatial `axis` (-1 is x)."""
        up = self._pad(u, axis, "constant")
        n = u.shape[axis]
        fwd = _window(up, 2, n + 2, axis)
        bwd = _window(up, 0, n, axis)
        return (fwd - bwd) / (2 * self.spacing[axis])

    def divergence_flux(self, kappa: Array, u: Array) -> Array:
        """Conservative second-order `div(kappa grad u)` (finite volume).

        The face coefficient is the arithmetic mean of the two neighbouring cells; at a
        Dirichlet wall the wall value of `kappa` is that of the adjacent cell.
        """
        kappa = jnp.broadcast_to(kappa, u.shape)
        out = jnp.zeros_like(u)
        for axis in self._axes:
            n = u.shape[axis]
            dx = self.spacing[axis]
            up = self._pad(u, axis, "constant")
            kp = self._pad(kappa, axis, "edge")
            left = _window(up, 0, n + 1, axis)
            right = _window(up, 1, n + 2, axis)
            k_face = 0.5 * (_window(kp, 0, n + 1, axis) + _window(kp, 1, n + 2, axis))
            flux = k_face * (right - left) / dx
            out = out + (_window(flux, 1, n + 1, axis) - _window(flux, 0, n, axis)) / dx
        return out

    def laplacian(self, u: Array) -> Array:
        """Second-order five-point (three-point in 1D) Laplacian."""
        return self.divergence_flux(jnp.ones((), u.dtype), u)

    # ------------------------------------------------------- structured solves
    def laplacian_eigenvalues(self) -> Array:
        """Eigenvalues of `laplacian` in its diagonalising transform.

        The transform is `rfftn` for periodic grids and DST-I per axis for Dirichlet
        grids; the result broadcasts against the transformed array.
        """
        total = 0.0
        for a, (n, dx) in enumerate(zip(self.shape, self.spacing, strict=True)):
            if self.boundary == "periodic":
                k = self.wavenumbers()[a]
                lam = -(4 / dx**2) * jnp.sin(k * dx / 2) ** 2
            else:
                m = np.arange(1, n + 1)
                bshape = [1] * self.ndim
                bshape[a] = n
                lam = jnp.asarray(
                    (-(4 / dx**2) * np.sin(np.pi * m / (2 * (n + 1))) ** 2).reshape(
                        bshape
                    )
                )
            total = total + lam
        return total

    def solve_helmholtz(self, rhs: Array, coefficient: float | Array) -> Array:
        """Solve `(I - coefficient Laplacian) x = rhs` exactly (FFT or DST)."""
        return self.solve_diagonal(rhs, 1 - coefficient * self.laplacian_eigenvalues())

    def solve_diagonal(self, rhs: Array, symbol: Array) -> Array:
        """Solve `S x = rhs` for an operator `S` diagonal in the grid's transform.

        `symbol` holds the eigenvalues of `S` (same layout as `laplacian_eigenvalues`).
        This is an exact structured solve: O(N log N), no matrix, and linear in `rhs`,
        so JAX's transpose rule gives its adjoint.
        """
        if self.boundary == "periodic":
            return self.ifft(self.fft(rhs) / symbol).astype(rhs.dtype)
        x = rhs
        for axis in self._axes:
            x = _dst1(x, axis)
        x = x / symbol
        for axis in self._axes:
            x = _dst1(x, axis) * (2.0 / (x.shape[axis] + 1))
        return x.astype(rhs.dtype)


def _window(u: Array, start: int, stop: int, axis: int) -> Array:
    """`u[start:stop]` along `axis`: a static slice, whose transpose is a pad (an
    index gather's would be a scatter-add, several times slower in adjoints)."""
    return jax.lax.slice_in_dim(u, start, stop, axis=axis)
