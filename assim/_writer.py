"""The analysis as a CF NetCDF dataset: in memory (`analysis_dataset`) or written
window by window (`AnalysisWriter`), from the `WindowResult`s of `cycle` /
`assimilate`."""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import xarray as xr
from xarray.backends.netCDF4_ import NETCDF4_PYTHON_LOCK

from ._cycle import WindowResult
from ._io import cf_coords, publish, temporary_path

_STATES = {
    "analysis": {"long_name": "analysis state"},
    "background": {"long_name": "background (forecast before assimilation)"},
    "spread": {  # ensemble analysers only
        "long_name": "analysis ensemble spread (members' standard deviation)"
    },
}


def _states(result: WindowResult) -> list[str]:
    """The state variables a result carries (`spread` only from ensembles)."""
    return [key for key in _STATES if getattr(result, key) is not None]


def analysis_dataset(
    results: list[WindowResult],
    *,
    grid,
    parameters: dict | None = None,
    attrs: dict | None = None,
    time_units: str = "model time units",
) -> xr.Dataset:
    """The analysis as a CF-1.8 dataset (in memory; `AnalysisWriter` writes the
    same layout to disk window by window).

    Variables: `analysis` and `background` `(time, [y,] x)`; one variable per
    estimated parameter; per-window diagnostics along `window` (start time, cost and
    gradient norm at the start and end, iterations, solver result, innovation
    statistics, RMSEs against the truth when known) and the cost / gradient-norm
    history `(window, iteration)`, NaN-padded.

    **Arguments:**

    - `results`: from `cycle` or `assimilate`.
    - `grid`: the simulator's grid (coordinates).
    - `parameters`: `{name: (values, attrs)}` with `attrs` holding at least `units`
      and `long_name`; values are scalars or fields of the grid's shape; or
      `{name: (values, attrs, ("window",))}` for one value per window (e.g. each
      window's estimate).
    - `attrs`: global attributes (method, simulator, settings).
    """
    names, coords = cf_coords(
        grid, np.concatenate([r.times for r in results]), time_units
    )
    data = {
        key: (
            ("time", *names),
            np.concatenate([getattr(r, key) for r in results]),
            _STATES[key],
        )
        for key in _states(results[0])
    }
    data.update(_window_variables(results, time_units))
    data.update(_parameter_variables(parameters, names))
    coords["window"] = _window_coordinate(len(results))
    return xr.Dataset(
        data, coords=coords, attrs={"Conventions": "CF-1.8", **(attrs or {})}
    )


def _window_coordinate(n: int):
    return ("window", np.arange(n), {"long_name": "assimilation window index"})


def _window_variables(
    results: list[WindowResult], time_units: str, time_origin: float = 0.0
) -> dict:
    """`{name: (dims, values, attrs)}` of the per-window diagnostics and the
    NaN-padded cost / gradient-norm histories (the states are not read)."""
    data = {
        "window_start_time": (
            "window",
            np.array([float(r.times[0]) + time_origin for r in results]),
            {"units": time_units},
        )
    }
    per_window = {
        "cost_initial": [r.cost[0] for r in results],
        "cost_final": [r.cost[-1] for r in results],
        "grad_norm_initial": [r.grad_norm[0] for r in results],
        "grad_norm_final": [r.grad_norm[-1] for r in results],
        "iterations": [r.steps for r in results],
        "converged": [int(r.converged) for r in results],
    }
    for key in results[0].diagnostics:
        per_window[key] = [r.diagnostics[key] for r in results]
    for key, values in per_window.items():
        data[key] = ("window", np.asarray(values), {"units": "1"})
    data["solver_result"] = (
        "window",
        np.array([r.outcome for r in results]),
        {"long_name": "how the analysis ended (assim.OUTCOMES)"},
    )
    length = max(len(r.cost_history) for r in results)
    for key in ("cost", "grad_norm"):
        history = np.full((len(results), length), np.nan)
        for i, r in enumerate(results):
            values = getattr(r, f"{key}_history")
            history[i, : len(values)] = values
        data[f"{key}_history"] = (
            ("window", "iteration"),
            history,
            {"units": "1", "long_name": f"{key} per iteration"},
        )
    return data


def _parameter_variables(parameters: dict | None, names: tuple) -> dict:
    data = {}
    for name, (values, var_attrs, *leading) in (parameters or {}).items():
        values = np.asarray(values)
        leading = tuple(leading[0]) if leading else ()
        if "units" not in var_attrs:
            raise ValueError(f"parameter {name!r} needs units")
        spatial = () if values.ndim == len(leading) else tuple(names)
        data[name] = ((*leading, *spatial), values, var_attrs)
    return data


class AnalysisWriter:
    """The analysis written to NetCDF window by window, so that memory holds one
    window's states, not the run's: `append` adds each `WindowResult`'s states
    along the unlimited `time` dimension of a temporary file beside `path`;
    `close` adds the per-window diagnostics and the parameters and renames the
    file to `path`. The layout is `analysis_dataset`'s. On an error (or `abort`)
    the temporary file is removed, so `path` is never half-written. In a
    multi-host run only the first process writes. `time_units` and `time_origin`:
    the observation file's time units and first time (window times are counted
    from it: `ObservationSet.from_dataset`), so that `analysis.nc` carries the
    file's times (`hours since 2000-01-01`, ...).

    ```python
    with AnalysisWriter(path, grid=grid) as writer:
        for result in cycle(analyser, problem, windows, background):
            writer.append(result)
        writer.close(parameters)
    ```
    """

    def __init__(
        self,
        path,
        *,
        grid,
        attrs: dict | None = None,
        time_units: str = "model time units",
        time_origin: float = 0.0,
        time_calendar: str | None = None,
    ):
        self.path = Path(path)
        self.grid = grid
        self.attrs = {"Conventions": "CF-1.8", **(attrs or {})}
        self.time_units = time_units
        self.time_origin = float(time_origin)
        self.time_calendar = time_calendar
        self.summaries: list[WindowResult] = []  # per-window, without the states
        self.times = 0
        self._nc = None
        self._tmp = None
        self._active = jax.process_index() == 0

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is not None:
            self.abort()

    def _open(self, first: WindowResult):
        import netCDF4

        self._tmp = temporary_path(self.path)
        nc = self._nc = netCDF4.Dataset(self._tmp, "w", format="NETCDF4")
        # netCDF-C / HDF5 are not thread-safe: every call here holds the lock that
        # xarray's reads hold (e.g. windows read on the prefetch thread).
        names, coords = cf_coords(self.grid, np.zeros(0), self.time_units)
        self._names = names
        nc.createDimension("time", None)
        for axis, name in enumerate(names):
            nc.createDimension(name, self.grid.shape[axis])
        if self.time_calendar is not None:
            coords["time"][2]["calendar"] = self.time_calendar
        for name, (dims, values, var_attrs) in coords.items():
            _put(nc, name, (dims,), values, var_attrs)
        self._keys = _states(first)
        for key in self._keys:
            state = getattr(first, key)
            var = nc.createVariable(
                key, state.dtype, ("time", *names), chunksizes=(1, *state.shape[1:])
            )
            var.setncatts(_STATES[key])

    def append(self, result: WindowResult) -> None:
        """Write `result`'s states; keep its (small) diagnostics for `close`."""
        self.summaries.append(
            dataclasses.replace(
                result, analysis=None, background=None, window=None, spread=None
            )
        )
        if not self._active:
            return
        span = slice(self.times, self.times + len(result.times))
        with NETCDF4_PYTHON_LOCK:
            if self._nc is None:
                self._open(result)
            times = np.asarray(result.times, np.float64) + self.time_origin
            self._nc["time"][span] = times
            for key in self._keys:
                self._nc[key][span] = getattr(result, key)
        self.times = span.stop

    def close(self, parameters: dict | None = None) -> Path:
        """Finish the file (`parameters` as in `analysis_dataset`) and rename it to
        `path`."""
        if not self.summaries:
            raise ValueError(f"{self.path}: no window was written")
        if not self._active:
            return self.path
        nc = self._nc
        try:
            data = _window_variables(self.summaries, self.time_units, self.time_origin)
            data.update(_parameter_variables(parameters, self._names))
            with NETCDF4_PYTHON_LOCK:
                nc.createDimension("window", len(self.summaries))
                nc.createDimension("iteration", data["cost_history"][1].shape[1])
                dims, values, var_attrs = _window_coordinate(len(self.summaries))
                _put(nc, "window", (dims,), values, var_attrs)
                for name, (dims, values, var_attrs) in data.items():
                    dims = (dims,) if isinstance(dims, str) else dims
                    _put(nc, name, dims, values, var_attrs)
                nc.setncatts(self.attrs)
                nc.close()
            self._nc = None
            publish(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the temporary file."""
        if self._nc is not None:
            with NETCDF4_PYTHON_LOCK:
                self._nc.close()
            self._nc = None
        if self._tmp is not None:
            Path(self._tmp).unlink(missing_ok=True)
            self._tmp = None


def _put(nc, name: str, dims: tuple, values, attrs: dict) -> None:
    values = np.asarray(values)
    if values.dtype.kind in "UO":  # variable-length strings
        var = nc.createVariable(name, str, dims)
        var[:] = values.astype(object)
    else:
        var = nc.createVariable(name, values.dtype, dims)
        var[...] = values
    var.setncatts(attrs)
