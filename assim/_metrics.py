"""Scores of an analysis: RMSEs, the normalised mu score, effective resolution,
innovation statistics. Reference first or estimate first is fixed by keyword-only
arguments, so the two can never be swapped silently."""

from collections import defaultdict

import numpy as np


class RootMeanSquare:
    """A root-mean-square accumulated over parts (e.g. window by window), so that
    no part needs to stay in memory: `add` values, read `value`."""

    def __init__(self):
        self.sum = 0.0
        self.count = 0

    def add(self, values, mask=None) -> "RootMeanSquare":
        values = np.asarray(values, dtype=np.float64)
        if mask is not None:
            values = values[np.broadcast_to(np.asarray(mask, bool), values.shape)]
        self.sum += float(np.sum(values**2))
        self.count += values.size
        return self

    @property
    def value(self) -> float | None:
        """The RMS so far (`None` before any value)."""
        return float(np.sqrt(self.sum / self.count)) if self.count else None


def rmse(*, estimate, reference, mask=None) -> float:
    """Root-mean-square of `estimate - reference`, over `mask` when given."""
    diff = np.asarray(estimate, dtype=np.float64) - np.asarray(reference, np.float64)
    value = RootMeanSquare().add(diff, mask).value
    if value is None:
        raise ValueError("rmse: the mask selects no value")
    return value


def mu_from_rms(error_rms: float, truth_rms: float) -> float:
    """`1 - RMSE / RMS(truth)` from the two root-mean-squares (see `mu_score`)."""
    if truth_rms == 0:
        raise ValueError("mu_score: the truth is identically zero")
    return 1.0 - error_rms / truth_rms


def mu_score(*, estimate, truth) -> float:
    """`mu = 1 - RMSE(estimate - truth) / RMS(truth)` (1 is perfect, 0 is as bad as
    predicting zero), as used by the ocean-mapping data challenges (Le Guillou et
    al., J. Atmos. Oceanic Technol. 38, 2021)."""
    truth = np.asarray(truth, dtype=np.float64)
    return mu_from_rms(
        rmse(estimate=estimate, reference=truth),
        RootMeanSquare().add(truth).value,
    )


def effective_resolution(*, estimate, truth, spacing: float) -> float:
    """The smallest wavelength the estimate resolves (Ballarotta et al., Ocean Sci.
    15, 2019): where the power spectrum of the error along `x` (the last axis,
    averaged over the others) reaches half that of the truth, with linear
    interpolation between wavenumbers (those where the truth has no power are
    skipped). Returns `2 * spacing` (the Nyquist wavelength) when the error never
    reaches half the truth's power. Over data seen in parts (window by window):
    add up `error_spectra` of the parts, then `resolution_from_spectra`.
    """
    return resolution_from_spectra(
        *error_spectra(estimate=estimate, truth=truth),
        n=np.shape(truth)[-1],
        spacing=spacing,
    )


def error_spectra(*, estimate, truth) -> tuple[np.ndarray, np.ndarray]:
    """`(error power, truth power)` along the last axis, summed over the others:
    additive over parts of the data."""
    estimate = np.asarray(estimate, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if estimate.shape != truth.shape:
        raise ValueError(
            f"effective_resolution: shapes differ {estimate.shape} vs {truth.shape}"
        )
    axes = tuple(range(truth.ndim - 1))
    return (
        np.sum(np.abs(np.fft.rfft(estimate - truth, axis=-1)) ** 2, axis=axes),
        np.sum(np.abs(np.fft.rfft(truth, axis=-1)) ** 2, axis=axes),
    )


def resolution_from_spectra(psd_err, psd_true, *, n: int, spacing: float) -> float:
    """`effective_resolution` from (summed or averaged) `error_spectra` of data
    with `n` points along `x`."""
    psd_err, psd_true = np.asarray(psd_err), np.asarray(psd_true)
    k = np.fft.rfftfreq(n, d=spacing)[1:]  # cycles per length unit
    psd_err, psd_true = psd_err[1:], psd_true[1:]
    # Wavenumbers where the truth has no power carry no information: drop them.
    keep = psd_true > 1e-12 * psd_true.max()
    k, ratio = k[keep], psd_err[keep] / psd_true[keep]
    above = np.nonzero(ratio >= 0.5)[0]
    if above.size == 0:
        return 2.0 * spacing
    i = above[0]
    if i == 0:
        return float(1.0 / k[0])
    # Linear interpolation of the crossing between k[i-1] and k[i].
    t = (0.5 - ratio[i - 1]) / (ratio[i] - ratio[i - 1])
    return float(1.0 / (k[i - 1] + t * (k[i] - k[i - 1])))


def innovation_statistics(*, observations, forecast, error_std, mask) -> dict:
    """Mean and std of the innovations `d = y - H x` over reporting sensors, and the
    normalised chi-square `mean((d / sigma)^2)` (1 when the errors match `sigma`)."""
    mask = np.asarray(mask, bool)
    d = (np.asarray(observations, np.float64) - np.asarray(forecast, np.float64))[mask]
    sigma = np.broadcast_to(np.asarray(error_std, np.float64), mask.shape)[mask]
    if d.size == 0:
        raise ValueError("innovation_statistics: no reporting sensor")
    return {
        "mean": float(np.mean(d)),
        "std": float(np.std(d)),
        "chi2_normalised": float(np.mean((d / sigma) ** 2)),
        "count": int(d.size),
    }


class Scores:
    """A run's scores accumulated window by window from `WindowResult`s, so that no
    window's states need to stay in memory: RMSE against the assimilated and the
    withheld observations (analysis and background), against the truth when the
    windows have one (with the mu score, and the effective resolution on 2D grids),
    the RMSE per observation time (for plots), and snapshots of the analysis at
    chosen time indices.

    **Arguments:**

    - `grid`: the states' grid (spacing for the effective resolution).
    - `snapshot_times`: positions in the run's sequence of analysed times whose
      states are kept (`snapshots`: the analysis, the observations and the truth
      there).
    - `burn_in`: the run's first `burn_in` analysed times are left out of the
      scores (the spin-up of a cycled run from a poor first background); the
      series per time and the snapshots keep them.
    """

    def __init__(self, grid, snapshot_times=(), burn_in: int = 0):
        if burn_in < 0:
            raise ValueError(f"burn_in must be non-negative, got {burn_in}")
        self.grid = grid
        self.burn_in = int(burn_in)
        self.rms = defaultdict(RootMeanSquare)
        self.spectra = None
        self.truth = True
        self.times = 0
        self.snapshot_times = set(int(t) for t in snapshot_times)
        self.snapshots: dict[int, np.ndarray] = {}
        self.series = defaultdict(list)  # RMSE per observation time
        self.desroziers = defaultdict(float)

    def add(self, result) -> None:
        """Score one window's result (its `window` holds the observations, the
        withheld ones included)."""
        window = result.window
        analysis = np.asarray(result.analysis, np.float64)
        background = np.asarray(result.background, np.float64)
        predicted = np.asarray(window.operator(analysis), np.float64)
        predicted_b = np.asarray(window.operator(background), np.float64)
        values = np.asarray(window.values, np.float64)
        used = np.asarray(window.mask, bool)
        held = (
            np.zeros_like(used)
            if window.withheld is None
            else np.asarray(window.withheld, bool)
        )
        # Times of the burn-in: kept in the series, out of the scores.
        scored = self.times + np.arange(len(result.times)) >= self.burn_in
        scored_obs = scored.reshape((-1,) + (1,) * (used.ndim - 1))
        scored_state = scored.reshape((-1,) + (1,) * (analysis.ndim - 1))
        used_scored, held_scored = used & scored_obs, held & scored_obs
        self.rms["obs_assimilated"].add(predicted - values, used_scored)
        self.rms["background_obs_assimilated"].add(predicted_b - values, used_scored)
        self.rms["obs_heldout"].add(predicted - values, held_scored)
        self.rms["background_obs_heldout"].add(predicted_b - values, held_scored)
        self._add_desroziers(values, predicted, predicted_b, window, used_scored)
        if getattr(result, "spread", None) is not None:  # ensembles only
            spread = np.asarray(result.spread, np.float64)
            self.rms["spread"].add(spread, scored_state)
        for k in range(len(result.times)):
            if self.times + k in self.snapshot_times:
                self.snapshots[self.times + k] = self._snapshot(result, k)
        self.times += len(result.times)
        self.series["time"].extend(np.asarray(result.times).tolist())
        per_time = tuple(range(1, analysis.ndim))
        self.truth = self.truth and window.truth is not None
        if not self.truth:
            reported = used | held
            axes = tuple(range(1, values.ndim))
            error = np.where(reported, predicted - values, 0.0) ** 2
            self.series["analysis"].extend(
                np.sqrt(error.sum(axes) / np.maximum(reported.sum(axes), 1))
            )
            return
        truth = np.asarray(window.truth, np.float64)
        self.rms["truth"].add(analysis - truth, scored_state)
        self.rms["background_truth"].add(background - truth, scored_state)
        self.rms["truth_norm"].add(truth, scored_state)
        for key, state in (("analysis", analysis), ("background", background)):
            self.series[key].extend(np.sqrt(np.mean((state - truth) ** 2, per_time)))
        if self.grid.ndim == 2 and scored.any():
            spectra = error_spectra(estimate=analysis[scored], truth=truth[scored])
            self.spectra = (
                spectra
                if self.spectra is None
                else tuple(a + b for a, b in zip(self.spectra, spectra, strict=True))
            )

    def _add_desroziers(self, values, predicted, predicted_b, window, used) -> None:
        """Sums for the Desroziers et al. (Q. J. R. Meteorol. Soc. 131, 2005)
        consistency checks over the assimilated observations: `E[d_oa d_ob] = R`,
        `E[d_ab d_ob] = H B H^T` (diagonals, averaged), with `d_ob = y - H x_b`,
        `d_oa = y - H x_a`, `d_ab = H x_a - H x_b`."""
        std = np.broadcast_to(np.asarray(window.error_std, np.float64), used.shape)
        d_ob, d_oa = (values - predicted_b)[used], (values - predicted)[used]
        d_ab = (predicted - predicted_b)[used]
        sums = self.desroziers
        sums["count"] += d_ob.size
        sums["oa_ob"] += float(np.sum(d_oa * d_ob))
        sums["ab_ob"] += float(np.sum(d_ab * d_ob))
        sums["r"] += float(np.sum(std[used] ** 2))
        sums["oa"] += float(np.sum(d_oa))
        sums["ob"] += float(np.sum(d_ob))

    def desroziers_metrics(self) -> dict | None:
        """The Desroziers statistics of the scored, assimilated observations
        (`None` before any): the observation-error std assumed (`R`'s mean
        variance, square-rooted) and estimated (`sqrt(mean d_oa d_ob)`), their
        variance ratio (1 when `R` is right), the background-error std in
        observation space (`sqrt(mean d_ab d_ob)`), and the O-A / O-B means and
        RMSs."""
        sums = self.desroziers
        n = sums["count"]
        if not n:
            return None
        oa_ob, ab_ob, r = sums["oa_ob"] / n, sums["ab_ob"] / n, sums["r"] / n
        root = lambda v: float(np.sqrt(v)) if v >= 0 else None  # noqa: E731
        return {
            "observation_error_std_assumed": root(r),
            "observation_error_std_estimated": root(oa_ob),
            "observation_error_variance_ratio": oa_ob / r,
            "background_error_std_obs_space": root(ab_ob),
            "mean_o_minus_a": sums["oa"] / n,
            "mean_o_minus_b": sums["ob"] / n,
            "rms_o_minus_a": self.rms["obs_assimilated"].value,
            "rms_o_minus_b": self.rms["background_obs_assimilated"].value,
            "observations": int(n),
        }

    @staticmethod
    def _snapshot(result, k: int) -> dict:
        """The analysis at the window's `k`-th time, with the observations there
        (NaN where none; grid-point sensors only) and the truth when known."""
        window = result.window
        snapshot = {"time": float(result.times[k]), "analysis": result.analysis[k]}
        values = np.asarray(window.values[k], np.float64)
        if values.shape == snapshot["analysis"].shape:
            seen = np.asarray(window.mask[k], bool)
            if window.withheld is not None:
                seen = seen | np.asarray(window.withheld[k], bool)
            snapshot["observations"] = np.where(seen, values, np.nan)
        if window.truth is not None:
            snapshot["truth"] = np.asarray(window.truth[k])
        return snapshot

    def metrics(self) -> dict:
        """The scores as `metrics.json` names them (`None` where nothing was
        scored, e.g. no withheld observation)."""
        value = lambda key: self.rms[key].value  # noqa: E731
        found = {
            "rmse_obs_assimilated": value("obs_assimilated"),
            "rmse_background_obs_assimilated": value("background_obs_assimilated"),
            "rmse_obs_heldout": value("obs_heldout"),
        }
        if found["rmse_obs_heldout"] is not None:
            found["rmse_background_obs_heldout"] = value("background_obs_heldout")
        found["desroziers"] = self.desroziers_metrics()
        if value("spread") is not None:
            found["ensemble_spread"] = value("spread")
        if not self.truth:
            found["rmse_background"] = found["rmse_background_obs_assimilated"]
            return found
        found["rmse_truth"] = value("truth")
        found["rmse_background"] = value("background_truth")
        found["mu_score"] = mu_from_rms(found["rmse_truth"], value("truth_norm"))
        if value("spread") is not None:  # 1 for a well-calibrated ensemble
            found["spread_skill_ratio"] = value("spread") / found["rmse_truth"]
        if self.spectra is not None:
            found["effective_resolution"] = resolution_from_spectra(
                *self.spectra,
                n=self.grid.shape[-1],
                spacing=self.grid.spacing[-1],
            )
        return found
