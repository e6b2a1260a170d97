"""Background-error covariances, applied through their square roots (no dense B),
and the climatology of a model (its mean and covariance from a free run)."""

import abc
import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from simulators import Grid, Simulator, is_concrete


class AbstractCovariance(eqx.Module):
    """A covariance `B = S S^T` used through the control-variable transform
    `x = x_b + S v`, `v ~ N(0, I)`: the background term of the cost is `|v|^2 / 2`.
    """

    @abc.abstractmethod
    def sqrt(self, v: Array) -> Array:
        """`S v`."""

    @abc.abstractmethod
    def sqrt_transpose(self, x: Array) -> Array:
        """`S^T x`."""

    @abc.abstractmethod
    def whiten(self, x: Array) -> Array:
        """`S^{-1} x`: the control `v` of an increment `x = S v`, so that
        `|x|^2_{B^-1} = |S^{-1} x|^2` (the background term of the cost at a state)."""

    def mean_variance(self) -> Array:
        """The mean of `B`'s diagonal (the mean error variance)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not say its mean variance"
        )

    def zeros_control(self, x: Array):
        """The control of a zero increment to the state `x` (`v = 0`): an array of
        the state's shape, or the pytree of an extended control (e.g.
        `HybridCovariance`'s)."""
        return jnp.zeros_like(x)

    def apply(self, x: Array) -> Array:
        """`B x = S S^T x`."""
        return self.sqrt(self.sqrt_transpose(x))


class DiagonalCovariance(AbstractCovariance):
    """`B = diag(std^2)`.

    **Arguments:**

    - `std`: standard deviation, a positive scalar or a field of the state's shape.
    """

    std: Float[Array, "..."] = eqx.field(converter=jnp.asarray)

    def __check_init__(self):
        if is_concrete(self.std) and not np.all(np.asarray(self.std) > 0):
            raise ValueError("background error std must be positive")

    @classmethod
    def uniform(cls, simulator, std: float = 1.0) -> "DiagonalCovariance":
        """`std^2 I` on `simulator`'s grid (a config's `_partial_` covariance)."""
        return cls(jnp.full(simulator.model.grid.shape, float(std)))

    def sqrt(self, v):
        return self.std * v

    def sqrt_transpose(self, x):
        return self.std * x

    def whiten(self, x):
        return x / self.std

    def mean_variance(self):
        return jnp.mean(self.std**2)


class DiffusionCovariance(AbstractCovariance):
    """A spatially correlated `B` from an implicit diffusion operator:

    `B = std^2 c^2 (I - l^2 Laplacian)^{-m}`, `S = std c (I - l^2 Laplacian)^{-m/2}`,

    applied by FFT (periodic) or DST (Dirichlet) diagonalisation, so that no dense
    matrix is formed (Weaver & Courtier, Q. J. R. Meteorol. Soc. 127, 2001; with m = 2
    in 2D the correlation is of the second-order autoregressive (Matérn) family).
    `c` normalises the mean variance to `std^2` (exact on periodic grids).

    **Arguments:**

    - `grid`: the state's grid.
    - `std`: background error standard deviation (positive scalar).
    - `length_scale`: `l`, in the grid's length units.
    - `order`: `m`, a positive even integer.
    """

    grid: Grid
    std: Float[Array, ""] = eqx.field(converter=jnp.asarray)
    length_scale: float = eqx.field(static=True)
    order: int = eqx.field(static=True, default=2)

    @classmethod
    def relative(
        cls,
        where: Grid | Simulator,
        std: float,
        length_fraction: float,
        order: int = 2,
    ) -> "DiffusionCovariance":
        """The covariance with correlation length `length_fraction` times the
        domain's shortest side (a setting that fits any grid, as configs use), on
        the grid `where` or of the simulator `where`."""
        grid = where.model.grid if isinstance(where, Simulator) else where
        return cls(grid, std, length_fraction * min(grid.length), order)

    def __check_init__(self):
        if is_concrete(self.std) and not np.asarray(self.std) > 0:
            raise ValueError("background error std must be positive")
        if not self.length_scale > 0:
            raise ValueError(f"length_scale must be positive, got {self.length_scale}")
        if self.order < 2 or self.order % 2:
            raise ValueError(f"order must be a positive even integer, got {self.order}")

    def _half_symbol(self):
        return (1 - self.length_scale**2 * self.grid.laplacian_eigenvalues()) ** (
            self.order // 2
        )

    def _normalisation(self) -> float:
        """`c^-1`: the mean over all modes of `(1 - l^2 lambda)^-m`, square-rooted.

        The mean of B's diagonal is the mean of its eigenvalues (trace / N), for the
        FFT (periodic) and the orthonormal DST (Dirichlet) alike.
        """
        total = 0.0
        for axis, (n, dx) in enumerate(
            zip(self.grid.shape, self.grid.spacing, strict=True)
        ):
            if self.grid.boundary == "periodic":
                angle = np.pi * np.fft.fftfreq(n)
            else:
                angle = np.pi * np.arange(1, n + 1) / (2 * (n + 1))
            lam = -(4 / dx**2) * np.sin(angle) ** 2
            shape = [1] * self.grid.ndim
            shape[axis] = n
            total = total + lam.reshape(shape)
        return float(
            np.sqrt(np.mean((1 - self.length_scale**2 * total) ** -self.order))
        )

    def sqrt(self, v):
        return (
            self.std
            * self.grid.solve_diagonal(v, self._half_symbol())
            / self._normalisation()
        )

    def sqrt_transpose(self, x):
        return self.sqrt(x)  # symmetric

    def mean_variance(self):
        return self.std**2  # `c` normalises it (exactly on periodic grids)

    def whiten(self, x):
        inverse = 1 / self._half_symbol()
        return self.grid.solve_diagonal(x, inverse) * self._normalisation() / self.std


class SpectralCovariance(AbstractCovariance):
    """A homogeneous (translation-invariant) covariance on a periodic grid, diagonal in
    Fourier space: `B = F^* diag(spectrum) F` with `F` the unitary DFT, applied as a
    spectral filter `S v = F^* (sqrt(spectrum) F v)`. On a translation-invariant
    system (Lorenz-96, Kuramoto-Sivashinsky, periodic turbulence) the climatological
    covariance is exactly of this form, so `from_samples` gives the static `B` of
    3D-Var and optimal interpolation without a dense matrix.

    **Arguments:**

    - `grid`: a periodic `Grid`.
    - `spectrum`: variance per Fourier mode in `rfftn` layout (last axis halved),
      non-negative.
    """

    grid: Grid
    spectrum: Float[Array, "..."] = eqx.field(converter=jnp.asarray)

    def __check_init__(self):
        if self.grid.boundary != "periodic":
            raise ValueError("SpectralCovariance needs a periodic grid")
        shape = (*self.grid.shape[:-1], self.grid.shape[-1] // 2 + 1)
        if self.spectrum.shape != shape:
            raise ValueError(
                f"spectrum must have the rfft shape {shape}, got {self.spectrum.shape}"
            )
        if is_concrete(self.spectrum) and np.any(np.asarray(self.spectrum) < 0):
            raise ValueError("spectrum (variances) must be non-negative")

    @classmethod
    def from_samples(cls, grid: Grid, samples, scale: float = 1.0):
        """The sample covariance of `samples` `(n, *grid)` (e.g. a climatology or
        forecast errors), made homogeneous by averaging over translations, times
        `scale`."""
        samples = np.asarray(samples, dtype=np.float64)
        if samples.ndim != grid.ndim + 1 or samples.shape[1:] != grid.shape:
            raise ValueError(
                f"samples must have shape (n, {', '.join(map(str, grid.shape))}), got "
                f"{samples.shape}"
            )
        anomalies = samples - samples.mean(axis=0)
        axes = tuple(range(1, grid.ndim + 1))
        power = np.abs(np.fft.rfftn(anomalies, axes=axes, norm="ortho")) ** 2
        return cls(grid, scale * power.mean(axis=0))

    def _axes(self):
        return tuple(range(-self.grid.ndim, 0))

    def sqrt(self, v):
        axes = self._axes()
        v_hat = jnp.fft.rfftn(v, axes=axes, norm="ortho")
        out = jnp.fft.irfftn(
            jnp.sqrt(self.spectrum) * v_hat, s=self.grid.shape, axes=axes, norm="ortho"
        )
        return out.astype(v.dtype)

    def sqrt_transpose(self, x):
        return self.sqrt(x)  # symmetric: a real, even filter

    def mean_variance(self):
        # tr(B) / n: the full spectrum's mean; the rfft layout holds the modes of
        # the last axis once, the others (but 0 and Nyquist) stand for two.
        n = self.grid.shape[-1]
        weights = jnp.full(n // 2 + 1, 2.0).at[0].set(1.0)
        if n % 2 == 0:
            weights = weights.at[-1].set(1.0)
        return jnp.sum(self.spectrum * weights) / np.prod(self.grid.shape)

    def whiten(self, x):
        """`S^+ x`: modes of zero or negligible variance (the mean of anomalies,
        the dissipation range of a climatology: below `1e-6` of the largest) are
        outside B's range and are dropped (the pseudo-inverse with a relative
        cutoff, so that round-off in those modes of an increment in B's range is
        not amplified into the background term)."""
        axes = self._axes()
        positive = self.spectrum > 1e-6 * jnp.max(self.spectrum)
        inverse = jnp.where(
            positive, 1 / jnp.sqrt(jnp.where(positive, self.spectrum, 1)), 0
        )
        x_hat = jnp.fft.rfftn(x, axes=axes, norm="ortho")
        out = jnp.fft.irfftn(
            inverse * x_hat, s=self.grid.shape, axes=axes, norm="ortho"
        )
        return out.astype(x.dtype)


class ScaledCovariance(AbstractCovariance):
    """`s^2 B` for a covariance `B` and a positive scale `s` (e.g. a learned
    background-error scale): `S_s = s S`."""

    covariance: AbstractCovariance
    scale: Float[Array, ""] = eqx.field(converter=jnp.asarray)

    def sqrt(self, v):
        return self.scale * self.covariance.sqrt(v)

    def sqrt_transpose(self, x):
        return jax.tree.map(lambda v: self.scale * v, self.covariance.sqrt_transpose(x))

    def whiten(self, x):
        return jax.tree.map(lambda v: v / self.scale, self.covariance.whiten(x))

    def zeros_control(self, x):
        return self.covariance.zeros_control(x)

    def mean_variance(self):
        return self.scale**2 * self.covariance.mean_variance()


class Climatology(eqx.Module):
    """A model's climate: the mean and the (homogeneous) covariance of the states of
    a long free run, the statistics that optimal interpolation and the
    climatology baseline use, and the shape of the static `B` of 3D-Var and
    4D-Var (scaled to the forecast errors, e.g. by `InnovationAdaptation` while
    cycling).

    **Arguments:**

    - `mean`: the climatological mean state.
    - `covariance`: the climatological covariance (`SpectralCovariance`).
    """

    mean: Float[Array, "..."]
    covariance: SpectralCovariance

    @classmethod
    def from_run(
        cls,
        simulator: Simulator,
        *,
        samples: int = 2000,
        interval_steps: int = 10,
        spinup_steps: int = 2000,
        seed: int = 0,
    ) -> "Climatology":
        """The climate of `simulator` (a translation-invariant model on a periodic
        grid: Lorenz-96, Kuramoto-Sivashinsky, periodic turbulence) from one free
        run started from zero-mean white noise: `spinup_steps` steps discarded,
        then `samples` states `interval_steps` steps apart. The mean is the
        average over time and space (homogeneous); the covariance is
        `SpectralCovariance.from_samples` of the states."""
        grid = simulator.model.grid
        if grid.boundary != "periodic":
            raise ValueError(
                "a climatological covariance needs a translation-invariant model on "
                f"a periodic grid; this grid is {grid.boundary!r}: use "
                "assim.DiffusionCovariance.relative"
            )
        if samples < 2 or interval_steps < 1 or spinup_steps < 0:
            raise ValueError(
                "climatology needs samples >= 2, interval_steps >= 1 and "
                f"spinup_steps >= 0, got {samples}, {interval_steps}, {spinup_steps}"
            )
        rng = np.random.default_rng(seed)
        u0 = rng.normal(size=grid.shape)
        u0 = jnp.asarray(u0 - u0.mean(), jnp.zeros(()).dtype)
        # Checked below, on the host (no host callback in the program: JAX's
        # persistent compilation cache stores it).
        unchecked = dataclasses.replace(simulator, check_finite=False)
        states = _free_run(unchecked, u0, spinup_steps, samples, interval_steps)
        states = np.asarray(states, np.float64)
        if not np.all(np.isfinite(states)):
            raise ValueError("climatology: the free run became non-finite")
        mean = np.full(grid.shape, states.mean())
        return cls(
            jnp.asarray(mean, u0.dtype), SpectralCovariance.from_samples(grid, states)
        )

    def scaled_covariance(self, scale: float = 1.0) -> SpectralCovariance:
        """`scale` times the climatological covariance."""
        return SpectralCovariance(
            self.covariance.grid, scale * self.covariance.spectrum
        )


@eqx.filter_jit
def _free_run(simulator, u0, spinup_steps: int, samples: int, interval_steps: int):
    u = simulator.rollout(u0, spinup_steps)[-1] if spinup_steps else u0
    return simulator.rollout(u, (samples - 1) * interval_steps, every=interval_steps)


def climatological_covariance(
    simulator: Simulator,
    *,
    scale: float = 1.0,
    samples: int = 2000,
    interval_steps: int = 10,
    spinup_steps: int = 2000,
    seed: int = 0,
) -> SpectralCovariance:
    """`scale` times the climatological covariance of `simulator`
    (`Climatology.from_run` with these settings): the static `B` that configs
    name for translation-invariant models."""
    climate = Climatology.from_run(
        simulator,
        samples=samples,
        interval_steps=interval_steps,
        spinup_steps=spinup_steps,
        seed=seed,
    )
    return climate.scaled_covariance(scale)
