"""`assim-run`: assimilate observations with cycled variational assimilation.

With no arguments: the bundled 2D advection-diffusion dataset, strong-constraint
incremental 4D-Var with joint estimation of the diffusivity field. Writes
`analysis.nc`, `metrics.json` and PNG plots into the hydra run directory, e.g.
`assim-run method=var4d_weak`, `assim-run simulator=ks data=twin method=var4d`.
"""

import itertools
import time
from collections import defaultdict, deque
from importlib import resources
from pathlib import Path

import hydra
import jax
import jax.numpy as jnp
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from assim import AnalysisWriter, error_spectra, resolution_from_spectra
from assim._io import write_json

from .common import build_simulator, generate_twin, log, run_app


def bundled_dataset() -> Path:
    """Path of the bundled observation file."""
    return Path(str(resources.files("assim.datasets") / "advection_diffusion2d.nc"))


def observation_interval(ds, dt: float) -> int:
    """Model steps between observation times, from the file's time coordinate."""
    times = np.asarray(ds["time"].values, dtype=np.float64)
    if times.size < 2:
        return 1
    spacing = np.diff(times)
    if not np.allclose(spacing, spacing[0], rtol=1e-6):
        raise ValueError("observation times are not evenly spaced")
    steps = spacing[0] / dt
    if abs(steps - round(steps)) > 1e-6 * max(1.0, steps):
        raise ValueError(
            f"observation spacing {spacing[0]:g} is not a multiple of the simulator "
            f"time step dt={dt:g}"
        )
    return int(round(steps))


def open_data(cfg, grid, out):
    """`(dataset, path, observation interval in steps)` for the `data` config: a
    generated twin experiment (written to `out`), a file, an archive of files (a
    glob pattern or a directory, opened lazily as one dataset), or the bundled
    dataset."""
    from assim import archive_files, open_archive, open_observations
    from assim._io import write_netcdf

    if cfg.data.kind == "twin":
        path = out / "observations.nc"
        write_netcdf(generate_twin(cfg.simulator, cfg.twin, int(cfg.seed)), path)
    else:
        path = Path(cfg.data.path) if cfg.data.path else bundled_dataset()
    files = archive_files(str(path))
    if len(files) > 1 or path.is_dir():
        ds = open_archive(files, grid=grid, chunk_times=cfg.data.get("chunk_times", 16))
    else:
        ds = open_observations(files[0], grid=grid)
    return ds, path, observation_interval(ds, float(cfg.simulator.dt))


def _windows(ds, length, heldout, max_windows, dtype):
    """`(count, windows, wholes)`: how many windows will be read; a generator of
    them as assimilated (the held-out points removed from the mask, windows with
    nothing left skipped), read from disk two ahead on a host thread; and a queue
    that receives `(whole window, time index of its first time)` as each window is
    handed out, for scoring its result."""
    from assim import ObservationSet, WindowStream
    from assim._observations import window_starts

    count = len(window_starts(ds, length))
    if max_windows is not None:
        count = min(count, max_windows)
    stream = WindowStream(ds, length, windows=range(count), prefetch=2, dtype=dtype)
    wholes: deque = deque()

    def windows():
        for start, obs in zip(stream.starts, stream, strict=True):
            mask = obs.mask & ~heldout
            if bool(mask.any()):
                wholes.append((obs, start))
                yield ObservationSet(
                    obs.values, mask, obs.error_std, obs.times, obs.truth
                )

    return len(stream), windows(), wholes


def _assimilate(cfg: DictConfig) -> dict:
    out = Path(HydraConfig.get().runtime.output_dir)
    t_start = time.perf_counter()
    method = cfg.method
    net = None
    if method.name == "unrolled":
        from .network import load_network, read_header

        if read_header(method.checkpoint).get("float64"):
            jax.config.update("jax_enable_x64", True)
        net, parameter, header = load_network(method.checkpoint)
        # The network's simulator is the one it was trained with.
        cfg = OmegaConf.create(
            {**OmegaConf.to_container(cfg), "simulator": header["simulator"]}
        )
        simulator = net.simulator
    else:
        simulator, parameter = build_simulator(cfg.simulator)
    grid = simulator.model.grid
    dtype = jnp.zeros(()).dtype
    ds, path, interval = open_data(cfg, grid, out)
    length = method.window_length or ds.attrs.get("window_length", 10)
    if net is not None:
        length = method.window_length or header["n_times"]
    length = int(length)

    # Held-out sensors: a random fraction of the observed grid points, never
    # assimilated, used for rmse_obs_heldout.
    rng = np.random.default_rng(cfg.seed)
    observed_points = np.asarray(ds["obs"].notnull().any("time").values)
    heldout = np.zeros(grid.shape, bool)
    candidates = np.flatnonzero(observed_points)
    n_out = int(round(float(cfg.data.heldout_fraction) * candidates.size))
    heldout.flat[rng.choice(candidates, size=n_out, replace=False)] = True

    # First background: no truth is used, only the observations (their mean) or 0.
    first = ds["obs"].isel(time=slice(0, length)).values
    if method.initial_background == "obs_mean":
        level = float(np.nanmean(first))
    elif method.initial_background == "zero":
        level = 0.0
    else:
        raise ValueError(
            f"initial_background must be 'obs_mean' or 'zero', got "
            f"{method.initial_background!r}"
        )
    count, windows, wholes = _windows(
        ds, length, jnp.asarray(heldout), cfg.data.max_windows, dtype
    )
    first_window = next(windows, None)
    if first_window is None:
        raise ValueError("no observation window left to assimilate")
    windows = itertools.chain([first_window], windows)
    batch = int(method.get("batch_windows", 16))
    bar = None
    if net is not None:
        from assim import assimilate_windows, iter_cycle_unrolled

        background = jnp.full(grid.shape, level, dtype)
        if method.get("cycle", True):
            results = iter_cycle_unrolled(net, windows, background)
        else:  # independent windows, `batch` at a time over every device
            results = _in_batches(
                lambda chunk: assimilate_windows(net, chunk, background),
                windows,
                batch,
            )
        return _finish(
            cfg, ds, path, out, t_start, grid, heldout, parameter, results, wholes
        )

    from assim import DiffusionCovariance, Var4D, assimilate_var_windows, iter_cycle

    estimate = bool(method.estimate_parameters) and parameter is not None
    template = Var4D(
        simulator,
        jnp.full(grid.shape, level, dtype),
        DiffusionCovariance(
            grid,
            method.background_std,
            method.background_length_scale * min(grid.length),
        ),
        observation_interval=interval,
        set_parameters=parameter.set if estimate else None,
        parameter_background=jnp.zeros(parameter.shape, dtype) if estimate else None,
        parameter_std=1.0 if estimate else None,
        model_error_covariance=(
            DiffusionCovariance(
                grid,
                method.model_error_std,
                method.model_error_length_scale * min(grid.length),
            )
            if method.constraint == "weak"
            else None
        ),
    )
    if method.constraint not in ("strong", "weak"):
        raise ValueError(
            f"constraint must be 'strong' or 'weak', got {method.constraint!r}"
        )
    options = {
        "method": method.solver,
        "max_steps": int(method.max_steps),
        "rtol": float(method.rtol),
        "atol": float(method.atol),
    }
    if method.solver == "gauss-newton":
        options["inner_steps"] = int(method.inner_steps)
        options["inner_rtol"] = float(method.inner_rtol)
    if not method.get("cycle", True):
        # Independent windows from the first background, `batch` at a time, each
        # batch split over every device (data parallel).
        results = _in_batches(
            lambda chunk: assimilate_var_windows(template, chunk, **options),
            windows,
            batch,
        )
    else:
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=count * options["max_steps"], desc=method.name, unit="it")

        def on_iteration(window, iteration, cost):
            if bar is not None:
                bar.update(1)
                bar.set_postfix(window=window, cost=f"{cost:.4g}")

        results = iter_cycle(
            template,
            windows,
            cycle_parameters=bool(method.cycle_parameters),
            on_iteration=on_iteration,
            **options,
        )
    try:
        return _finish(
            cfg,
            ds,
            path,
            out,
            t_start,
            grid,
            heldout,
            parameter if estimate else None,
            results,
            wholes,
        )
    finally:
        if bar is not None:
            bar.close()


def _in_batches(assimilate, windows, size: int):
    """The results of `assimilate(list of windows)` over `size` windows at a time
    (the last batch shorter), one result per window, in order."""
    if size < 1:
        raise ValueError(f"batch_windows must be at least 1, got {size}")
    windows = iter(windows)
    while chunk := list(itertools.islice(windows, size)):
        yield from assimilate(chunk)


class _Scores:
    """The run's scores, accumulated window by window (sums of squares and
    counts, error spectra, RMSE per time for the plot), so that no window's
    states need to stay in memory."""

    def __init__(self, heldout, grid):
        self.heldout = np.asarray(heldout)
        self.grid = grid
        self.sums = defaultdict(float)
        self.counts = defaultdict(int)
        self.spectra = None
        self.truth = True
        self.time_index: list[int] = []  # of the input's time axis
        self.series = defaultdict(list)  # RMSE per time

    def _add(self, key, diff, where=None):
        values = diff[where] if where is not None else diff.ravel()
        self.sums[key] += float(np.sum(values**2))
        self.counts[key] += values.size

    def rmse(self, key):
        if not self.counts[key]:
            return None
        return float(np.sqrt(self.sums[key] / self.counts[key]))

    def add(self, result, whole, start: int):
        analysis = np.asarray(result.analysis, np.float64)
        background = np.asarray(result.background, np.float64)
        values = np.asarray(whole.values, np.float64)
        mask = np.asarray(whole.mask, bool)
        held = mask & self.heldout
        used = mask & ~held
        self._add("obs_assimilated", analysis - values, used)
        self._add("background_obs_assimilated", background - values, used)
        self._add("obs_heldout", analysis - values, held)
        self._add("background_obs_heldout", background - values, held)
        self.time_index.extend(range(start, start + len(result.times)))
        self.series["time"].extend(np.asarray(result.times).tolist())
        per_time = tuple(range(1, analysis.ndim))
        self.truth = self.truth and whole.truth is not None
        if not self.truth:
            error = np.where(mask, analysis - values, 0.0) ** 2
            self.series["analysis"].extend(
                np.sqrt(error.sum(per_time) / np.maximum(mask.sum(per_time), 1))
            )
            return
        truth = np.asarray(whole.truth, np.float64)
        self._add("truth", analysis - truth)
        self._add("background_truth", background - truth)
        self._add("truth_norm", truth)
        for key, state in (("analysis", analysis), ("background", background)):
            self.series[key].extend(np.sqrt(np.mean((state - truth) ** 2, per_time)))
        if self.grid.ndim == 2:
            spectra = error_spectra(estimate=analysis, truth=truth)
            self.spectra = (
                spectra
                if self.spectra is None
                else tuple(a + b for a, b in zip(self.spectra, spectra, strict=True))
            )

    def metrics(self) -> dict:
        found = {
            "rmse_obs_assimilated": self.rmse("obs_assimilated"),
            "rmse_background_obs_assimilated": self.rmse("background_obs_assimilated"),
            "rmse_obs_heldout": self.rmse("obs_heldout"),
        }
        if found["rmse_obs_heldout"] is not None:
            found["rmse_background_obs_heldout"] = self.rmse("background_obs_heldout")
        if not self.truth:
            found["rmse_background"] = found["rmse_background_obs_assimilated"]
            return found
        found["rmse_truth"] = self.rmse("truth")
        found["rmse_background"] = self.rmse("background_truth")
        norm = self.rmse("truth_norm")
        if norm == 0:
            raise ValueError("mu_score: the truth is identically zero")
        found["mu_score"] = 1.0 - found["rmse_truth"] / norm
        if self.spectra is not None:
            found["effective_resolution"] = resolution_from_spectra(
                *self.spectra,
                n=self.grid.shape[-1],
                spacing=self.grid.spacing[-1],
            )
        return found


def _finish(cfg, ds, path, out, t_start, grid, heldout, parameter, results, wholes):
    """Write each window's result to `analysis.nc` as it comes and score it; then
    `metrics.json` and the plots."""
    method = cfg.method
    estimate = parameter is not None
    attrs = {
        "title": f"assim-run analysis: {method.name} on {cfg.simulator.name}",
        "method": str(method.name),
        "method_settings": OmegaConf.to_yaml(method),
        "simulator": str(cfg.simulator.name),
        "simulator_settings": OmegaConf.to_yaml(cfg.simulator),
        "observations": str(path),
        "history": "created by assim-run",
    }
    scores = _Scores(heldout, grid)
    writer = AnalysisWriter(
        out / "analysis.nc",
        grid=grid,
        attrs=attrs,
        time_units=ds["time"].attrs.get("units", "model time units"),
    )
    with writer:
        last = None
        for last in results:
            whole, start = wholes.popleft()
            scores.add(last, whole, start)
            writer.append(last)
        wall = time.perf_counter() - t_start
        summaries = writer.summaries
        metrics = {
            "method": OmegaConf.to_container(method),
            "simulator": str(cfg.simulator.name),
            "data": str(path),
            "windows": len(summaries),
            "windows_converged": int(sum(r.info.converged for r in summaries)),
            "wall_time_s": wall,
            "wall_time_per_window_s": wall / len(summaries),
            **scores.metrics(),
        }
        parameters, estimated = {}, None
        if estimate:
            spec = cfg.simulator.parameter
            estimated = np.asarray(parameter.value(jnp.asarray(last.theta)))
            parameters[spec.name] = (
                estimated,
                {"units": spec.units, "long_name": f"estimated {spec.long_name}"},
            )
            metrics["parameters"] = {spec.name: _parameter_entry(ds, spec, estimated)}
        writer.close(parameters)
    write_json(metrics, out / "metrics.json")
    if cfg.plot and jax.process_index() == 0:  # the file only process 0 wrote
        _plot(cfg, ds, out, grid, scores, estimated)
    log.info("wrote %s", out)
    return metrics


def _parameter_entry(ds, spec, estimated) -> dict:
    """The estimated parameter's summary, with its error when the file holds the
    true one (`true_<name>`)."""
    entry = {
        "name": spec.name,
        "units": spec.units,
        "mean": float(estimated.mean()),
        "min": float(estimated.min()),
        "max": float(estimated.max()),
        "background": float(spec.background),
    }
    true_name = f"true_{spec.name}"
    if true_name in ds.variables:
        true = np.asarray(ds[true_name].values)
        norm = np.linalg.norm(true)
        entry["relative_l2_error"] = float(np.linalg.norm(estimated - true) / norm)
        entry["background_relative_l2_error"] = float(
            np.linalg.norm(spec.background - true) / norm
        )
    return entry


def _plot(cfg, ds, out, grid, scores, estimated):
    """The plots, from the written analysis (three times read back) and the
    accumulated RMSE per time."""
    import xarray as xr

    from ._plots import plot_run

    name = cfg.simulator.parameter.name if estimated is not None else None
    true_param = None
    if name is not None and f"true_{name}" in ds.variables:
        true_param = np.asarray(ds[f"true_{name}"].values)
    n = len(scores.time_index)
    picks = sorted({0, n // 2, n - 1})
    index = [scores.time_index[i] for i in picks]
    with xr.open_dataset(out / "analysis.nc") as written:
        snapshots = {"analysis": written["analysis"].isel(time=picks).values}
    snapshots["observations"] = ds["obs"].isel(time=index).values
    if scores.truth:
        snapshots["truth"] = ds["truth"].isel(time=index).values
    plot_run(
        out,
        grid=grid,
        times=np.asarray(scores.series["time"])[picks],
        snapshots=snapshots,
        series=scores.series,
        estimated=estimated,
        true_parameter=true_param,
        parameter_name=name,
    )


@hydra.main(version_base=None, config_path="pkg://assim.configs", config_name="run")
def _main(cfg: DictConfig) -> None:
    metrics = run_app("assim-run", cfg, _assimilate)
    shown = {k: v for k, v in metrics.items() if k not in ("method",)}
    print(OmegaConf.to_yaml(OmegaConf.create(shown)))


def main():
    _main()


if __name__ == "__main__":
    main()
