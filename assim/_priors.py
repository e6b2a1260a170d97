"""Non-smooth convex priors of the state with exact proximal operators: sparsity
(L1 in the grid or an orthonormal Haar wavelet basis) and total variation
(isotropic or anisotropic). They regularise 3D/4D-Var where a Gaussian `B` blurs
fronts and jumps (`ProximalGradient`, `ADMM`) and are layers of unrolled networks
(`UnrolledADMM`)."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


class AbstractPrior(eqx.Module):
    """A convex prior `g(x)` of a state, used through its proximal operator
    `prox_{s g}(x) = argmin_z g(z) + |z - x|^2 / (2 s)`."""

    @abc.abstractmethod
    def __call__(self, x: Float[Array, "..."]) -> Float[Array, ""]:
        """`g(x)`."""

    @abc.abstractmethod
    def prox(self, x: Float[Array, "..."], step) -> Float[Array, "..."]:
        """`prox_{step g}(x)` (`step > 0`, a scalar; may be traced)."""


def soft_threshold(x, threshold):
    """`sign(x) max(|x| - threshold, 0)`: the proximal operator of `threshold |x|_1`."""
    return jnp.sign(x) * jnp.maximum(jnp.abs(x) - threshold, 0.0)


def _haar_step(a, axis, inverse):
    n = a.shape[axis] // 2
    if not inverse:
        even = jax.lax.slice_in_dim(a, 0, None, 2, axis)
        odd = jax.lax.slice_in_dim(a, 1, None, 2, axis)
        return jnp.concatenate([even + odd, even - odd], axis) / np.sqrt(2.0)
    low = jax.lax.slice_in_dim(a, 0, n, axis=axis)
    high = jax.lax.slice_in_dim(a, n, None, axis=axis)
    pairs = jnp.stack([low + high, low - high], axis + 1) / np.sqrt(2.0)
    return pairs.reshape(a.shape)


def haar(x: Array, levels: int, *, inverse: bool = False) -> Array:
    """The orthonormal separable Haar wavelet transform over every axis (Mallat's
    pyramid: at each level the coarse block is split along each axis); its
    inverse with `inverse=True`. Each axis must be divisible by `2**levels`."""
    shapes = [tuple(n // 2**level for n in x.shape) for level in range(levels)]
    order = shapes if not inverse else shapes[::-1]
    for shape in order:
        block = tuple(slice(0, n) for n in shape)
        a = x[block]
        axes = range(x.ndim) if not inverse else reversed(range(x.ndim))
        for axis in axes:
            a = _haar_step(a, axis, inverse)
        x = x.at[block].set(a)
    return x


class L1Prior(AbstractPrior):
    """Sparsity: `g(x) = weight |W x|_1` over the detail coefficients of `x` in an
    orthonormal basis `W`, whose proximal operator is exact,
    `prox(x) = W^T soft_threshold(W x, step weight)` (coarse coefficients are not
    penalised).

    **Arguments:**

    - `weight`: the penalty (positive).
    - `basis`: `"identity"` (the grid values themselves) or `"haar"` (the
      orthonormal Haar wavelets of `haar`, `levels` levels; each axis divisible by
      `2**levels`).
    - `levels`: wavelet levels.
    """

    weight: float = eqx.field(static=True)
    basis: str = eqx.field(static=True, default="identity")
    levels: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        if not self.weight > 0:
            raise ValueError(f"L1Prior: weight must be positive, got {self.weight}")
        if self.basis not in ("identity", "haar"):
            raise ValueError(
                f"L1Prior: basis must be 'identity' or 'haar', got {self.basis!r}"
            )
        if self.levels < 1:
            raise ValueError(f"L1Prior: levels must be >= 1, got {self.levels}")

    def _details(self, shape) -> np.ndarray:
        if self.basis == "identity":
            return np.ones(shape, bool)
        if any(n % 2**self.levels for n in shape):
            raise ValueError(
                f"L1Prior: a Haar basis of {self.levels} levels needs every axis "
                f"divisible by {2**self.levels}, got the grid {shape}"
            )
        mask = np.ones(shape, bool)
        mask[tuple(slice(0, n // 2**self.levels) for n in shape)] = False
        return mask

    def _forward(self, x):
        return x if self.basis == "identity" else haar(x, self.levels)

    def _inverse(self, c):
        return c if self.basis == "identity" else haar(c, self.levels, inverse=True)

    def __call__(self, x):
        details = self._details(x.shape)
        return self.weight * jnp.sum(jnp.where(details, jnp.abs(self._forward(x)), 0))

    def prox(self, x, step):
        details = self._details(x.shape)
        c = self._forward(x)
        c = jnp.where(details, soft_threshold(c, step * self.weight), c)
        return self._inverse(c)


class TotalVariation(AbstractPrior):
    """Total variation: `g(x) = weight sum_i |(D x)_i|`, with `D` the forward
    differences between neighbouring grid points along every axis (periodic, or
    zero across the last point: Neumann) and `|.|` the Euclidean norm over the
    axes at each point (isotropic) or the sum of absolute values (anisotropic: L1
    of the gradient).

    Its proximal operator is the dual solution (Chambolle, J. Math. Imaging Vis.
    20, 2004): `prox(x) = x - s weight D^T p` with `p` the minimiser of
    `|x - s weight D^T p|^2` over `|p_i| <= 1`, found by accelerated projected
    gradient (Beck & Teboulle, IEEE Trans. Image Process. 18, 2009) in a fixed
    number of `iterations` (so that it is differentiable by backpropagation as a
    layer). The error falls as `1 / iterations^2`.

    **Arguments:**

    - `weight`: the penalty (positive).
    - `periodic`: periodic differences (a periodic grid) or Neumann.
    - `isotropic`: see above.
    - `iterations`: dual iterations of each proximal operator.
    """

    weight: float = eqx.field(static=True)
    periodic: bool = eqx.field(static=True, default=False)
    isotropic: bool = eqx.field(static=True, default=True)
    iterations: int = eqx.field(static=True, default=200)

    def __check_init__(self):
        if not self.weight > 0:
            raise ValueError(
                f"TotalVariation: weight must be positive, got {self.weight}"
            )
        if self.iterations < 1:
            raise ValueError(
                f"TotalVariation: iterations must be >= 1, got {self.iterations}"
            )

    def gradient(self, x: Array) -> Float[Array, "axis ..."]:
        """`D x`: forward differences along every axis."""
        out = []
        for axis in range(x.ndim):
            if self.periodic:
                d = jnp.roll(x, -1, axis) - x
            else:
                d = jnp.diff(x, axis=axis)
                pad = [(0, 0)] * x.ndim
                pad[axis] = (0, 1)
                d = jnp.pad(d, pad)
            out.append(d)
        return jnp.stack(out)

    def gradient_transpose(self, p: Float[Array, "axis ..."]) -> Array:
        """`D^T p` (minus the divergence)."""
        _, transpose = jax.vjp(self.gradient, jnp.zeros(p.shape[1:], p.dtype))
        return transpose(p)[0]

    def _norms(self, g):
        if self.isotropic:
            return jnp.sqrt(jnp.sum(g**2, axis=0))
        return jnp.abs(g)

    def __call__(self, x):
        return self.weight * jnp.sum(self._norms(self.gradient(x)))

    def _project(self, p):
        if self.isotropic:
            return p / jnp.maximum(1.0, jnp.sqrt(jnp.sum(p**2, axis=0)))
        return jnp.clip(p, -1.0, 1.0)

    def prox(self, x, step):
        lam = step * self.weight
        # |D|^2 <= 4 ndim: the dual objective's gradient is (4 ndim lam^2)-Lipschitz.
        rate = 1.0 / (4.0 * x.ndim * lam)
        p0 = jnp.zeros((x.ndim, *x.shape), x.dtype)

        def body(_, carry):
            p, q, t = carry
            u = x - lam * self.gradient_transpose(q)
            p_new = self._project(q + rate * self.gradient(u))
            t_new = (1 + jnp.sqrt(1 + 4 * t**2)) / 2
            q = p_new + ((t - 1) / t_new) * (p_new - p)
            return p_new, q, t_new

        p, _, _ = jax.lax.fori_loop(
            0, self.iterations, body, (p0, p0, jnp.ones((), x.dtype))
        )
        return x - lam * self.gradient_transpose(p)
