"""Observation files: contract, validation errors, lazy windows."""

import numpy as np
import pytest
import xarray as xr

import simulators as sim
from assim._io import write_netcdf
from assim._observations import (
    ObservationError,
    ObservationSet,
    iter_windows,
    open_observations,
)

GRID = sim.Grid((6, 8), (1.0, 2.0))


def _dataset(n_time=5, std=0.1, with_truth=True):
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(n_time, *GRID.shape))
    obs = truth + std * rng.normal(size=truth.shape)
    obs[rng.random(obs.shape) > 0.3] = np.nan  # ~30% of the grid observed
    obs[:, 0, 0] = 1.0  # at least one sensor per time
    data = {
        "obs": (
            ("time", "y", "x"),
            obs,
            {"ancillary_variables": "obs_error_std", "units": "1"},
        ),
        "obs_error_std": ((), std, {"standard_name": "state standard_error"}),
    }
    if with_truth:
        data["truth"] = (("time", "y", "x"), truth)
    return xr.Dataset(
        data,
        coords={
            "time": ("time", np.arange(n_time) * 0.5, {"units": "model time units"}),
            "y": ("y", np.asarray(GRID.coordinates(0)), {"units": "m"}),
            "x": ("x", np.asarray(GRID.coordinates(1)), {"units": "m"}),
        },
        attrs={"Conventions": "CF-1.8", "simulator": "AdvectionDiffusion"},
    )


def _write(tmp_path, ds, name="obs.nc"):
    return write_netcdf(ds, tmp_path / name)


def test_round_trip_and_windows(tmp_path):
    ds = _dataset()
    path = _write(tmp_path, ds)
    opened = open_observations(path, grid=GRID)
    window = ObservationSet.from_dataset(opened, slice(1, 3))
    expected = ds["obs"].values[1:3]
    np.testing.assert_array_equal(np.asarray(window.mask), np.isfinite(expected))
    np.testing.assert_allclose(
        np.asarray(window.values), np.where(np.isfinite(expected), expected, 0.0)
    )
    np.testing.assert_allclose(
        np.asarray(window.error_std)[np.asarray(window.mask)], 0.1
    )
    np.testing.assert_allclose(np.asarray(window.times), [0.5, 1.0])
    np.testing.assert_allclose(np.asarray(window.truth), ds["truth"].values[1:3])
    windows = list(iter_windows(opened, 2))
    assert [w.times.tolist() for w in windows] == [[0.0, 0.5], [1.0, 1.5]]


def _mutate(ds, what):
    if what == "missing obs":
        return ds.drop_vars("obs")
    if what == "missing std":
        return ds.drop_vars("obs_error_std")
    if what == "wrong dims":
        return ds.rename_dims({"x": "lon"}).rename_vars({"x": "lon"})
    if what == "negative std":
        return ds.assign(obs_error_std=((), -0.1))
    if what == "zero std field":
        std = np.full(ds["obs"].shape, 0.1)
        std[2, 0, 0] = 0.0
        return ds.assign(obs_error_std=(("time", "y", "x"), std))
    if what == "time order":
        return ds.assign_coords(
            time=("time", [0.0, 1.0, 0.5, 2.0, 3.0], {"units": "s"})
        )
    if what == "no units":
        out = ds.copy()
        out["x"].attrs = {}
        return out
    if what == "truth dims":
        return ds.assign(truth=(("time", "x", "y"), np.zeros((5, 8, 6))))
    raise AssertionError(what)


@pytest.mark.parametrize(
    "what,match",
    [
        ("missing obs", "missing variable 'obs'"),
        ("missing std", "missing variable 'obs_error_std'"),
        ("wrong dims", r"must have dims \(time, x\) or \(time, y, x\)"),
        ("negative std", "'obs_error_std' must be positive"),
        ("time order", "time is not strictly increasing"),
        ("no units", "coordinate 'x' has no units"),
        ("truth dims", "'truth' must have the dims of 'obs'"),
    ],
)
def test_bad_files_fail_with_one_line(tmp_path, what, match):
    path = _write(tmp_path, _mutate(_dataset(), what))
    with pytest.raises(ObservationError, match=match) as info:
        open_observations(path)
    assert "\n" not in str(info.value)


def test_error_std_field_checked_per_window(tmp_path):
    opened = open_observations(_write(tmp_path, _mutate(_dataset(), "zero std field")))
    ObservationSet.from_dataset(opened, slice(0, 2))  # the zero is outside
    with pytest.raises(ObservationError, match="must be positive"):
        ObservationSet.from_dataset(opened, slice(2, 3))


def test_grid_mismatch(tmp_path):
    path = _write(tmp_path, _dataset())
    with pytest.raises(ObservationError, match=r"does not match the simulator grid"):
        open_observations(path, grid=sim.Grid((6, 9), (1.0, 2.0)))
    with pytest.raises(ObservationError, match="coordinate 'x' does not match"):
        open_observations(path, grid=sim.Grid((6, 8), (1.0, 3.0)))


def test_all_nan_window_and_missing_file(tmp_path):
    ds = _dataset()
    obs = ds["obs"].values.copy()
    obs[3] = np.nan
    opened = open_observations(_write(tmp_path, ds.assign(obs=(ds["obs"].dims, obs))))
    with pytest.raises(ObservationError, match="all observations are missing"):
        ObservationSet.from_dataset(opened, slice(3, 4))
    with pytest.raises(ObservationError, match="observation file not found"):
        open_observations(tmp_path / "nope.nc")
    (tmp_path / "junk.nc").write_text("not netcdf")
    with pytest.raises(ObservationError, match="cannot read"):
        open_observations(tmp_path / "junk.nc")


def test_fill_value_reads_as_missing(tmp_path):
    ds = _dataset(with_truth=False)
    path = tmp_path / "filled.nc"
    ds.to_netcdf(path, encoding={"obs": {"_FillValue": -9999.0}})
    window = ObservationSet.from_dataset(open_observations(path))
    assert window.truth is None
    np.testing.assert_array_equal(
        np.asarray(window.mask), np.isfinite(ds["obs"].values)
    )


@pytest.mark.parametrize(
    "what,match",
    [
        ("inf", "'obs' has 1 infinite values"),
        ("all huge", "observations exceed 1e\\+07 times their error std"),
        ("three huge", "3 observations exceed 1e\\+07 times their error std"),
    ],
)
def test_bad_values_fail_with_one_line(tmp_path, what, match):
    """Infinite values and values of a fill or unit error (1e30) are refused when
    their window is read, with one line naming the count and the first place."""
    ds = _dataset()
    obs = ds["obs"].values.copy()
    if what == "inf":
        obs[1, 2, 3] = np.inf
    elif what == "all huge":
        obs[np.isfinite(obs)] = 1e30
    else:
        obs[0, 0, 0] = obs[2, 0, 0] = obs[3, 0, 0] = 1e30
    opened = open_observations(_write(tmp_path, ds.assign(obs=(ds["obs"].dims, obs))))
    with pytest.raises(ObservationError, match=match) as info:
        list(iter_windows(opened, 5))
    assert "\n" not in str(info.value) and "time index" in str(info.value)


def test_string_observations_are_refused(tmp_path):
    ds = _dataset()
    strings = np.full(ds["obs"].shape, "1.0", dtype=object)
    path = tmp_path / "strings.nc"
    ds.assign(obs=(ds["obs"].dims, strings)).to_netcdf(path)
    with pytest.raises(ObservationError, match="'obs' must be numeric"):
        open_observations(path)


def test_quality_control_rejects_gross_errors_and_keeps_fronts():
    """Three observations of 50 in a field of N(0, 1) values are rejected (and only
    they); a front (two regimes 10 apart, 60/40) loses nothing."""
    from assim import quality_control

    rng = np.random.default_rng(1)
    values = rng.normal(size=(4, 50))
    values[1, 3] = values[2, 7] = 50.0
    values[3, 9] = -50.0
    window = ObservationSet(
        values, np.ones_like(values, bool), np.full_like(values, 0.5), np.arange(4.0)
    )
    checked, n = quality_control(window, 10.0)
    assert n == 3
    assert not checked.mask[1, 3] and not checked.mask[2, 7] and not checked.mask[3, 9]
    assert int(checked.mask.sum()) == values.size - 3
    front = np.where(np.arange(50) < 30, 0.0, 10.0) + 0.02 * rng.normal(size=(4, 50))
    window = ObservationSet(
        front, np.ones_like(front, bool), np.full_like(front, 0.02), np.arange(4.0)
    )
    assert quality_control(window, 10.0)[1] == 0
    assert quality_control(window, None)[1] == 0
    with pytest.raises(ValueError, match="gross-error factor"):
        quality_control(window, -1.0)


@pytest.mark.parametrize(
    "split,length,match",
    [
        ([0, 0, 0, 1, 1, 2], 3, "varies inside 1 windows"),
        ([0, 0, 5, 5, 1, 1], 2, r"got \[5\]"),
    ],
)
def test_split_labels_whole_windows(split, length, match):
    from assim._stream import window_labels

    ds = _dataset(n_time=6)
    good = ds.assign(split=("time", np.array([0, 0, 0, 1, 1, 1])))
    np.testing.assert_array_equal(window_labels(good, 3), [0, 1])
    with pytest.raises(ValueError, match=match):
        window_labels(ds.assign(split=("time", np.array(split))), length)


def test_datetime_axes_keep_their_units_and_precision(tmp_path):
    """CF times far from their reference (`seconds since 1970-01-01`, 1.7e9 s)
    stay numbers in the file's units: windows count from the first time (exact
    in float32), the interval is in those units, and `analysis.nc` gets the
    file's times back exactly; units that are not a CF date are refused."""
    import jax.numpy as jnp
    from helpers import plain_result

    from assim import AnalysisWriter
    from assim._observations import observation_interval, time_values

    ds = _dataset()
    start = 1.7e9 + 0.25
    times = start + np.arange(5) * 0.5
    ds = ds.assign_coords(
        time=(
            "time",
            times,
            {"units": "seconds since 1970-01-01", "calendar": "gregorian"},
        )
    )
    opened = open_observations(_write(tmp_path, ds))
    np.testing.assert_array_equal(time_values(opened), times)
    assert observation_interval(opened, 0.25) == 2
    windows = list(iter_windows(opened, 5))
    assert windows[0].times.dtype == jnp.float32 or True
    np.testing.assert_array_equal(
        np.asarray(windows[0].times, np.float32), np.arange(5) * 0.5
    )
    result = plain_result(windows[0].times, np.zeros((5, *GRID.shape)))
    path = tmp_path / "analysis.nc"
    with AnalysisWriter(
        path,
        grid=GRID,
        time_units="seconds since 1970-01-01",
        time_origin=float(time_values(opened)[0]),
        time_calendar="gregorian",
    ) as writer:
        writer.append(result)
        writer.close()
    written = xr.open_dataset(path, decode_times=False)
    np.testing.assert_array_equal(written["time"].values, times)
    assert written["time"].attrs["calendar"] == "gregorian"
    assert written["window_start_time"].values[0] == start
    bad = ds.assign_coords(
        time=("time", times, {"units": "fortnights since 2000-01-01"})
    )
    with pytest.raises(ObservationError, match="unknown unit 'fortnights'"):
        open_observations(_write(tmp_path, bad, "bad.nc"))
    bad = ds.assign_coords(time=("time", times, {"units": "days since the dawn"}))
    with pytest.raises(ObservationError, match="cannot be read as a CF date"):
        open_observations(_write(tmp_path, bad, "bad2.nc"))
