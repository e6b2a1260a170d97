"""`assim-run`: assimilate observations, cycled or window by window.

With no arguments: the bundled 2D advection-diffusion dataset, strong-constraint
incremental 4D-Var with joint estimation of the diffusivity field. Writes
`analysis.nc`, `metrics.json` and PNG plots into the hydra run directory, e.g.
`assim-run method=var4d_weak`, `assim-run simulator=ks data=twin method=var4d`.
The CLI builds the window problem and the analyser from the config and calls
`assim.cycle` / `assim.assimilate`; everything else is the library's.
"""

import dataclasses
import time
from pathlib import Path

import hydra
import jax
import jax.numpy as jnp
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from assim import (
    AbstractEnsembleAnalyser,
    AnalysisWriter,
    Climatology,
    Ensemble,
    Refined,
    Scores,
    Variational,
    WindowsFailed,
    WindowStream,
    archive_files,
    assimilate,
    bundled_dataset,
    cycle,
    incremental,
    obs_mean_background,
    open_archive,
    open_observations,
    quality_control,
)
from assim._config import (
    build_problem,
    build_terms,
    generate_twin,
    instantiate_trusted,
    load_network,
)
from assim._io import write_json, write_netcdf
from assim._observations import observation_interval, time_values, window_starts
from assim._runtime import runtime_summary

from .common import (
    COMPILE_STATS,
    RUN_SETTINGS,
    check_writable,
    log,
    method_names,
    run_app,
)


def open_data(cfg, grid, out):
    """`(dataset, path, observation interval in steps)` for the `data` config: a
    generated twin experiment (written to `out`), a file, an archive of files (a
    glob pattern or a directory, opened lazily as one dataset), or the bundled
    dataset."""
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


def _assimilate(cfg: DictConfig) -> dict:
    out = Path(HydraConfig.get().runtime.output_dir)
    t_start = time.perf_counter()
    method = cfg.method
    known = method_names()
    if method.name not in known:
        raise ValueError(
            f"method.name {method.name!r} is not a method ({', '.join(known)})"
        )
    check_writable(out, ("analysis.nc", "metrics.json"))
    net, length = None, method.window_length
    if "checkpoint" in list(method):  # a trained network (unrolled, hybrid; "???")
        net, problem, parameter, header = load_network(method.checkpoint)
        cfg = OmegaConf.create(
            {**OmegaConf.to_container(cfg), "simulator": header["simulator"]}
        )
        length = length or header["n_times"]
    else:  # the interval is set once the file is read
        problem_cfg = cfg.problem
        if problem_cfg.get("background_covariance") is None and method.get(
            "background_covariance"
        ):  # the method's own B (a non-smooth prior's uncorrelated B)
            problem_cfg = OmegaConf.merge(
                problem_cfg,
                {"background_covariance": method.background_covariance},
            )
        problem, parameter = build_problem(cfg.simulator, problem_cfg, 1)
    grid = problem.simulator.model.grid
    dtype = jnp.zeros(()).dtype
    ds, path, interval = open_data(cfg, grid, out)
    if net is None:
        problem = dataclasses.replace(problem, observation_interval=interval)
    elif interval != problem.observation_interval:
        raise ValueError(
            f"the file's observations are {interval} model steps apart, the network "
            f"was trained with {problem.observation_interval}"
        )
    if length == "auto":
        if method.name not in ("etkf", "enkf", "letkf"):
            raise ValueError(
                "method.window_length=auto is for the ensemble filters (times per "
                f"compiled call); {method.name} needs a number of times"
            )
        length = times_per_call(grid.shape, dtype, ds.sizes["time"])
    length = int(length or ds.attrs.get("window_length", 10))
    shift = method.get("shift")
    shift = None if shift is None else int(shift)
    count = len(window_starts(ds, length, shift))
    if cfg.data.max_windows is not None:
        count = min(count, int(cfg.data.max_windows))
    heldout = _heldout_points(ds, grid, float(cfg.data.heldout_fraction), cfg.seed)
    background = _first_background(ds, length, method, problem).astype(dtype)
    stream = WindowStream(
        ds, length, stride=shift, windows=range(count), prefetch=2, dtype=dtype
    )
    rejected = []  # gross errors per window (quality control)

    def checked(window):
        window, n = quality_control(window, cfg.get("gross_error_factor"))
        rejected.append(n)
        if n:
            log.warning(
                "window at %s: %d observations rejected as gross errors",
                float(window.times[0]),
                n,
            )
        return window

    windows = (checked(w.withhold(heldout)) for w in stream)
    windows = (w for w in windows if bool(w.mask.any()))

    steering = build_terms(cfg.get("steering"), grid, parameter)
    if net is not None:
        analyser = _network_analyser(net, method, steering, problem)
    else:
        analyser = instantiate_trusted(method.analyser)
        if steering and isinstance(analyser, AbstractEnsembleAnalyser):
            raise ValueError(
                f"steering terms need a variational method; {method.name} is an "
                "ensemble filter"
            )
        problem = problem.with_terms(*steering)
    if isinstance(analyser, AbstractEnsembleAnalyser):
        problem, parameter, background = _ensemble_start(
            cfg, analyser, problem, parameter, background
        )
    adaptation = method.get("adaptation")
    if net is not None and analyser is net:  # a bare network keeps its trained B
        adaptation = None
    if adaptation is not None:
        adaptation = instantiate_trusted(adaptation)
    if method.get("cycle", True):
        results = cycle(
            analyser,
            problem,
            windows,
            background,
            cycle_parameters=bool(method.get("cycle_parameters", True)),
            shift=shift,
            adaptation=adaptation,
        )
    else:  # independent windows, `batch_windows` at a time over every device
        if method.initial_background == "obs_mean":  # each its own observations'
            background = lambda w: obs_mean_background(w, grid.shape)  # noqa: E731
        results = assimilate(
            analyser,
            problem,
            windows,
            background,
            batch_size=int(method.get("batch_windows", 16)),
        )
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        # Per window, on the host: a callback inside the compiled solve (the
        # analyser's `progress`) would keep its program out of JAX's persistent
        # compilation cache, which stores no program holding a host callback.
        # disable=None: no bar when the output is not a terminal (a log file).
        bar = tqdm(total=count, desc=method.name, unit="window", disable=None)
        results = _with_progress(results, bar)
    violations = {}  # each steering term's largest violation of the analyses
    if steering:
        results = _term_violations(results, steering, violations)
    # The analysed times: every window's, or with sliding windows the first
    # window's and each later window's newest `shift`.
    times = length + (count - 1) * shift if shift else count * length
    try:
        return _finish(
            cfg,
            ds,
            path,
            out,
            t_start,
            grid,
            parameter,
            results,
            times,
            rejected,
            violations,
        )
    finally:
        if bar is not None:
            bar.close()


def _network_analyser(net, method, steering, problem):
    """A trained network, or with `method.refine_steps` (the warm-start hybrid) or
    steering terms its analysis refined by incremental Gauss-Newton iterations of
    4D-Var on the window cost with the terms added (`assim.Refined`). Steering a
    network without refinement steps gets 5: its layers never saw the terms. With
    `method.adaptation` the refinement's B is adapted while cycling; the network
    keeps the B it was trained with. With `method.refine_parameters` the
    refinement re-estimates the simulator's unknown parameters from the network's."""
    steps = method.get("refine_steps")
    steps = (5 if steering else 0) if steps is None else int(steps)
    if steps == 0:
        if steering:
            raise ValueError(
                "steering terms on a trained network need refinement steps "
                "(method.refine_steps > 0): the network never saw them"
            )
        return net
    solver = incremental(inner_steps=int(method.get("refine_inner_steps", 20)))
    refinement = Variational(solver, max_steps=steps, gradient_rtol=1e-3)
    trained_b = problem.background_covariance if method.get("adaptation") else None
    return Refined(
        net,
        refinement,
        steering,
        guess_covariance=trained_b,
        estimate_parameters=bool(method.get("refine_parameters", False)),
    )


def _term_violations(results, terms, found: dict):
    """`results`, recording in `found` each steering term's largest violation of
    the analyses in the term's units (`|residual| x tolerance`), with its
    tolerance."""
    for result in results:
        theta = None if result.theta is None else jnp.asarray(result.theta)
        trajectory = jnp.asarray(result.analysis)
        for i, term in enumerate(terms):
            residual = jnp.abs(term.residual(trajectory, theta))
            worst = float(jnp.max(residual)) * term.tolerance if residual.size else 0.0
            entry = found.setdefault(
                i, {"term": type(term).__name__, "tolerance": term.tolerance}
            )
            entry["max_violation"] = max(entry.get("max_violation", 0.0), worst)
        yield result


def _with_progress(results, bar):
    """`results`, advancing `bar` by one window each (with its iterations)."""
    for result in results:
        bar.set_postfix(steps=result.steps, outcome=result.outcome, refresh=False)
        bar.update(1)
        yield result


def _ensemble_start(cfg, analyser, problem, parameter, background):
    """`(problem, parameter, first ensemble)` of an ensemble method: the members
    drawn around the first background from the configured `B` (split over the
    devices); an unknown parameter is held at its background (ensemble methods
    estimate the state)."""
    method = cfg.method
    if parameter is not None:
        log.warning(
            "%s estimates the state only: %s is held at its background %g",
            method.name,
            parameter.name,
            parameter.background,
        )
        problem = problem.with_prior_parameters()
        parameter = None
    seed = method.ensemble.get("seed")
    key = jax.random.PRNGKey(int(cfg.seed if seed is None else seed))
    size = int(method.ensemble.size)
    ensemble = Ensemble.sample(background, problem.background_covariance, size, key)
    return problem, parameter, ensemble.shard()


def times_per_call(
    shape, dtype, n_times: int, budget_bytes: int = 64 << 20, most: int = 200
) -> int:
    """`method.window_length=auto` (the filters): observation times per compiled
    call such that the call's outputs (the analysis mean and spread at each time)
    stay within `budget_bytes`, at most `most`; the largest such divisor of the
    file's `n_times`, so that no time is left after the last window (or the cap
    itself when the largest divisor is under 10). Longer calls pay the per-window
    host work (scores, NetCDF, checks) less often: it is most of a small model's
    cycle (Lorenz-96's ETKF: 0.57 ms per cycle with 10 times per call, 0.27 with
    50)."""
    per_time = 2 * int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    cap = int(max(1, min(most, n_times, budget_bytes // per_time)))
    divisor = max(d for d in range(1, cap + 1) if n_times % d == 0)
    return divisor if divisor >= min(10, cap) else cap


def _heldout_points(ds, grid, fraction: float, seed) -> np.ndarray:
    """A random `fraction` of the observed grid points, never assimilated, kept to
    score the analysis (`rmse_obs_heldout`)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"data.heldout_fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    observed = np.asarray(ds["obs"].notnull().any("time").values)
    heldout = np.zeros(grid.shape, bool)
    candidates = np.flatnonzero(observed)
    n_out = int(round(fraction * candidates.size))
    heldout.flat[rng.choice(candidates, size=n_out, replace=False)] = True
    return heldout


def _first_background(ds, length: int, method, problem):
    """The first background (no truth is used): the first window's observations'
    mean, the mean of all the file's observations (its own climatology), 0, or
    the model's climatological mean (`assim.Climatology`)."""
    grid = problem.simulator.model.grid
    if method.initial_background == "obs_mean":
        level = float(np.nanmean(ds["obs"].isel(time=slice(0, length)).values))
        return jnp.full(grid.shape, level)
    if method.initial_background == "obs_climatology":
        return jnp.full(grid.shape, float(ds["obs"].mean(skipna=True)))
    if method.initial_background == "zero":
        return jnp.zeros(grid.shape)
    if method.initial_background == "climatology":
        return Climatology.from_run(problem.simulator).mean
    raise ValueError(
        "initial_background must be 'obs_mean', 'obs_climatology', 'zero' or "
        f"'climatology', got "
        f"{method.initial_background!r}"
    )


def _finish(
    cfg, ds, path, out, t_start, grid, parameter, results, times, rejected, violations
):
    """Write each window's result to `analysis.nc` as it comes and score it; then
    `metrics.json` and the plots. Windows whose analysis failed (a non-finite cost,
    a solver failure) are reported there and end the run with `WindowsFailed`
    once everything is written."""
    method = cfg.method
    attrs = {
        "title": f"assim-run analysis: {method.name} on {cfg.simulator.name}",
        "method": str(method.name),
        "method_settings": OmegaConf.to_yaml(method),
        "simulator": str(cfg.simulator.name),
        "simulator_settings": OmegaConf.to_yaml(cfg.simulator),
        "observations": str(path),
        "history": "created by assim-run",
    }
    burn_in = int(cfg.scoring.burn_in)
    scores = Scores(grid, snapshot_times={0, times // 2, times - 1}, burn_in=burn_in)
    writer = AnalysisWriter(
        out / "analysis.nc",
        grid=grid,
        attrs=attrs,
        time_units=ds["time"].attrs.get("units", "model time units"),
        time_origin=float(time_values(ds)[0]),
        time_calendar=ds["time"].attrs.get("calendar"),
    )
    with writer:
        last, first_done, first_times = None, None, 0
        for last in results:
            scores.add(last)
            writer.append(last)
            if first_done is None:  # the first window includes the compilation
                first_done, first_times = time.perf_counter(), scores.times
        if last is None:
            raise ValueError("no observation window left to assimilate")
        done = time.perf_counter()
        wall = done - t_start
        summaries = writer.summaries
        # The steady cost of cycling (analysis, forecast, scoring, writing) per
        # analysed time: what a long run costs, compilation and data set-up aside.
        later = scores.times - first_times
        per_time = (done - first_done) / later if later else None
        metrics = {
            "method": OmegaConf.to_container(method),
            "simulator": str(cfg.simulator.name),
            "data": str(path),
            "windows": len(summaries),
            "windows_converged": int(sum(r.converged for r in summaries)),
            "wall_time_s": wall,
            "wall_time_per_window_s": wall / len(summaries),
            "seconds_per_time_after_first_window": per_time,
            "scored_from_time_index": burn_in,
            **scores.metrics(),
            **_consistency(summaries, cfg.scoring),
            "observations_rejected": int(sum(rejected)),
            "steering": [violations[i] for i in sorted(violations)],
            "compilation": COMPILE_STATS.summary(),
            "runtime": runtime_summary(),
        }
        if "refinement_from_guess" in summaries[0].diagnostics:  # method=hybrid
            # How many windows the refinement started from the guess's (the
            # network's) analysis; the others started cold, from the background.
            metrics["windows_refined_from_guess"] = int(
                sum(r.diagnostics["refinement_from_guess"] for r in summaries)
            )
        failed = _failed_windows(summaries)
        metrics["windows_failed"] = len(failed)
        warnings = []
        if failed:
            metrics["failed_windows"] = failed
            warnings.append(
                f"{len(failed)} of {len(summaries)} windows failed (non-finite cost "
                f"or solver failure), first window {failed[0]}"
            )
        if sum(rejected):
            warnings.append(
                f"{sum(rejected)} observations rejected as gross errors (further "
                f"than gross_error_factor={cfg.get('gross_error_factor')} x (spread "
                "+ error std) from their window's median)"
            )
        for warning in warnings:
            log.warning(warning)
        metrics["warnings"] += warnings
        parameters, estimated, history = {}, None, None
        if parameter is not None and last.theta is not None:
            history = np.stack(
                [np.asarray(parameter.value(jnp.asarray(r.theta))) for r in summaries]
            )
            estimated = history[-1]
            attrs = {"units": parameter.units}
            parameters[parameter.name] = (
                estimated,
                {**attrs, "long_name": f"estimated {parameter.long_name}"},
            )
            parameters[f"{parameter.name}_per_window"] = (
                history,
                {**attrs, "long_name": f"{parameter.long_name} estimated by window"},
                ("window",),
            )
            metrics["parameters"] = {
                parameter.name: _parameter_entry(ds, parameter, estimated, history)
            }
        writer.close(parameters)
    write_json(metrics, out / "metrics.json")
    if cfg.plot and jax.process_index() == 0:  # the file only process 0 wrote
        _plot(ds, out, grid, scores, parameter, estimated, history, summaries)
    log.info("wrote %s", out)
    if failed:
        raise WindowsFailed(
            f"{len(failed)} of {len(summaries)} windows failed (non-finite cost or "
            f"solver failure; first: window {failed[0]}); the others are in {out}, "
            "see metrics.json"
        )
    return metrics


def _failed_windows(summaries) -> list[int]:
    """Indices of the windows whose analysis failed: a non-finite cost at the
    background or the analysis, or a solver that reported a failure."""
    return [
        i
        for i, r in enumerate(summaries)
        if r.outcome in ("non_finite", "failed") or not np.all(np.isfinite(r.cost))
    ]


def _consistency(summaries, scoring) -> dict:
    """The run's error statistics: the mean normalised chi-square of the analyses
    (`2 J(x_a) / p`, 1 when B and R match the errors), the last adapted error
    scales, and a warning when the chi-square leaves `scoring.chi2_band` (B or R
    misspecified: the analysis is then far from optimal)."""
    chi2 = np.array([r.diagnostics["chi2_normalised_analysis"] for r in summaries])
    found = {"chi2_normalised_analysis": float(np.nanmean(chi2))}
    last = summaries[-1].diagnostics
    for key in ("background_error_scale", "observation_error_scale"):
        if key in last:
            found[key] = last[key]
    low, high = (float(v) for v in scoring.chi2_band)
    warnings = []
    if not low <= found["chi2_normalised_analysis"] <= high:
        warnings.append(
            f"normalised chi-square of the analyses "
            f"{found['chi2_normalised_analysis']:.3g} is outside [{low:g}, {high:g}]:"
            " the background- or observation-error covariance does not fit the "
            "data (adapt them: method.adaptation, or set "
            "simulator.background_covariance)"
        )
    for warning in warnings:
        log.warning(warning)
    found["warnings"] = warnings
    return found


def _parameter_entry(ds, parameter, estimated, history) -> dict:
    """The estimated parameter's summary (a scalar's estimate after each window
    too), with its error when the file holds the true one (`true_<name>`)."""
    entry = {
        "name": parameter.name,
        "units": parameter.units,
        "mean": float(estimated.mean()),
        "min": float(estimated.min()),
        "max": float(estimated.max()),
        "background": float(parameter.background),
    }
    if estimated.ndim == 0:
        # Each short window's estimate is noisy (the prior does not shrink while
        # cycling): the average over the windows is the better summary.
        entry["per_window"] = [float(v) for v in history]
        entry["mean_over_windows"] = float(np.mean(history))
    true_name = f"true_{parameter.name}"
    if true_name in ds.variables:
        true = np.asarray(ds[true_name].values)
        norm = np.linalg.norm(true)
        entry["relative_l2_error"] = float(np.linalg.norm(estimated - true) / norm)
        entry["background_relative_l2_error"] = float(
            np.linalg.norm(parameter.background - true) / norm
        )
        if estimated.ndim == 0:
            entry["mean_over_windows_relative_error"] = float(
                abs(np.mean(history) - true) / norm
            )
    return entry


def _plot(ds, out, grid, scores, parameter, estimated, history, summaries):
    """The plots, from the snapshots and RMSE per time the scores kept."""
    from ._plots import plot_run

    name = parameter.name if estimated is not None else None
    true_param = None
    if name is not None and f"true_{name}" in ds.variables:
        true_param = np.asarray(ds[f"true_{name}"].values)
    kept = [scores.snapshots[i] for i in sorted(scores.snapshots)]
    snapshots = {
        key: np.stack([s[key] for s in kept])
        for key in ("analysis", "observations", "truth")
        if all(key in s for s in kept)
    }
    plot_run(
        out,
        grid=grid,
        times=np.asarray([s["time"] for s in kept]),
        snapshots=snapshots,
        series=scores.series,
        estimated=estimated,
        history=history,
        window_times=np.asarray([r.times[0] for r in summaries]),
        true_parameter=true_param,
        parameter_name=name,
    )


@hydra.main(version_base=None, config_path="pkg://assim.configs", config_name="run")
def _main(cfg: DictConfig) -> None:
    metrics = run_app("assim-run", cfg, _assimilate, RUN_SETTINGS)
    shown = {k: v for k, v in metrics.items() if k not in ("method",)}
    print(OmegaConf.to_yaml(OmegaConf.create(shown)))


def main():
    _main()


if __name__ == "__main__":
    main()
