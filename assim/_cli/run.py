"""`assim-run`: assimilate observations with cycled variational assimilation.

With no arguments: the bundled 2D advection-diffusion dataset, strong-constraint
incremental 4D-Var with joint estimation of the diffusivity field. Writes
`analysis.nc`, `metrics.json` and PNG plots into the hydra run directory, e.g.
`assim-run method=var4d_weak`, `assim-run simulator=ks data=twin method=var4d`.
"""

import time
from importlib import resources
from pathlib import Path

import hydra
import jax
import jax.numpy as jnp
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

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
    """Observation windows with the held-out points removed from the mask (read two
    windows ahead on a host thread)."""
    from assim import ObservationSet, iter_windows, prefetch

    for k, obs in enumerate(prefetch(iter_windows(ds, length), 2)):
        if max_windows is not None and k >= max_windows:
            return
        mask = obs.mask & ~heldout
        if not bool(mask.any()):
            continue
        cast = lambda a: None if a is None else jnp.asarray(a, dtype)  # noqa: E731
        yield (
            ObservationSet(
                cast(obs.values),
                mask,
                cast(obs.error_std),
                cast(obs.times),
                cast(obs.truth),
            ),
            obs,
        )


def _assimilate(cfg: DictConfig) -> dict:
    from assim import (
        DiffusionCovariance,
        Var4D,
        cycle,
    )

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
    context = (cfg, ds, path, out, t_start, grid, heldout)  # for _finish
    if net is not None:
        outcome = _unrolled_pairs(cfg, ds, net, length, heldout, dtype, level)
        return _finish(*context, parameter, outcome)
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
    pairs = list(
        _windows(ds, length, jnp.asarray(heldout), cfg.data.max_windows, dtype)
    )
    if not pairs:
        raise ValueError("no observation window left to assimilate")
    solver_options = {"rtol": float(method.rtol), "atol": float(method.atol)}
    if method.solver == "gauss-newton":
        solver_options["inner_steps"] = int(method.inner_steps)
        solver_options["inner_rtol"] = float(method.inner_rtol)
    bar = None
    if not method.get("cycle", True):
        # Independent windows from the first background, all at once, split over
        # every device (data parallel).
        from assim import assimilate_var_windows

        results = assimilate_var_windows(
            template,
            [p[0] for p in pairs],
            method=method.solver,
            max_steps=int(method.max_steps),
            **solver_options,
        )
    else:
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=len(pairs) * int(method.max_steps), desc=method.name, unit="iter"
            )

        def on_iteration(window, iteration, cost):
            if bar is not None:
                bar.update(1)
                bar.set_postfix(window=window, cost=f"{cost:.4g}")

        results = cycle(
            template,
            (p[0] for p in pairs),
            method=method.solver,
            max_steps=int(method.max_steps),
            cycle_parameters=bool(method.cycle_parameters),
            on_iteration=on_iteration,
            **solver_options,
        )
    if bar is not None:
        bar.close()
    return _finish(*context, parameter if estimate else None, (results, pairs))


def _unrolled_pairs(cfg, ds, net, length, heldout, dtype, level):
    from assim import assimilate_windows, cycle_unrolled

    pairs = list(
        _windows(ds, length, jnp.asarray(heldout), cfg.data.max_windows, dtype)
    )
    if not pairs:
        raise ValueError("no observation window left to assimilate")
    background = jnp.full(net.simulator.model.grid.shape, level, dtype)
    windows = [p[0] for p in pairs]
    if cfg.method.get("cycle", True):
        return cycle_unrolled(net, windows, background), pairs
    # Independent windows, all at once, split over every device.
    return assimilate_windows(net, windows, background), pairs


def _finish(cfg, ds, path, out, t_start, grid, heldout, parameter, outcome):
    from assim import analysis_dataset, effective_resolution, mu_score, rmse
    from assim._io import write_json, write_netcdf

    results, pairs = outcome
    method = cfg.method
    estimate = parameter is not None
    wall = time.perf_counter() - t_start

    # Scores.
    analysis = np.concatenate([r.analysis for r in results])
    background = np.concatenate([r.background for r in results])
    full = [p[1] for p in pairs][: len(results)]
    values = np.concatenate([np.asarray(o.values) for o in full])
    mask = np.concatenate([np.asarray(o.mask) for o in full])
    held = mask & np.broadcast_to(heldout, mask.shape)
    used = mask & ~held
    metrics = {
        "method": OmegaConf.to_container(method),
        "simulator": str(cfg.simulator.name),
        "data": str(path),
        "windows": len(results),
        "windows_converged": int(sum(r.info.converged for r in results)),
        "wall_time_s": wall,
        "wall_time_per_window_s": wall / len(results),
        "rmse_obs_assimilated": rmse(estimate=analysis, reference=values, mask=used),
        "rmse_background_obs_assimilated": rmse(
            estimate=background, reference=values, mask=used
        ),
    }
    if held.any():
        metrics["rmse_obs_heldout"] = rmse(
            estimate=analysis, reference=values, mask=held
        )
        metrics["rmse_background_obs_heldout"] = rmse(
            estimate=background, reference=values, mask=held
        )
    else:
        metrics["rmse_obs_heldout"] = None
    truth = None
    if full[0].truth is not None:
        truth = np.concatenate([np.asarray(o.truth) for o in full])
        metrics["rmse_truth"] = rmse(estimate=analysis, reference=truth)
        metrics["rmse_background"] = rmse(estimate=background, reference=truth)
        metrics["mu_score"] = mu_score(estimate=analysis, truth=truth)
        if grid.ndim == 2:
            metrics["effective_resolution"] = effective_resolution(
                estimate=analysis, truth=truth, spacing=grid.spacing[-1]
            )
    else:
        metrics["rmse_background"] = metrics["rmse_background_obs_assimilated"]
    parameters, estimated = {}, None
    if estimate:
        spec = cfg.simulator.parameter
        estimated = np.asarray(parameter.value(jnp.asarray(results[-1].theta)))
        parameters[spec.name] = (
            estimated,
            {"units": spec.units, "long_name": f"estimated {spec.long_name}"},
        )
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
        metrics["parameters"] = {spec.name: entry}
    attrs = {
        "title": f"assim-run analysis: {method.name} on {cfg.simulator.name}",
        "method": str(method.name),
        "method_settings": OmegaConf.to_yaml(method),
        "simulator": str(cfg.simulator.name),
        "simulator_settings": OmegaConf.to_yaml(cfg.simulator),
        "observations": str(path),
        "history": "created by assim-run",
    }
    dataset = analysis_dataset(
        results,
        grid=grid,
        parameters=parameters,
        attrs=attrs,
        time_units=ds["time"].attrs.get("units", "model time units"),
    )
    write_netcdf(dataset, out / "analysis.nc")
    write_json(metrics, out / "metrics.json")
    if cfg.plot:
        from ._plots import plot_run

        true_param = None
        if estimate and f"true_{cfg.simulator.parameter.name}" in ds.variables:
            true_param = np.asarray(ds[f"true_{cfg.simulator.parameter.name}"].values)
        plot_run(
            out,
            grid=grid,
            times=np.concatenate([r.times for r in results]),
            analysis=analysis,
            background=background,
            truth=truth,
            observations=np.where(mask, values, np.nan),
            estimated=estimated,
            true_parameter=true_param,
            parameter_name=cfg.simulator.parameter.name if estimate else None,
        )
    log.info("wrote %s", out)
    return metrics


@hydra.main(version_base=None, config_path="pkg://assim.configs", config_name="run")
def _main(cfg: DictConfig) -> None:
    metrics = run_app("assim-run", cfg, _assimilate)
    shown = {k: v for k, v in metrics.items() if k not in ("method",)}
    print(OmegaConf.to_yaml(OmegaConf.create(shown)))


def main():
    _main()


if __name__ == "__main__":
    main()
