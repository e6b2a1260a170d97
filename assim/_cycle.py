"""Cycled assimilation over consecutive windows, per-window diagnostics, and the
analysis as a CF NetCDF dataset."""

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import xarray as xr
from xarray.backends.netCDF4_ import NETCDF4_PYTHON_LOCK

from ._io import cf_coords, publish, temporary_path
from ._metrics import innovation_statistics, rmse
from ._observations import ObservationSet
from ._var import Method, SolveInfo, Var4D, minimise, solve_window


@dataclasses.dataclass
class WindowResult:
    """One assimilation window.

    - `times`: observation times of the window.
    - `analysis`, `background`: model states at those times from the analysis and
      from the background (the forecast that the window started from).
    - `theta`: estimated parameters (transformed, as in the control), or `None`.
    - `info`: the minimisation's `SolveInfo`.
    - `diagnostics`: scalars: innovation statistics of the background, RMSEs against
      the truth when the window has one.
    """

    times: np.ndarray
    analysis: np.ndarray
    background: np.ndarray
    theta: object
    info: SolveInfo
    diagnostics: dict


def cycle(template: Var4D, windows: Iterable[ObservationSet], **options):
    """`iter_cycle`'s results as a list (every window's states in memory)."""
    return list(iter_cycle(template, windows, **options))


def iter_cycle(
    template: Var4D,
    windows: Iterable[ObservationSet],
    *,
    method: Method = "lbfgs",
    max_steps: int = 100,
    cycle_parameters: bool = True,
    on_iteration: Callable[[int, int, float], None] | None = None,
    **solver_options,
) -> Iterator[WindowResult]:
    """Assimilate consecutive windows, each background the previous forecast; yield
    each window's result when it is done (windows are read as they are needed, so
    a stream of them from disk is never all in memory).

    The first window uses `template.background` (and `template.parameter_background`);
    each later window's background is the analysis at the previous window's last
    observation time, advanced one observation interval by the simulator with the
    estimated parameters (no model-error forcing: it is unknown beyond the window).
    With `cycle_parameters`, the estimated parameters also become the next window's
    parameter background, so that the information in past windows carries over.

    **Arguments:**

    - `template`: the cost function of the first window (`Var4D`).
    - `windows`: `ObservationSet`s of consecutive, non-overlapping windows, one
      observation interval apart (e.g. from `iter_windows`).
    - `method`, `max_steps`, `solver_options`: passed to `minimise`.
    - `on_iteration`: called as `on_iteration(window, iteration, cost)`.

    **Yields:** one `WindowResult` per window.
    """
    cost = template
    done = 0
    trajectory = eqx.filter_jit(lambda cost, c, n: cost.trajectory(c, n))
    advance = eqx.filter_jit(
        lambda sim, x: sim.rollout(x, template.observation_interval)[-1]
    )
    for k, obs in enumerate(windows):
        progress = None
        if on_iteration is not None:
            progress = lambda i, c, k=k: on_iteration(k, i, c)  # noqa: E731
        control, info = minimise(
            cost,
            obs,
            method=method,
            max_steps=max_steps,
            progress=progress,
            **solver_options,
        )
        n = obs.n_times
        background = trajectory(cost, cost.initial_control(obs), n)
        analysis = trajectory(cost, control, n)
        yield _window_result(obs, background, analysis, control.theta, info)
        done += 1
        _, simulator = cost.analysis(control)
        next_background = advance(simulator, analysis[-1])
        cost = eqx.tree_at(lambda c: c.background, cost, next_background)
        if cycle_parameters and control.theta is not None:
            cost = eqx.tree_at(lambda c: c.parameter_background, cost, control.theta)
    if not done:
        raise ValueError("cycle: no observation window to assimilate")


def assimilate_var_windows(
    template: Var4D,
    windows: list[ObservationSet],
    *,
    method: Method = "lbfgs",
    max_steps: int = 100,
    mesh=None,
    **solver_options,
) -> list[WindowResult]:
    """Independent windows (no cycling), each from `template`'s background and
    parameter prior, all at once: one traced minimisation per window
    (`solve_window`), vmapped and split over the devices of `mesh` (default every
    device), padded where the windows do not divide across them. `info.cost` and
    `info.grad_norm` hold the values at the background and at the analysis."""

    def analyse(cost, window):
        cost = eqx.tree_at(lambda c: c.background, cost, window.background)
        obs = window.obs
        control, steps, converged, costs, gnorms = solve_window(
            cost, obs, method=method, max_steps=max_steps, **solver_options
        )
        first = cost.trajectory(cost.initial_control(obs), obs.n_times)
        analysis = cost.trajectory(control, obs.n_times)
        return first, analysis, control.theta, steps, converged, costs, gnorms

    outputs = _independent(
        analyse, template, windows, template.background, mesh, "assimilate_var_windows"
    )
    results = []
    for obs, out in zip(windows, outputs, strict=True):
        first, analysis, theta, steps, converged, costs, gnorms = out
        info = SolveInfo(
            cost=np.asarray(costs),
            grad_norm=np.asarray(gnorms),
            steps=int(steps),
            result="successful" if converged else "max_steps_reached",
            converged=bool(converged),
        )
        results.append(_window_result(obs, first, analysis, theta, info))
    return results


def _window_result(obs, background, analysis, theta, info) -> WindowResult:
    diagnostics = innovation_statistics(
        observations=obs.values,
        forecast=obs.operator(background),
        error_std=obs.error_std,
        mask=obs.mask,
    )
    diagnostics = {f"innovation_{key}": v for key, v in diagnostics.items()}
    if obs.truth is not None:
        diagnostics["rmse_truth_analysis"] = rmse(
            estimate=analysis, reference=obs.truth
        )
        diagnostics["rmse_truth_background"] = rmse(
            estimate=background, reference=obs.truth
        )
    return WindowResult(
        times=np.asarray(obs.times),
        analysis=np.asarray(analysis),
        background=np.asarray(background),
        theta=jax.tree.map(np.asarray, theta),
        info=info,
        diagnostics=diagnostics,
    )


def _analyse_window(net, obs: ObservationSet, background):
    """`(trajectory from the background, analysed trajectory, steps, converged)`
    of one window: steps are the layers of an unrolled network or the inner
    iterations of a bilevel one (whose 4D-Var may stop unconverged here)."""
    from ._bilevel import BilevelVar

    if isinstance(net, BilevelVar):
        sol = net.solve(obs, background, throw=False)
        x0 = net.initial_state(sol.value, background)
        steps = sol.stats["num_steps"]
        converged = sol.result == optx.RESULTS.successful
    else:
        x0 = net(obs, background)
        steps, converged = jnp.asarray(net.n_layers), jnp.asarray(False)
    n = obs.n_times
    return net.trajectory(background, n), net.trajectory(x0, n), steps, converged


def _network_result(net, obs, first, analysis, steps, converged) -> WindowResult:
    from ._bilevel import BilevelVar

    costs = [0.5 * float(jnp.sum(obs.innovations(s) ** 2)) for s in (first, analysis)]
    if isinstance(net, BilevelVar):
        result = "converged" if converged else "max_steps"
    else:
        result = "unrolled"
    info = SolveInfo(
        cost=np.asarray(costs),
        grad_norm=np.full(2, np.nan),
        steps=int(steps),
        result=result,
        converged=bool(converged),
    )
    return _window_result(obs, first, analysis, net.theta, info)


def cycle_unrolled(net, windows: Iterable[ObservationSet], background):
    """`iter_cycle_unrolled`'s results as a list."""
    return list(iter_cycle_unrolled(net, windows, background))


def iter_cycle_unrolled(
    net, windows: Iterable[ObservationSet], background
) -> Iterator[WindowResult]:
    """Apply a trained window network (`UnrolledVar` or `BilevelVar`) to consecutive
    windows, each background the previous analysis advanced one observation interval
    (the first: `background`); yield each window's result when it is done.
    `info.cost` holds the observation term `|(H x - y) / sigma|^2 / 2` of the
    background and of the analysis; `steps` is the number of layers, or the
    bilevel network's inner iterations (`converged` then says whether its 4D-Var
    converged)."""
    done = 0
    simulator = net.model()
    analyse = eqx.filter_jit(_analyse_window)
    advance = eqx.filter_jit(
        lambda sim, x: sim.rollout(x, net.observation_interval)[-1]
    )
    for obs in windows:
        first, analysis, steps, converged = analyse(net, obs, background)
        yield _network_result(net, obs, first, analysis, steps, converged)
        done += 1
        background = advance(simulator, analysis[-1])
    if not done:
        raise ValueError("cycle_unrolled: no observation window to assimilate")


def assimilate_windows(
    net, windows: list[ObservationSet], background, *, mesh=None
) -> list[WindowResult]:
    """Apply a trained window network to independent windows, each from the same
    `background` (no cycling), all at once: vmapped and split over the devices of
    `mesh` (`assim.batch_mesh`; default every device), padded where the windows do
    not divide across them. Results as `cycle_unrolled`'s."""
    outputs = _independent(
        lambda net, w: _analyse_window(net, w.obs, w.background),
        net,
        windows,
        background,
        mesh,
        "assimilate_windows",
    )
    return [
        _network_result(net, obs, *out)
        for obs, out in zip(windows, outputs, strict=True)
    ]


def _independent(fn, model, windows: list[ObservationSet], background, mesh, what):
    """`fn(model, window)` for independent windows that all start from
    `background`: vmapped and split over the mesh (`map_windows`); one output
    per window. `what` names the caller in the error for no window."""
    from ._losses import Batch
    from ._parallel import map_windows

    if not windows:
        raise ValueError(f"{what}: no observation window to assimilate")
    batch = Batch.stack(windows, [background] * len(windows))
    outputs = map_windows(fn, model, batch, mesh=mesh)
    return [jax.tree.map(lambda a, i=i: a[i], outputs) for i in range(len(windows))]


_STATES = {
    "analysis": {"long_name": "analysis state"},
    "background": {"long_name": "background (forecast before assimilation)"},
}


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

    - `results`: from `cycle`.
    - `grid`: the simulator's grid (coordinates).
    - `parameters`: `{name: (values, attrs)}` with `attrs` holding at least `units`
      and `long_name`; values are scalars or fields of the grid's shape.
    - `attrs`: global attributes (method, simulator, settings).
    """
    names, coords = cf_coords(
        grid, np.concatenate([r.times for r in results]), time_units
    )
    data = {
        key: (
            ("time", *names),
            np.concatenate([getattr(r, key) for r in results]),
            var_attrs,
        )
        for key, var_attrs in _STATES.items()
    }
    data.update(_window_variables(results, time_units))
    data.update(_parameter_variables(parameters, names))
    coords["window"] = _window_coordinate(len(results))
    return xr.Dataset(
        data, coords=coords, attrs={"Conventions": "CF-1.8", **(attrs or {})}
    )


def _window_coordinate(n: int):
    return ("window", np.arange(n), {"long_name": "assimilation window index"})


def _window_variables(results: list[WindowResult], time_units: str) -> dict:
    """`{name: (dims, values, attrs)}` of the per-window diagnostics and the
    NaN-padded cost / gradient-norm histories (the states are not read)."""
    data = {
        "window_start_time": (
            "window",
            np.array([r.times[0] for r in results]),
            {"units": time_units},
        )
    }
    per_window = {
        "cost_initial": [r.info.cost[0] for r in results],
        "cost_final": [r.info.cost[-1] for r in results],
        "grad_norm_initial": [r.info.grad_norm[0] for r in results],
        "grad_norm_final": [r.info.grad_norm[-1] for r in results],
        "iterations": [r.info.steps for r in results],
        "converged": [int(r.info.converged) for r in results],
    }
    for key in results[0].diagnostics:
        per_window[key] = [r.diagnostics[key] for r in results]
    for key, values in per_window.items():
        data[key] = ("window", np.asarray(values), {"units": "1"})
    data["solver_result"] = (
        "window",
        np.array([r.info.result for r in results]),
        {"long_name": "optimiser result message"},
    )
    length = max(len(r.info.cost) for r in results)
    for key in ("cost", "grad_norm"):
        history = np.full((len(results), length), np.nan)
        for i, r in enumerate(results):
            values = getattr(r.info, key)
            history[i, : len(values)] = values
        data[f"{key}_history"] = (
            ("window", "iteration"),
            history,
            {"units": "1", "long_name": f"{key} per iteration"},
        )
    return data


def _parameter_variables(parameters: dict | None, names: tuple) -> dict:
    data = {}
    for name, (values, var_attrs) in (parameters or {}).items():
        values = np.asarray(values)
        if "units" not in var_attrs:
            raise ValueError(f"parameter {name!r} needs units")
        data[name] = (() if values.ndim == 0 else tuple(names), values, var_attrs)
    return data


class AnalysisWriter:
    """The analysis written to NetCDF window by window, so that memory holds one
    window's states, not the run's: `append` adds each `WindowResult`'s states
    along the unlimited `time` dimension of a temporary file beside `path`;
    `close` adds the per-window diagnostics and the parameters and renames the
    file to `path`. The layout is `analysis_dataset`'s. On an error (or `abort`)
    the temporary file is removed, so `path` is never half-written. In a
    multi-host run only the first process writes.

    ```python
    with AnalysisWriter(path, grid=grid) as writer:
        for result in iter_cycle(template, windows):
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
    ):
        self.path = Path(path)
        self.grid = grid
        self.attrs = {"Conventions": "CF-1.8", **(attrs or {})}
        self.time_units = time_units
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
        for name, (dims, values, var_attrs) in coords.items():
            _put(nc, name, (dims,), values, var_attrs)
        for key, var_attrs in _STATES.items():
            state = getattr(first, key)
            var = nc.createVariable(
                key, state.dtype, ("time", *names), chunksizes=(1, *state.shape[1:])
            )
            var.setncatts(var_attrs)

    def append(self, result: WindowResult) -> None:
        """Write `result`'s states; keep its (small) diagnostics for `close`."""
        self.summaries.append(
            dataclasses.replace(result, analysis=None, background=None)
        )
        if not self._active:
            return
        span = slice(self.times, self.times + len(result.times))
        with NETCDF4_PYTHON_LOCK:
            if self._nc is None:
                self._open(result)
            self._nc["time"][span] = np.asarray(result.times, np.float64)
            for key in _STATES:
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
            data = _window_variables(self.summaries, self.time_units)
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
