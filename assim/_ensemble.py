"""Ensemble Kalman filters (stochastic EnKF, ETKF, LETKF) and hybrid
ensemble-variational 4D-Var, as analysers of the one cycling loop.

An ensemble analyser's background is an `Ensemble` (the forecast members at the
window's first time); it assimilates the window's observation times in turn (analyse,
then advance every member one observation interval in one vmapped call) and hands the
forecast ensemble to the next window. The analysis is the ensemble mean, its spread is
reported with it. The formulas are those of Hunt, Kostelich & Szunyogh (Physica D 230,
2007) in the whitened observation space, as DAPPER's `EnKF` / `LETKF` compute them."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Key

from simulators import Grid

from ._analyser import FIXED_STEPS, AbstractAnalyser, Info
from ._covariance import AbstractCovariance, ScaledCovariance, SpectralCovariance
from ._observations import ObservationSet
from ._operators import grid_points
from ._problem import Analysis, WindowProblem
from ._variational import Variational

# Gaspari-Cohn's half support over the localisation radius: the taper is exp(-1/2)
# at `radius` (its value for a Gaussian of std `radius`), as DAPPER defines it.
GC_SCALE = 1.7386


def gaspari_cohn(z: Array) -> Array:
    """The Gaspari-Cohn fifth-order piecewise rational taper (Q. J. R. Meteorol. Soc.
    125, 1999, eq. 4.10) at `z = distance / c`: 1 at 0, compactly supported on
    `z < 2`."""
    z = jnp.abs(z)
    inner = -0.25 * z**5 + 0.5 * z**4 + 0.625 * z**3 - 5 / 3 * z**2 + 1
    safe = jnp.where(z > 0, z, 1.0)
    outer = z**5 / 12 - 0.5 * z**4 + 0.625 * z**3 + 5 / 3 * z**2 - 5 * z + 4
    outer = outer - 2 / (3 * safe)
    # Clipped at 0: in float32 the outer polynomial rounds to about -1e-6 just
    # below z = 2, whose square root (the LETKF's tapering) would be NaN.
    taper = jnp.where(z <= 1, inner, jnp.where(z < 2, outer, 0.0))
    return jnp.maximum(taper, 0.0)


def taper(distance: Array, radius: float) -> Array:
    """The Gaspari-Cohn localisation coefficient at `distance` for `radius` (exp(-1/2)
    at the radius, zero beyond `2 * 1.7386 * radius`)."""
    return gaspari_cohn(distance / (GC_SCALE * radius))


def grid_distances(grid: Grid, points: Array, locations: Array) -> Array:
    """Distances `(points, locations)` between coordinates `(points, ndim)` and
    `(locations, ndim)`, the shortest way round on a periodic grid."""
    diff = jnp.abs(points[:, None, :] - locations[None, :, :])
    if grid.boundary == "periodic":
        length = jnp.asarray(grid.length, diff.dtype)
        diff = jnp.minimum(diff, length - diff)
    return jnp.sqrt(jnp.sum(diff**2, axis=-1))


def _spread(members: Array) -> Array:
    """The members' standard deviation per grid point (`N - 1` normalised)."""
    anomalies = members - jnp.mean(members, axis=0)
    return jnp.sqrt(jnp.sum(anomalies**2, axis=0) / (members.shape[0] - 1))


def gaspari_cohn_correlation(grid: Grid, radius: float) -> SpectralCovariance:
    """The localisation matrix `L` of a periodic grid (a Gaspari-Cohn correlation of
    `radius`, circulant) as a covariance applied by FFT: its square root localises
    the ensemble part of `HybridCovariance`. Eigenvalues that round-off makes
    negative are set to zero."""
    if grid.boundary != "periodic":
        raise ValueError(
            "a Gaspari-Cohn localisation matrix needs a periodic grid; this grid is "
            f"{grid.boundary!r}: give HybridCovariance a correlation covariance "
            "(e.g. assim.DiffusionCovariance.relative(grid, 1.0, fraction))"
        )
    with jax.ensure_compile_time_eval():  # a constant, also inside a jitted window
        origin = jnp.zeros((1, grid.ndim))
        row = taper(grid_distances(grid, grid_points(grid), origin)[:, 0], radius)
    spectrum = np.fft.rfftn(np.asarray(row, np.float64).reshape(grid.shape)).real
    return SpectralCovariance(grid, np.maximum(spectrum, 0.0))


class Ensemble(eqx.Module):
    """An ensemble of model states and the random key its filter draws from.

    - `members`: `(member, *grid)`.
    - `key`: a `jax.random` key, split at every analysis (perturbed observations),
      so that a cycled run is reproducible from its seed.
    """

    members: Float[Array, "member ..."]
    key: Key[Array, ""] | Array

    @classmethod
    def sample(
        cls,
        mean: Array,
        covariance: AbstractCovariance,
        size: int,
        key: Array,
    ) -> "Ensemble":
        """`size` members `mean + B^{1/2} z`, `z ~ N(0, I)` (each member's `z` of the
        covariance's control shape)."""
        if size < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {size}")
        key, sub = jax.random.split(key)
        zero = covariance.zeros_control(mean)
        leaves, treedef = jax.tree.flatten(zero)
        keys = jax.random.split(sub, len(leaves))
        draws = [
            jax.random.normal(k, (size, *leaf.shape), leaf.dtype)
            for k, leaf in zip(keys, leaves, strict=True)
        ]
        z = jax.tree.unflatten(treedef, draws)
        members = mean + jax.vmap(covariance.sqrt)(z)
        return cls(members.astype(mean.dtype), key)

    @property
    def size(self) -> int:
        return self.members.shape[0]

    @property
    def mean(self) -> Array:
        return jnp.mean(self.members, axis=0)

    @property
    def anomalies(self) -> Array:
        return self.members - self.mean

    @property
    def spread(self) -> Array:
        """The members' standard deviation per grid point (`N - 1` normalised)."""
        return _spread(self.members)

    def shard(self, mesh: Mesh | None = None) -> "Ensemble":
        """The members split over the devices of `mesh` (default: every device)
        when their number divides the member count; else as they are."""
        from ._parallel import BATCH_AXIS, batch_mesh

        mesh = batch_mesh() if mesh is None else mesh
        if mesh.size < 2 or self.size % mesh.size:
            return self
        spec = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
        return eqx.tree_at(
            lambda e: e.members, self, jax.device_put(self.members, spec)
        )


def _whitened(window: ObservationSet, members: Array, t) -> tuple:
    """`(Y, d)` at the window's time `t`: member anomalies of the predicted
    observations and the innovation of their mean, both divided by the error std
    and zero where no sensor reported, flattened to `(member, p)` and `(p,)`."""
    n = window.n_times

    def observe(x):  # the operator acts on trajectories; row t is time t's
        return window.operator(jnp.broadcast_to(x, (n, *x.shape)))[t]

    predicted = jax.vmap(observe)(members)
    mean = jnp.mean(predicted, axis=0)
    mask, std, y = window.mask[t], window.error_std[t], window.values[t]
    Y = jnp.where(mask, (predicted - mean) / std, 0.0)
    d = jnp.where(mask, (y - mean) / std, 0.0)
    return Y.reshape(Y.shape[0], -1), d.reshape(-1), mask.reshape(-1)


def _transform(A: Array, d: Array) -> tuple[Array, Array]:
    """ETKF's ensemble-space update for scaled anomalies `A = Y / sqrt(N - 1)`:
    the weights `T + w 1^T / sqrt(N - 1)` `(analysed member, member)` of the
    forecast anomalies, from the mean weights `w = (I + A A^T)^-1 A d` and the
    symmetric square-root transform `T = (I + A A^T)^-1/2` (Hunt et al. 2007, eqs.
    20-24); and the innovation's chi-square `d^T (A^T A + I)^-1 d = d^T d -
    (A d)^T w` against `H P_f H^T + R` (whitened; Woodbury in ensemble space)."""
    eigenvalues, vectors = jnp.linalg.eigh(A @ A.T)
    eigenvalues = jnp.maximum(eigenvalues, 0.0)
    Ad = A @ d
    w = vectors @ ((vectors.T @ Ad) / (1 + eigenvalues))
    T = (vectors / jnp.sqrt(1 + eigenvalues)) @ vectors.T
    return T + w[None, :] / jnp.sqrt(A.shape[0] - 1.0), d @ d - Ad @ w


def _chi2(A: Array, d: Array) -> Array:
    """`d^T (A^T A + I)^-1 d` (see `_transform`) by a Cholesky solve."""
    N = A.shape[0]
    Ad = A @ d
    factor = jax.scipy.linalg.cho_factor(jnp.eye(N, dtype=A.dtype) + A @ A.T)
    return d @ d - Ad @ jax.scipy.linalg.cho_solve(factor, Ad)


class AbstractEnsembleAnalyser(AbstractAnalyser):
    """An analyser whose background is an `Ensemble`. Its `analyse_window` returns
    everything `assim.analyse_window` reports of a window, the next window's
    (forecast) ensemble as `"forecast"` and the ensemble spread at the analysis
    times as `"spread"`."""

    @abc.abstractmethod
    def analyse_window(
        self, problem: WindowProblem, window: ObservationSet, background: Ensemble
    ) -> dict:
        """The window's analysis and report (see `assim.analyse_window`)."""

    def __call__(self, problem, window, background):
        out = self.analyse_window(problem, window, background)
        return out["analysis"], out["info"]


class AbstractEnsembleFilter(AbstractEnsembleAnalyser):
    """An ensemble Kalman filter: each observation time of a window analysed in turn,
    the members advanced one observation interval between them by the problem's
    model (vmapped over members).

    Common arguments:

    - `inflation`: multiplicative inflation of the analysis anomalies (DAPPER's
      `infl`; 1: none).
    - `rtps`: relaxation to prior spread (Whitaker & Hamill, Mon. Wea. Rev. 140,
      2012): the analysis spread is moved this fraction of the way back to the
      forecast spread, point by point (0: none).
    """

    inflation: float = eqx.field(static=True, default=1.0, kw_only=True)
    rtps: float = eqx.field(static=True, default=0.0, kw_only=True)

    def __check_init__(self):
        if not self.inflation >= 1:
            raise ValueError(f"inflation must be >= 1, got {self.inflation}")
        if not 0 <= self.rtps <= 1:
            raise ValueError(f"rtps must be in [0, 1], got {self.rtps}")

    @abc.abstractmethod
    def update(
        self,
        members: Array,
        Y: Array,
        d: Array,
        mask: Array,
        noise: Array | None,
        grid: Grid,
        locations: Array | None,
    ) -> tuple[Array, Array]:
        """The analysis members from the forecast `members` `(N, *grid)`, whitened
        observation anomalies `Y` `(N, p)`, innovation `d` `(p,)`, the reporting
        sensors `mask` `(p,)`, this time's draw of `noise` (or `None`), the grid
        and the observations' coordinates `(p, ndim)` (for localisation; `None` if
        not needed); and the innovation's chi-square against `H P_f H^T + R`."""

    def noise(self, keys: Array, shape: tuple, dtype) -> Array | None:
        """A window's random draws of `shape` per time, one key per time in `keys`,
        drawn before the loop in one vmapped call (a draw per time inside the loop
        costs several times more on a CPU); `None` for a deterministic filter."""
        del keys, shape, dtype
        return None

    def _post(self, forecast: Array, analysis: Array) -> Array:
        """Inflation and relaxation to prior spread of the analysis members."""
        mean = jnp.mean(analysis, axis=0)
        anomalies = self.inflation * (analysis - mean)
        if self.rtps:
            sigma_f, sigma_a = _spread(forecast), _spread(anomalies)
            safe = jnp.where(sigma_a > 0, sigma_a, 1.0)
            factor = 1 + self.rtps * (sigma_f - sigma_a) / safe
            anomalies = anomalies * jnp.where(sigma_a > 0, factor, 1.0)
        return mean + anomalies

    def needs_locations(self) -> bool:
        return False

    def filter_window(
        self, problem: WindowProblem, window: ObservationSet, background: Ensemble
    ) -> dict:
        """Run the filter through the window: per time the forecast and analysis
        means, the analysis spread, the innovation chi-square; and the ensemble
        forecast one interval past the window's last time."""
        if problem.weak:
            raise ValueError(
                "ensemble filters have no model-error forcing control: drop "
                "model_error_covariance (weak constraint) for an ensemble method"
            )
        simulator = problem.tolerating_blow_up().model(problem.parameter_background)
        interval = problem.observation_interval
        grid, locations = simulator.model.grid, None
        if self.needs_locations():
            locations = window.operator.locations(grid, window.n_times)

        def advance(members):
            return jax.vmap(lambda x: simulator.rollout(x, interval)[-1])(members)

        def step(members, inputs):
            t, noise = inputs
            Y, d, mask = _whitened(window, members, t)
            where = None if locations is None else locations[t]
            analysed, chi2 = self.update(members, Y, d, mask, noise, grid, where)
            analysed = self._post(members, analysed)
            means = (members.mean(0), analysed.mean(0))
            return advance(analysed), (*means, _spread(analysed), chi2)

        # One key per time, split off in turn: the draws do not depend on how
        # the times are cut into windows.
        key, keys = jax.lax.scan(
            lambda key, _: tuple(jax.random.split(key)),
            background.key,
            None,
            length=window.n_times,
        )
        shape = (background.size, window.values[0].size)
        draws = self.noise(keys, shape, background.members.dtype)
        times = jnp.arange(window.n_times)
        forecast, (first, trajectory, spread, chi2) = jax.lax.scan(
            step, background.members, (times, draws)
        )
        return {
            "first": first,
            "trajectory": trajectory,
            "spread": spread,
            "chi2": jnp.sum(chi2),
            "forecast": Ensemble(forecast, key),
        }

    def analyse_window(self, problem, window, background):
        out = self.filter_window(problem, window, background)
        # The observation term at the forecast and the analysis means (an ensemble
        # filter has no variational cost); no gradient.
        cost = jnp.stack(
            [
                0.5 * jnp.sum(window.innovations(out[key]) ** 2)
                for key in ("first", "trajectory")
            ]
        )
        theta = problem.parameter_background if problem.estimates_parameters else None
        return {
            **out,
            "analysis": Analysis(out["trajectory"][0], theta, None),
            "info": Info(jnp.asarray(0), jnp.asarray(FIXED_STEPS)),
            "cost": cost,
            "grad_norm": jnp.full(2, jnp.nan, cost.dtype),
            "adaptation": None,
        }


class EnKF(AbstractEnsembleFilter):
    """The stochastic ensemble Kalman filter with perturbed observations (Burgers,
    van Leeuwen & Evensen, Mon. Wea. Rev. 126, 1998; DAPPER's `EnKF('PertObs')`):
    each member is updated with its own draw of the observation error (centred over
    the members), the gain computed in ensemble space."""

    def noise(self, keys, shape, dtype):
        return jax.vmap(lambda key: jax.random.normal(key, shape, dtype))(keys)

    def update(self, members, Y, d, mask, noise, grid, locations):
        del grid, locations
        N = members.shape[0]
        eps = jnp.where(mask, noise - noise.mean(0), 0.0)
        D = d - Y + eps  # each member's whitened innovation with its perturbation
        A = Y / jnp.sqrt(N - 1.0)
        factor = jax.scipy.linalg.cho_factor(jnp.eye(N, dtype=A.dtype) + A @ A.T)
        gain = jax.scipy.linalg.cho_solve(factor, A)  # (N, p)
        X = (members - members.mean(0)).reshape(N, -1) / jnp.sqrt(N - 1.0)
        increments = (D @ gain.T) @ X
        chi2 = d @ d - (A @ d) @ (gain @ d)
        return members + increments.reshape(members.shape), chi2


class ETKF(AbstractEnsembleFilter):
    """The ensemble transform Kalman filter (Bishop et al., Mon. Wea. Rev. 129,
    2001), in the symmetric square-root form of Hunt et al. (2007): deterministic,
    mean-preserving; DAPPER's `EnKF('Sqrt')`."""

    def update(self, members, Y, d, mask, noise, grid, locations):
        del mask, noise, grid, locations
        N = members.shape[0]
        weights, chi2 = _transform(Y / jnp.sqrt(N - 1.0), d)
        mean = members.mean(0)
        return mean + jnp.tensordot(weights, members - mean, axes=1), chi2


class LETKF(AbstractEnsembleFilter):
    """The local ensemble transform Kalman filter (Hunt et al. 2007): every grid
    point analysed with the ETKF on the observations near it, their inverse error
    variances tapered by Gaspari-Cohn with distance (R-localisation; the points are
    vmapped). With an infinite `radius` it is the ETKF.

    **Arguments:**

    - `radius`: localisation radius in the grid's length units (the taper is
      exp(-1/2) at the radius and zero beyond 3.48 radii; Lorenz-96's grid
      spacing is 1), or `None`: `relative_radius` times the domain's shortest
      side (a default that fits any grid: 4 points of Lorenz-96, 10 of KS).
    - `relative_radius`: used when `radius` is `None`.
    - `weight_stride`: local analyses at every `weight_stride`-th grid point along
      each axis only, their ensemble weights (mean weights and transform)
      interpolated linearly to the points between (weight interpolation; Yang,
      Kalnay, Hunt & Bowler, Q. J. R. Meteorol. Soc. 135, 2009): about
      `weight_stride ** ndim` times fewer local `eigh`, most of the filter's cost
      on a CPU. The weights vary on the taper's scale (its support is 3.5
      radii), so a stride up to the radius changes the analysis little (on
      Lorenz-96 and KS the RMSE is the same within its noise: `docs/results.md`).
      `None` (default): the radius in grid points per axis (at least 1: 4 on
      Lorenz-96 with radius 4, 12 on KS); 1: every point analysed (exact).
    """

    radius: float | None = eqx.field(static=True, default=None)
    relative_radius: float = eqx.field(static=True, default=0.1)
    weight_stride: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        super().__check_init__()
        for name in ("radius", "relative_radius"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"localisation {name} must be positive, got {value}")
        stride = self.weight_stride
        if stride is not None and (int(stride) != stride or stride < 1):
            raise ValueError(f"weight_stride must be a positive integer, got {stride}")

    def radius_on(self, grid: Grid) -> float:
        """The localisation radius on `grid` (length units)."""
        if self.radius is not None:
            return float(self.radius)
        return self.relative_radius * min(grid.length)

    def strides_on(self, grid: Grid) -> tuple[int, ...]:
        """The weight-interpolation stride along each axis of `grid`."""
        if self.weight_stride is not None:
            return (int(self.weight_stride),) * grid.ndim
        radius = self.radius_on(grid)
        return tuple(max(1, int(radius / dx)) for dx in grid.spacing)

    def needs_locations(self) -> bool:
        return True

    def update(self, members, Y, d, mask, noise, grid, locations):
        del mask, noise
        N = members.shape[0]
        strides = self.strides_on(grid)
        coarse = [
            _coarse_indices(n, stride, grid.boundary)
            for n, stride in zip(grid.shape, strides, strict=True)
        ]
        points = grid_points(grid)
        interpolated = max(strides) > 1
        if interpolated:
            points = points.reshape(*grid.shape, grid.ndim)[np.ix_(*coarse)]
            points = points.reshape(-1, grid.ndim)
        roots = jnp.sqrt(
            taper(grid_distances(grid, points, locations), self.radius_on(grid))
        )  # (analysed points, p)
        A = Y / jnp.sqrt(N - 1.0)
        weights = jax.vmap(lambda root: _transform(A * root, d * root)[0])(roots)
        if interpolated:  # along each axis in turn
            weights = weights.reshape(*(len(c) for c in coarse), N, N)
            for axis, (n, c) in enumerate(zip(grid.shape, coarse, strict=True)):
                if len(c) == n:  # every point of this axis analysed
                    continue
                matrix = _interpolation(n, c, grid.boundary).astype(weights.dtype)
                weights = jnp.moveaxis(
                    jnp.tensordot(matrix, weights, axes=(1, axis)), 0, axis
                )
            weights = weights.reshape(-1, N, N)
        mean = members.mean(0)
        X = (members - mean).reshape(N, -1)
        analysed = mean.reshape(-1) + jnp.einsum("pij,jp->ip", weights, X)
        return analysed.reshape(members.shape), _chi2(A, d)


def _coarse_indices(n: int, stride: int, boundary: str) -> np.ndarray:
    """The indices of one axis of `n` points analysed with `stride`: every
    `stride`-th from 0, and the last point on a non-periodic axis (its weights are
    not extrapolated)."""
    indices = np.arange(0, n, stride)
    if boundary != "periodic" and indices[-1] != n - 1:
        indices = np.append(indices, n - 1)
    return indices


def _interpolation(n: int, coarse: np.ndarray, boundary: str) -> np.ndarray:
    """The `(n, len(coarse))` matrix of linear interpolation from the `coarse`
    indices of an axis to all `n` (wrapping round on a periodic axis)."""
    ends = np.append(coarse, coarse[0] + n) if boundary == "periodic" else coarse
    matrix = np.zeros((n, len(coarse)))
    for i in range(n):  # between ends[j] and ends[j + 1] (ends[0] = 0 <= i)
        j = min(np.searchsorted(ends, i, side="right") - 1, len(ends) - 2)
        fraction = (i - ends[j]) / (ends[j + 1] - ends[j])
        matrix[i, j % len(coarse)] += 1 - fraction
        matrix[i, (j + 1) % len(coarse)] += fraction
    return matrix


class HybridCovariance(AbstractCovariance):
    """`B = (1 - beta) B_s + beta (L o P_e)`: a static covariance blended with the
    localised covariance of an ensemble (hybrid ensemble-variational B; Hamill &
    Snyder, Mon. Wea. Rev. 128, 2000; Lorenc, Q. J. R. Meteorol. Soc. 129, 2003).

    Applied through the extended control-variable transform (no matrix):
    `S (v, alpha) = sqrt(1 - beta) S_s v + sqrt(beta) sum_k a_k o (L^1/2 alpha_k)`,
    `a_k` the k-th member's anomaly over `sqrt(N - 1)`; the control is the pair
    `(v, alpha)` with `alpha` of shape `(N, *grid)` (`(N,)` without localisation).

    **Arguments:**

    - `static`: `B_s`.
    - `anomalies`: the ensemble's anomalies `(N, *grid)` (members minus their
      mean; divided by `sqrt(N - 1)` here).
    - `weight`: `beta` in `[0, 1]`, the ensemble's share.
    - `localisation`: `L` as a correlation covariance (its `sqrt` is applied to
      each `alpha_k`, e.g. `gaspari_cohn_correlation`), or `None`.
    """

    static: AbstractCovariance
    anomalies: Float[Array, "member ..."]
    weight: Float[Array, ""] = eqx.field(converter=jnp.asarray)
    localisation: AbstractCovariance | None = None

    def __init__(self, static, anomalies, weight, localisation=None):
        self.static = static
        N = anomalies.shape[0]
        self.anomalies = anomalies / jnp.sqrt(N - 1.0)
        self.weight = weight
        self.localisation = localisation

    def __check_init__(self):
        if self.anomalies.shape[0] < 2:
            raise ValueError("a hybrid covariance needs at least 2 members")
        if isinstance(self.weight, jax.core.Tracer):
            return
        if not 0 <= float(self.weight) <= 1:
            raise ValueError(f"hybrid weight must be in [0, 1], got {self.weight}")

    def zeros_control(self, x):
        N = self.anomalies.shape[0]
        alpha = (N, *x.shape) if self.localisation is not None else (N,)
        return (jnp.zeros_like(x), jnp.zeros(alpha, x.dtype))

    def sqrt(self, v):
        v_s, alpha = v
        out = jnp.sqrt(1 - self.weight) * self.static.sqrt(v_s)
        if self.localisation is not None:
            alpha = jax.vmap(self.localisation.sqrt)(alpha)
            ensemble = jnp.sum(self.anomalies * alpha, axis=0)
        else:
            ensemble = jnp.tensordot(alpha, self.anomalies, axes=1)
        return out + jnp.sqrt(self.weight) * ensemble

    def sqrt_transpose(self, x):
        v_s = jnp.sqrt(1 - self.weight) * self.static.sqrt_transpose(x)
        if self.localisation is not None:
            alpha = jax.vmap(self.localisation.sqrt_transpose)(self.anomalies * x)
        else:
            axes = tuple(range(1, self.anomalies.ndim))
            alpha = jnp.sum(self.anomalies * x, axis=axes)
        return (v_s, jnp.sqrt(self.weight) * alpha)

    def whiten(self, x):
        """The smallest control of the increment `x`: `S^T B^-1 x`, with `B^-1 x`
        by lineax CG (matrix-free; for diagnostics: the background term of the
        cost at a state)."""
        operator = lx.FunctionLinearOperator(
            self.apply,
            jax.eval_shape(lambda: x),
            tags=frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag}),
        )
        solver = lx.CG(rtol=1e-8, atol=1e-12, max_steps=500)
        solution = lx.linear_solve(operator, x, solver, throw=False)
        return self.sqrt_transpose(solution.value)


class HybridEnVar(AbstractEnsembleAnalyser):
    """Hybrid ensemble-variational 4D-Var (3D-Var with one observation time): each
    window is analysed by `variational` with `B = HybridCovariance(static, forecast
    ensemble, weight, localisation)`, from the ensemble mean; the ensemble is
    cycled by `filter` (ETKF or LETKF through the window) and recentred on the
    variational analysis before its forecast to the next window (the usual
    coupling of an ensemble of data assimilations to the deterministic analysis;
    Clayton, Lorenc & Barker, Q. J. R. Meteorol. Soc. 139, 2013).

    **Arguments:**

    - `variational`: the `Variational` analyser (its solver and iteration cap).
    - `filter`: the ensemble filter that cycles the members.
    - `weight`: the ensemble's share `beta` of `B`.
    - `localisation_radius`: Gaspari-Cohn localisation of the ensemble part on
      periodic grids (grid length units), or `None`: `relative_radius` times the
      domain's shortest side, or no localisation if that is `None` too.
    - `relative_radius`: see `localisation_radius`.
    - `static_variance`: `"ensemble"`: the static `B` rescaled in every window so
      that its mean variance is the forecast ensemble's (its correlations kept:
      the static part then needs no tuning of its scale, which a climatological
      `B` far above the forecast errors would otherwise need); `"as_is"`: the
      problem's `B` as configured.
    """

    variational: Variational
    filter: AbstractEnsembleFilter
    weight: float = eqx.field(static=True, default=0.5)
    localisation_radius: float | None = eqx.field(static=True, default=None)
    relative_radius: float | None = eqx.field(static=True, default=None)
    static_variance: str = eqx.field(static=True, default="ensemble")

    def __check_init__(self):
        if not 0 <= self.weight <= 1:
            raise ValueError(f"hybrid weight must be in [0, 1], got {self.weight}")
        if self.static_variance not in ("ensemble", "as_is"):
            raise ValueError(
                "static_variance must be 'ensemble' or 'as_is', got "
                f"{self.static_variance!r}"
            )

    def covariance(self, problem: WindowProblem, ensemble: Ensemble):
        """The window's hybrid `B` from the forecast ensemble (the static `B` itself
        at weight 0: the extended control would only add zero directions, and
        lineax's CG, whose tolerance is relative per element, stops at once on a
        right-hand side with exact zeros)."""
        static = problem.background_covariance
        if self.static_variance == "ensemble":
            variance = jnp.mean(ensemble.spread**2)
            static = ScaledCovariance(
                static, jnp.sqrt(variance / static.mean_variance())
            )
        if self.weight == 0:
            return static
        grid = problem.simulator.model.grid
        radius, localisation = self.localisation_radius, None
        if radius is None and self.relative_radius is not None:
            radius = self.relative_radius * min(grid.length)
        if radius is not None:
            localisation = gaspari_cohn_correlation(grid, radius)
        return HybridCovariance(
            static,
            ensemble.anomalies,
            self.weight,
            localisation,
        )

    def analyse_window(self, problem, window, background):
        hybrid = problem.with_background_covariance(
            self.covariance(problem, background)
        )
        mean = background.mean
        analysis, info = self.variational(hybrid, window, mean)
        model = hybrid.tolerating_blow_up()
        n = window.n_times
        start = model.analysis(model.initial_control(window, mean), mean)
        first = model.trajectory(start, n)
        trajectory = model.trajectory(analysis, n)
        ensemble = self.filter.filter_window(problem, window, background)
        forecast = model.forecast(analysis, trajectory)
        members = ensemble["forecast"].members
        members = members - members.mean(0) + forecast
        steps = jnp.stack([0, info.steps])
        return {
            "analysis": analysis,
            "info": info,
            "first": first,
            "trajectory": trajectory,
            "spread": ensemble["spread"],
            "cost": info.cost[steps],
            "grad_norm": info.grad_norm[steps],
            "forecast": Ensemble(members, ensemble["forecast"].key),
            "adaptation": None,
        }
