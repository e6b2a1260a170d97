"""Sparse gridded observations from CF NetCDF files: open lazily, validate, window."""

import dataclasses
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import xarray as xr
from jaxtyping import Array, Bool, Float

from simulators import Grid

from ._operators import AbstractObservationOperator, GridSelection


class ObservationError(ValueError):
    """An observation file or window that cannot be used; the message names why."""


_SPATIAL = {1: ("x",), 2: ("y", "x")}


def open_observations(path, *, grid: Grid | None = None) -> xr.Dataset:
    """Open an observation file lazily and validate its structure.

    The file follows the contract in DESIGN.md: a variable `obs` with dims
    `(time, x)` or `(time, y, x)`, NaN (or `_FillValue`) where no sensor reported,
    `obs_error_std` (a scalar or the same dims), coordinates `time`, `x` (and `y`) with
    `units`, and an optional `truth` with the dims of `obs`. Nothing but coordinates
    and scalar attributes is read here: values are read window by window by
    `ObservationSet.from_dataset`, so files larger than memory work.

    **Arguments:**

    - `path`: the NetCDF file.
    - `grid`: when given, the spatial shape and coordinates must match it.

    **Returns:** the lazily opened `xarray.Dataset`.

    **Raises:** `ObservationError` with one line naming the problem.
    """
    path = Path(path)
    if not path.exists():
        raise ObservationError(f"observation file not found: {path}")
    try:
        ds = xr.open_dataset(path, engine="netcdf4", decode_times=False)
    except Exception as e:  # netCDF4 / HDF5 errors are not one class
        raise ObservationError(f"cannot read {path} as NetCDF: {e}") from e
    validate_dataset(ds, grid=grid, name=str(path))
    return ds


def validate_dataset(ds: xr.Dataset, *, grid: Grid | None = None, name="dataset"):
    """Check the structure of an observation dataset (see `open_observations`)."""
    if "obs" not in ds.variables:
        raise ObservationError(f"{name}: missing variable 'obs'")
    dims = ds["obs"].dims
    if dims not in (("time", "x"), ("time", "y", "x")):
        raise ObservationError(
            f"{name}: 'obs' must have dims (time, x) or (time, y, x), got {dims}"
        )
    spatial = dims[1:]
    for coord in ("time", *spatial):
        if coord not in ds.coords:
            raise ObservationError(f"{name}: missing coordinate '{coord}'")
        if coord != "time" and "units" not in ds[coord].attrs:
            raise ObservationError(f"{name}: coordinate '{coord}' has no units")
    units = str(ds["time"].attrs.get("units", ""))
    if " since " in units:  # CF time: "<unit> since <reference date>"
        if _unit_word(units) not in _TIME_UNITS:
            raise ObservationError(
                f"{name}: time units {units!r}: unknown unit "
                f"{units.split(' since ')[0].strip()!r}"
            )
        try:
            import cftime

            calendar = ds["time"].attrs.get("calendar", "standard")
            cftime.num2date(0, _cftime_units(0, units)[1], calendar)
        except Exception as e:  # cftime raises ValueError or its own errors
            raise ObservationError(
                f"{name}: time units {units!r} cannot be read as a CF date ({e})"
            ) from e
    time = ds["time"].values
    if time.size == 0:
        raise ObservationError(f"{name}: no observation times")
    if time.size > 1 and not np.all(np.diff(time) > np.zeros_like(np.diff(time))):
        raise ObservationError(f"{name}: time is not strictly increasing")
    if "obs_error_std" not in ds.variables:
        raise ObservationError(f"{name}: missing variable 'obs_error_std'")
    for var in ("obs", "obs_error_std", "truth"):
        if var in ds.variables and not np.issubdtype(ds[var].dtype, np.number):
            raise ObservationError(
                f"{name}: '{var}' must be numeric, got dtype {ds[var].dtype}"
            )
    std = ds["obs_error_std"]
    if std.dims not in ((), dims):
        raise ObservationError(
            f"{name}: 'obs_error_std' must be a scalar or have dims {dims}, "
            f"got {std.dims}"
        )
    if std.ndim == 0:
        _check_error_std(np.asarray(std.values), name)
    if "truth" in ds.variables and ds["truth"].dims != dims:
        raise ObservationError(
            f"{name}: 'truth' must have the dims of 'obs' {dims}, "
            f"got {ds['truth'].dims}"
        )
    if grid is not None:
        shape = tuple(ds.sizes[d] for d in spatial)
        if shape != grid.shape:
            raise ObservationError(
                f"{name}: observation grid {shape} does not match the simulator grid "
                f"{grid.shape}"
            )
        for axis, d in enumerate(spatial):
            expected = np.asarray(grid.coordinates(axis))
            if not np.allclose(ds[d].values, expected, rtol=1e-6, atol=1e-9):
                found = np.asarray(ds[d].values, np.float64)
                spacing = float(found[1] - found[0]) if found.size > 1 else np.nan
                raise ObservationError(
                    f"{name}: coordinate '{d}' does not match the simulator grid: "
                    f"the file's starts at {found[0]:g} with spacing {spacing:g}, "
                    f"the grid's at {expected[0]:g} with spacing "
                    f"{grid.spacing[axis]:g} (boundary {grid.boundary})"
                )


# An observation larger than this many error stds is refused: its error would be
# below float32 resolution of its value (a fill value such as 1e30, or wrong units).
MAX_MAGNITUDE = 1e7


def _position(dims, where: np.ndarray) -> str:
    """The first True index of `where`, as `time index 3, x 5` (window-relative)."""
    index = np.argwhere(where)[0]
    return ", ".join(
        f"{'time index' if d == 'time' else d} {i}"
        for d, i in zip(dims, index, strict=True)
    )


def quality_control(
    window: "ObservationSet", factor: float = 10.0
) -> tuple["ObservationSet", int]:
    """Gross-error check of a window against its own observations: an observation
    further from the window's median than `factor` times (the observed spread +
    its error std) is rejected (no longer assimilated, as a missing one), where
    the spread is the 5-95% range divided by 3.29 (the standard deviation for
    Gaussian values; a range, not a deviation from the median, so that a field
    with two regimes, a front, keeps both). Windows with fewer than 20
    observations are left alone (no reliable spread). `factor=None`: no check.

    **Returns:** `(window, number of rejected observations)`.
    """
    if factor is None:
        return window, 0
    if not factor > 0:
        raise ValueError(f"gross-error factor must be positive, got {factor}")
    values, mask = np.asarray(window.values), np.asarray(window.mask)
    if mask.sum() < 20:
        return window, 0
    observed = values[mask]
    low, median, high = np.quantile(observed, [0.05, 0.5, 0.95])
    spread = (high - low) / 3.29
    std = np.asarray(window.error_std)
    gross = mask & (np.abs(values - median) > factor * (spread + std))
    if not gross.any():
        return window, 0
    return dataclasses.replace(
        window, mask=jnp.asarray(mask & ~gross), values=jnp.where(gross, 0.0, values)
    ), int(gross.sum())


def _check_error_std(std: np.ndarray, name: str):
    if not np.all(np.isfinite(std)):
        raise ObservationError(f"{name}: 'obs_error_std' has non-finite values")
    if np.any(std <= 0):
        raise ObservationError(
            f"{name}: 'obs_error_std' must be positive (got min {np.min(std):g})"
        )


class ObservationSet(eqx.Module):
    """One window of observations as arrays, ready for a cost function.

    `values` holds zeros where `mask` is False (no sensor), so that arithmetic stays
    finite; every use weighs by `mask`.

    **Arguments:**

    - `values`: observed values, `(time, *grid)`.
    - `mask`: where a sensor reported, `(time, *grid)`.
    - `error_std`: observation-error standard deviation, `(time, *grid)`.
    - `times`: observation times, `(time,)`, in the file's time units.
    - `truth`: the true state when the file has one (twin experiments), else `None`.
    - `operator`: the observation operator `H` from states `(time, *grid)` to the
      shape of `values`; default `GridSelection()` (sensors on grid points, the grid's
      shape). With `LinearInterpolation` the values are `(time, sensors)`.
    - `withheld`: observations kept out of the assimilation for scoring (held-out
      sensors; `withhold`), or `None`. Methods read `mask` only.
    """

    values: Float[Array, "time ..."]
    mask: Bool[Array, "time ..."]
    error_std: Float[Array, "time ..."]
    times: Float[Array, " time"]
    truth: Float[Array, "time ..."] | None = None
    operator: AbstractObservationOperator = GridSelection()
    withheld: Bool[Array, "time ..."] | None = None

    def __check_init__(self):
        shape = self.values.shape
        for name in ("mask", "error_std", "withheld"):
            if getattr(self, name) is not None and getattr(self, name).shape != shape:
                raise ValueError(
                    f"observation {name} has shape {getattr(self, name).shape}, "
                    f"values have {shape}"
                )
        if self.times.shape != shape[:1]:
            raise ValueError(
                f"{self.times.shape[0] if self.times.ndim else 0} observation times "
                f"for {shape[0]} rows of values"
            )

    @property
    def n_times(self) -> int:
        return self.values.shape[0]

    def withhold(self, points) -> "ObservationSet":
        """The window with the observations at `points` (a boolean mask of one
        time's values, e.g. held-out sensor locations, or of all of them) moved from
        `mask` to `withheld`: kept with the window for scoring, never assimilated."""
        points = jnp.broadcast_to(jnp.asarray(points, bool), self.mask.shape)
        return dataclasses.replace(
            self, mask=self.mask & ~points, withheld=self.mask & points
        )

    def innovations(self, states: Array) -> Array:
        """Whitened misfits `(H x - y) / sigma` where a sensor reported, else 0."""
        predicted = self.operator(states)
        return jnp.where(self.mask, (predicted - self.values) / self.error_std, 0.0)

    @classmethod
    def from_dataset(
        cls, ds: xr.Dataset, time=slice(None), *, name="window", origin=None
    ) -> "ObservationSet":
        """Read the window `ds.isel(time=time)` (only that slice is read from disk).
        Its `times` are counted from `origin` (default: the first time of `ds`) in
        the file's time units (`time_values`), so that they keep their precision
        in float32 whatever the reference date (`seconds since 1970-01-01`).

        **Raises:** `ObservationError` when the window has no observation, or when
        `obs_error_std` is non-positive or non-finite where a sensor reported.
        """
        window = ds.isel(time=time)
        obs = np.asarray(window["obs"].values, dtype=np.float64)
        mask = np.isfinite(obs)
        if not mask.any():
            raise ObservationError(f"{name}: all observations are missing (all NaN)")
        std = np.broadcast_to(
            np.asarray(window["obs_error_std"].values, dtype=np.float64), obs.shape
        )
        _check_error_std(std[mask], name)
        infinite = np.isinf(obs)
        if infinite.any():
            raise ObservationError(
                f"{name}: 'obs' has {int(infinite.sum())} infinite values (first at "
                f"{_position(window['obs'].dims, infinite)}); missing values are NaN"
            )
        huge = mask & (np.abs(obs) > MAX_MAGNITUDE * std)
        if huge.any():
            raise ObservationError(
                f"{name}: {int(huge.sum())} observations exceed {MAX_MAGNITUDE:g} "
                f"times their error std (first {obs[huge][0]:g} at "
                f"{_position(window['obs'].dims, huge)}): a fill value or a unit "
                "error, not a measurement"
            )
        truth = None
        if "truth" in window.variables:
            truth = np.asarray(window["truth"].values, dtype=np.float64)
            if not np.all(np.isfinite(truth)):
                raise ObservationError(f"{name}: 'truth' has non-finite values")
            truth = jnp.asarray(truth)
        origin = time_values(ds)[0] if origin is None else origin
        return cls(
            values=jnp.asarray(np.where(mask, obs, 0.0)),
            mask=jnp.asarray(mask),
            error_std=jnp.asarray(np.where(mask, std, 1.0)),
            times=jnp.asarray(time_values(window) - origin),
            truth=truth,
        )


_TIME_UNITS = {
    "days": "D",
    "day": "D",
    "d": "D",
    "hours": "h",
    "hour": "h",
    "h": "h",
    "minutes": "m",
    "minute": "m",
    "min": "m",
    "seconds": "s",
    "second": "s",
    "s": "s",
    "milliseconds": "ms",
    "microseconds": "us",
    "nanoseconds": "ns",
}


# Units cftime does not read, as (seconds per unit).
_SUBSECOND = {"milliseconds": 1e-3, "microseconds": 1e-6, "nanoseconds": 1e-9}


def _unit_word(units: str) -> str:
    """The unit of CF time `units` (`"hours since 2000-01-01"` -> `"hours"`)."""
    return units.split(" since ")[0].strip().lower()


def _cftime_units(values, units: str):
    """`(values, units)` that cftime reads: sub-second units (xarray writes
    `nanoseconds since ...`) as seconds."""
    factor = _SUBSECOND.get(_unit_word(units))
    if factor is None:
        return values, units
    return values * factor, f"seconds since {units.split(' since ', 1)[1]}"


def in_time_units(ds: xr.Dataset, units: str, calendar: str | None) -> xr.Dataset:
    """`ds` with its (undecoded) time numbers converted to CF `units` (e.g. a file
    of `hours since 2000-01-02` in an archive counted in `hours since
    2000-01-01`); unchanged when the units agree. Non-CF units must agree."""
    own = str(ds["time"].attrs.get("units", ""))
    own_calendar = ds["time"].attrs.get("calendar", "standard")
    if own == units:
        return ds
    if " since " not in own or " since " not in units:
        raise ObservationError(f"time units {own!r} differ from {units!r}")
    import cftime

    values, own_seconds = _cftime_units(np.asarray(ds["time"].values), own)
    dates = cftime.num2date(values, own_seconds, own_calendar)
    scale, target = _cftime_units(1.0, units)
    numbers = cftime.date2num(dates, target, calendar or own_calendar) / scale
    attrs = {**ds["time"].attrs, "units": units}
    if calendar is not None:
        attrs["calendar"] = calendar
    return ds.assign_coords(time=("time", np.asarray(numbers, np.float64), attrs))


def time_values(ds: xr.Dataset) -> np.ndarray:
    """The dataset's times as float64 numbers in its time units: a file opened by
    `open_observations` keeps CF times (`hours since 2000-01-01`, any calendar) as
    the numbers stored (not decoded), so that the simulator's `dt` is in those
    units; times that xarray decoded to dates are turned back into numbers of the
    unit of their encoding (seconds without one), counted from the first."""
    values = ds["time"].values
    if np.issubdtype(values.dtype, np.datetime64):
        units = str(ds["time"].encoding.get("units", "seconds since"))
        unit = _TIME_UNITS.get(_unit_word(units), "s")
        return (values - values[0]) / np.timedelta64(1, unit)
    if values.dtype == object:  # cftime dates
        raise ObservationError(
            "time holds decoded calendar dates: open the file with "
            "assim.open_observations (times stay numbers in their units)"
        )
    return np.asarray(values, dtype=np.float64)


def window_starts(ds: xr.Dataset, length: int, stride: int | None = None) -> list:
    """The first time index of each window of `length` times."""
    if length < 1:
        raise ObservationError(f"window length must be at least 1, got {length}")
    n = ds.sizes["time"]
    if length > n:
        raise ObservationError(f"window length {length} exceeds the {n} times")
    return list(range(0, n - length + 1, length if stride is None else stride))


def iter_windows(ds: xr.Dataset, length: int, *, stride: int | None = None):
    """Yield `ObservationSet`s of `length` consecutive times, read one at a time.

    **Arguments:**

    - `ds`: a dataset from `open_observations`.
    - `length`: observation times per window.
    - `stride`: times between window starts (default `length`: no overlap).
    """
    for start in window_starts(ds, length, stride):
        yield ObservationSet.from_dataset(
            ds, slice(start, start + length), name=f"window at time index {start}"
        )


def observation_interval(ds: xr.Dataset, dt: float) -> int:
    """Model steps of size `dt` between the dataset's observation times (evenly
    spaced, a whole number of steps apart)."""
    times = time_values(ds)
    if times.size < 2:
        return 1
    spacing = np.diff(times)
    if not np.allclose(spacing, spacing[0], rtol=1e-6):
        raise ObservationError("observation times are not evenly spaced")
    steps = spacing[0] / dt
    if abs(steps - round(steps)) > 1e-6 * max(1.0, steps):
        raise ObservationError(
            f"observation spacing {spacing[0]:g} is not a multiple of the simulator "
            f"time step dt={dt:g}"
        )
    return int(round(steps))


def bundled_dataset() -> Path:
    """The path of the bundled observation file (a 2D advection-diffusion twin
    experiment: 32 x 32, moving tracks, the diffusivity field unknown)."""
    from importlib import resources

    return Path(str(resources.files("assim.datasets") / "advection_diffusion2d.nc"))
