"""Scores of an analysis: RMSEs, the normalised mu score, effective resolution,
innovation statistics. Reference first or estimate first is fixed by keyword-only
arguments, so the two can never be swapped silently."""

import numpy as np


def rmse(*, estimate, reference, mask=None) -> float:
    """Root-mean-square of `estimate - reference`, over `mask` when given."""
    diff = np.asarray(estimate, dtype=np.float64) - np.asarray(reference, np.float64)
    if mask is not None:
        mask = np.broadcast_to(np.asarray(mask, bool), diff.shape)
        if not mask.any():
            raise ValueError("rmse: the mask selects no value")
        diff = diff[mask]
    return float(np.sqrt(np.mean(diff**2)))


def mu_score(*, estimate, truth) -> float:
    """`mu = 1 - RMSE(estimate - truth) / RMS(truth)` (1 is perfect, 0 is as bad as
    predicting zero), as used by the ocean-mapping data challenges (Le Guillou et
    al., J. Atmos. Oceanic Technol. 38, 2021)."""
    truth = np.asarray(truth, dtype=np.float64)
    rms = float(np.sqrt(np.mean(truth**2)))
    if rms == 0:
        raise ValueError("mu_score: the truth is identically zero")
    return 1.0 - rmse(estimate=estimate, reference=truth) / rms


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
