"""Twin-experiment pieces (sensors, splits, missing term) and cycling."""

import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import simulators as sim
from assim import (
    AnalysisWriter,
    DiffusionCovariance,
    ObservationSet,
    Variational,
    WindowProblem,
    analysis_dataset,
    cycle,
    incremental,
)
from assim._twin import MissingTerm, run_twin, sensor_mask


def test_sensor_patterns():
    grid = sim.Grid((40, 50), (1.0, 1.0))
    rng = np.random.default_rng(0)
    stations = sensor_mask(grid, 5, rng, pattern="stations", density=0.05)
    assert stations.shape == (5, 40, 50)
    assert stations.sum(axis=(1, 2)).tolist() == [100] * 5
    assert np.all(stations == stations[0])  # fixed
    tracks = sensor_mask(grid, 5, rng, pattern="tracks", density=0.05)
    assert np.allclose(tracks.mean(axis=(1, 2)), 0.05, atol=0.015)
    assert not np.all(tracks == tracks[0])  # moving
    dropped = sensor_mask(grid, 50, rng, pattern="stations", density=0.5, dropout=0.3)
    assert abs(dropped.mean() - 0.35) < 0.02
    with pytest.raises(ValueError, match="density"):
        sensor_mask(grid, 2, rng, density=0.0)
    with pytest.raises(ValueError, match="pattern"):
        sensor_mask(grid, 2, rng, pattern="drifters")


def test_twin_splits_and_noise():
    grid = sim.Grid((16,), (1.0,))
    truth = sim.Simulator(
        sim.AdvectionDiffusion(grid, 0.01, [0.3]), sim.crank_nicolson(), 0.02
    )
    u0 = jnp.sin(2 * jnp.pi * grid.mesh()[0])
    twin = run_twin(
        truth,
        u0,
        n_times=20,
        observation_interval=2,
        spinup_steps=3,
        noise_std=0.1,
        window_length=2,
        splits=(0.6, 0.2, 0.2),
        rng=np.random.default_rng(0),
        sensors={"density": 1.0},
    )
    assert twin.split.tolist() == [0] * 12 + [1] * 4 + [2] * 4  # contiguous
    np.testing.assert_allclose(twin.truth[0], truth.rollout(u0, 3)[-1], atol=1e-12)
    noise = twin.obs - twin.truth
    assert 0.08 < noise.std() < 0.12
    with pytest.raises(ValueError, match="multiple of window_length"):
        run_twin(
            truth,
            u0,
            n_times=5,
            observation_interval=1,
            spinup_steps=0,
            noise_std=0.1,
            window_length=2,
            splits=(1, 0, 0),
            rng=np.random.default_rng(0),
            sensors={},
        )


def test_missing_term():
    u = jnp.asarray([1.0, -2.0])
    np.testing.assert_allclose(MissingTerm("cubic", 0.5)(u), [-0.5, 4.0])
    np.testing.assert_allclose(MissingTerm("decay", 0.5)(u), [-0.5, 1.0])
    with pytest.raises(ValueError, match="missing term"):
        MissingTerm("quadratic", 1.0)


def test_cycle_background_is_previous_forecast(tmp_path):
    grid = sim.Grid((16,), (1.0,))
    model = sim.Simulator(
        sim.AdvectionDiffusion(grid, 0.01, [0.3]), sim.crank_nicolson(), 0.02
    )
    x = grid.mesh()[0]
    states = model.rollout(jnp.sin(2 * jnp.pi * x), 11)[::2]  # 6 times, interval 2
    windows = [
        ObservationSet(
            states[k : k + 3],
            jnp.ones((3, 16), bool),
            jnp.full((3, 16), 0.05),
            jnp.arange(k, k + 3) * 0.04,
        )
        for k in (0, 3)
    ]
    problem = WindowProblem(model, DiffusionCovariance(grid, 0.5, 0.1), 2)
    analyser = Variational(incremental(), max_steps=3)
    results = list(cycle(analyser, problem, windows, jnp.zeros(16)))
    assert len(results) == 2
    expected = model.rollout(jnp.asarray(results[0].analysis[-1]), 2)[-1]
    np.testing.assert_allclose(results[1].background[0], expected, atol=1e-10)
    # Perfect observations everywhere: the second window starts close and ends closer.
    assert results[1].diagnostics["innovation_std"] < 0.1
    assert np.abs(results[1].analysis - np.asarray(states[3:6])).max() < 0.05
    # Written window by window: the same file as the dataset built in memory.
    kappa = (np.full(16, 0.01), {"units": "length2 time-1", "long_name": "kappa"})
    with AnalysisWriter(tmp_path / "a.nc", grid=grid, attrs={"k": "v"}) as writer:
        for result in results:
            writer.append(result)
            assert writer.summaries[-1].analysis is None  # states not kept
        writer.close({"kappa": kappa})
    expected = analysis_dataset(
        results, grid=grid, parameters={"kappa": kappa}, attrs={"k": "v"}
    )
    with xr.open_dataset(tmp_path / "a.nc") as written:
        xr.testing.assert_identical(written.load(), expected)
    # An error mid-run leaves neither the file nor its temporary.
    with (
        pytest.raises(RuntimeError, match="solver died"),
        AnalysisWriter(tmp_path / "b.nc", grid=grid) as writer,
    ):
        writer.append(results[0])
        raise RuntimeError("solver died")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nc"]


def test_sliding_windows_assimilate_each_observation_once():
    """Windows of 3 times sliding by 1 (4D-Var lag 2): each window's background is
    the previous analysis one observation time on, only its newest observation is
    assimilated, and the results report each time once (the first window's three,
    then each window's newest)."""
    grid = sim.Grid((16,), (1.0,))
    model = sim.Simulator(
        sim.AdvectionDiffusion(grid, 0.01, [0.3]), sim.crank_nicolson(), 0.02
    )
    x = grid.mesh()[0]
    states = model.rollout(jnp.sin(2 * jnp.pi * x), 11)[::2]  # 6 times, interval 2
    windows = [
        ObservationSet(
            states[k : k + 3],
            jnp.ones((3, 16), bool),
            jnp.full((3, 16), 0.05),
            jnp.arange(k, k + 3) * 0.04,
            states[k : k + 3],
        )
        for k in range(4)
    ]
    problem = WindowProblem(model, DiffusionCovariance(grid, 0.5, 0.1), 2)
    analyser = Variational(incremental(), max_steps=3)
    results = list(cycle(analyser, problem, windows, jnp.zeros(16), shift=1))
    np.testing.assert_allclose(
        np.concatenate([r.times for r in results]), np.arange(6) * 0.04
    )
    assert [r.analysis.shape[0] for r in results] == [3, 1, 1, 1]
    # Every observation assimilated exactly once over the run.
    assert sum(int(r.window.mask.sum()) for r in results) == 6 * 16
    # Window 1 starts from window 0's analysis at its second time: its background
    # at its newest time is that state run two intervals on.
    expected = model.rollout(jnp.asarray(results[0].analysis[1]), 4)[-1]
    np.testing.assert_allclose(results[1].background[0], expected, atol=1e-10)
    assert results[-1].diagnostics["rmse_truth_analysis"] < 0.02
    with pytest.raises(ValueError, match="shift"):
        next(cycle(analyser, problem, windows, jnp.zeros(16), shift=0))
