"""Scores against hand-computed values on tiny arrays."""

import numpy as np
import pytest

from assim._metrics import effective_resolution, innovation_statistics, mu_score, rmse


def test_rmse_by_hand():
    # differences (1, -1, 3, 1): mean square 12 / 4 = 3
    assert rmse(estimate=[2, 0, 3, 1], reference=[1, 1, 0, 0]) == pytest.approx(3**0.5)
    # masked: differences (1, 3): mean square 5
    assert rmse(
        estimate=[2, 0, 3, 1], reference=[1, 1, 0, 0], mask=[1, 0, 1, 0]
    ) == pytest.approx(5**0.5)
    with pytest.raises(ValueError, match="selects no value"):
        rmse(estimate=[1.0], reference=[0.0], mask=[False])


def test_mu_score_by_hand_and_not_symmetric():
    truth = np.array([3.0, -4.0])  # RMS = sqrt(12.5)
    estimate = np.array([2.0, -4.0])  # RMSE = sqrt(0.5)
    assert mu_score(estimate=estimate, truth=truth) == pytest.approx(
        1 - np.sqrt(0.5) / np.sqrt(12.5)
    )  # = 0.8
    assert mu_score(estimate=estimate, truth=truth) == pytest.approx(0.8)
    # Swapping reference and estimate changes the score: the keywords matter.
    assert mu_score(estimate=truth, truth=estimate) != pytest.approx(0.8)
    assert mu_score(estimate=truth, truth=truth) == 1.0


def test_effective_resolution_by_hand():
    n, dx = 16, 1.0
    x = np.arange(n) * dx
    # Truth: modes k = 1/16, 2/16, 4/16 cycles per unit, unit amplitude each.
    truth = sum(np.cos(2 * np.pi * m * x / n) for m in (1, 2, 4))[None, :]
    # The estimate keeps the two largest scales and misses the m = 4 one entirely:
    # error / truth power is 0 at m = 1, 2 and 1 at m = 4; m = 3 (and up) has no truth
    # power and is skipped. The 0.5 crossing lies halfway between m = 2 and m = 4:
    # k = 3 / 16 cycles per unit, a wavelength of 16 / 3.
    estimate = sum(np.cos(2 * np.pi * m * x / n) for m in (1, 2))[None, :]
    assert effective_resolution(estimate=estimate, truth=truth, spacing=dx) == (
        pytest.approx(16 / 3)
    )
    # A perfect estimate resolves down to the grid scale.
    assert effective_resolution(estimate=truth, truth=truth, spacing=dx) == 2.0


def test_innovation_statistics_by_hand():
    stats = innovation_statistics(
        observations=[1.0, 2.0, 5.0, 9.0],
        forecast=[0.0, 0.0, 4.0, 0.0],
        error_std=[1.0, 2.0, 1.0, 1.0],
        mask=[True, True, True, False],
    )
    # d = (1, 2, 1); d / sigma = (1, 1, 1)
    assert stats["mean"] == pytest.approx(4 / 3)
    assert stats["std"] == pytest.approx(np.std([1, 2, 1]))
    assert stats["chi2_normalised"] == pytest.approx(1.0)
    assert stats["count"] == 3


@pytest.mark.parametrize("burn_in", [0, 3, 5])
def test_run_scores_accumulated_by_window_equal_whole_run_scores(burn_in):
    """`assim-run` scores window by window (no run-long arrays): the same numbers
    as the scores of the whole run at once, after its first `burn_in` times."""
    from types import SimpleNamespace

    import simulators as sim
    from assim import ObservationSet, Scores

    rng = np.random.default_rng(0)
    grid = sim.Grid((6, 10), (1.0, 2.0))
    truth = np.cumsum(rng.normal(size=(8, 6, 10)), axis=-1)  # red: power falls
    analysis = truth + 0.7 * rng.normal(size=truth.shape)  # white: crosses half
    background = truth + rng.normal(size=truth.shape)
    values = truth + 0.1 * rng.normal(size=truth.shape)
    mask = rng.random(truth.shape) < 0.4
    heldout = rng.random((6, 10)) < 0.2
    scores = Scores(grid, snapshot_times={0, 5}, burn_in=burn_in)
    for k in range(0, 8, 4):  # two windows of 4 times
        part = slice(k, k + 4)
        window = ObservationSet(
            values[part],
            mask[part],
            np.ones((4, 6, 10)),
            np.arange(k, k + 4.0),
            truth[part],
        ).withhold(heldout)
        result = SimpleNamespace(
            analysis=analysis[part],
            background=background[part],
            times=np.arange(k, k + 4.0),
            window=window,
        )
        scores.add(result)
    found = scores.metrics()
    held = mask & heldout
    used = mask & ~held
    whole_run = rmse(estimate=analysis, reference=truth)
    s = slice(burn_in, None)  # the scored times
    analysis, truth, background, values = (
        analysis[s],
        truth[s],
        background[s],
        values[s],
    )
    held, used = held[s], used[s]
    expected = {
        "rmse_obs_assimilated": rmse(estimate=analysis, reference=values, mask=used),
        "rmse_obs_heldout": rmse(estimate=analysis, reference=values, mask=held),
        "rmse_background_obs_heldout": rmse(
            estimate=background, reference=values, mask=held
        ),
        "rmse_truth": rmse(estimate=analysis, reference=truth),
        "rmse_background": rmse(estimate=background, reference=truth),
        "mu_score": mu_score(estimate=analysis, truth=truth),
        "effective_resolution": effective_resolution(
            estimate=analysis, truth=truth, spacing=grid.spacing[-1]
        ),
    }
    assert 2 * grid.spacing[-1] < expected["effective_resolution"] < 2.0
    for key, value in expected.items():
        np.testing.assert_allclose(found[key], value, rtol=1e-12, err_msg=key)
    # The Desroziers statistics over the scored, assimilated observations.
    d_ob, d_oa = (values - background)[used], (values - analysis)[used]
    desroziers = found["desroziers"]
    assert desroziers["observations"] == used.sum()
    np.testing.assert_allclose(
        desroziers["observation_error_variance_ratio"],
        np.mean(d_oa * d_ob),  # R = 1 assumed
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        desroziers["background_error_std_obs_space"] ** 2,
        np.mean((d_ob - d_oa) * d_ob),
        rtol=1e-12,
    )
    np.testing.assert_allclose(desroziers["mean_o_minus_b"], d_ob.mean(), rtol=1e-12)
    # Burn-in leaves times out of the scores only: not out of the run.
    assert (found["rmse_truth"] == whole_run) == (burn_in == 0)
    assert scores.times == 8
    assert sorted(scores.snapshots) == [0, 5]
    np.testing.assert_array_equal(
        scores.snapshots[5]["analysis"], analysis[5 - burn_in]
    )
    np.testing.assert_array_equal(scores.snapshots[5]["truth"], truth[5 - burn_in])
    seen = scores.snapshots[5]["observations"]
    np.testing.assert_array_equal(np.isfinite(seen), mask[5])
    with pytest.raises(ValueError, match="burn_in"):
        Scores(grid, burn_in=-1)
