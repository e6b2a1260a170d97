"""The CLIs end to end, each run a process of its own (`cli_zygote.run_cli`)."""

import json
import os

import numpy as np
import pytest
import xarray as xr
import yaml
from cli_zygote import run_cli


def _run(tmp_path, *overrides):
    return run_cli(
        "assim._cli.simulate",
        f"hydra.run.dir={tmp_path}",
        *overrides,
        cwd=tmp_path,
        timeout=300,
    )


def test_simulate_writes_netcdf_metrics_and_plot(tmp_path):
    result = _run(
        tmp_path,
        "simulator=burgers1d",
        "n_steps=6",
        "float64=true",
        f"compilation_cache.dir={tmp_path / 'cache'}",
    )
    assert result.returncode == 0, result.stderr
    ds = xr.open_dataset(tmp_path / "trajectory.nc")
    assert ds["state"].dims == ("time", "x")
    assert ds["state"].shape == (7, 128)
    assert ds.attrs["Conventions"] == "CF-1.8"
    assert ds.attrs["simulator"] == "Burgers"
    assert ds["x"].attrs["units"]
    assert np.all(np.isfinite(ds["state"].values))
    np.testing.assert_allclose(np.diff(ds["time"].values), 0.004)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_steps"] == 6
    assert metrics["mean_newton_steps"] >= 2  # CN on Burgers really iterates
    assert (tmp_path / "trajectory.png").stat().st_size > 1000
    # Every program compiled went to the persistent cache (the blow-up check is
    # on the host: none holds a host callback).
    compiled = metrics["compilation"]
    stored = list((tmp_path / "cache").glob("*-cache"))
    assert len(stored) == compiled["programs"] - compiled["cache_hits"] > 0


def test_simulate_bad_input_fails_cleanly(tmp_path):
    result = _run(tmp_path, "simulator=lorenz96", "simulator.dt=-0.1", "n_steps=3")
    assert result.returncode != 0
    assert "time step dt must be positive" in result.stderr
    assert not (tmp_path / "trajectory.nc").exists()
    assert not (tmp_path / "metrics.json").exists()
    # RK4 at a step 50x Lorenz-96's usual one blows up: one line, nothing written.
    result = _run(tmp_path, "simulator=lorenz96", "simulator.dt=0.5", "n_steps=50")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "rollout became non-finite at step" in errors[0]
    assert not (tmp_path / "trajectory.nc").exists()


def _app(module, tmp_path, *overrides, run_dir=None, env=None):
    return run_cli(
        f"assim._cli.{module}",
        f"hydra.run.dir={run_dir or tmp_path}",
        *overrides,
        cwd=tmp_path,
        env=env,
    )


_SMALL_1D = [
    "simulator=advection_diffusion1d",
    "simulator.model.grid.shape=[24]",
    "twin.n_times=8",
    "twin.window_length=4",
    "twin.spinup_steps=20",
    "twin.sensors.density=0.3",
    "twin.noise_std=0.02",
]


def test_data_then_run_end_to_end(tmp_path):
    """`assim-data` then `assim-run` on its file, with a CF datetime axis (days
    since a date: the model's time unit is the day) that `analysis.nc` keeps."""
    gen = _app(
        "data",
        tmp_path,
        *_SMALL_1D,
        "twin.sensors.pattern=stations",
        "twin.time_units='days since 2000-01-01'",
        "float64=true",
        "output=obs.nc",
    )
    assert gen.returncode == 0, gen.stderr
    ds = xr.open_dataset(tmp_path / "obs.nc")
    assert ds["obs"].dims == ("time", "x") and ds.sizes["time"] == 8
    assert ds.attrs["Conventions"] == "CF-1.8"
    assert ds["obs"].attrs["ancillary_variables"] == "obs_error_std"
    assert "standard_error" in ds["obs_error_std"].attrs["standard_name"]
    observed = np.isfinite(ds["obs"].values)
    assert 0.15 < observed.mean() < 0.35  # density 0.3, dropout 0.1
    # Fixed stations with dropout: all times draw from the same 30% of the points.
    assert observed.any(axis=0).mean() <= 0.31
    assert set(np.unique(ds["split"].values)) == {0, 1}  # 2 windows: train, val
    assert ds["true_kappa"].dims == ("x",)
    run = _app(
        "run",
        tmp_path,
        *_SMALL_1D,
        f"data.path={tmp_path / 'obs.nc'}",
        "method.analyser.max_steps=3",
        "float64=true",
        f"compilation_cache.dir={tmp_path / 'cache'}",  # progress on (the default)
        run_dir=tmp_path / "run",
    )
    assert run.returncode == 0, run.stderr
    # Every program compiled went to the persistent cache: none holds a host
    # callback (a progress callback inside the window's solve would keep it out).
    compiled = json.loads((tmp_path / "run" / "metrics.json").read_text())
    compiled = compiled["compilation"]
    stored = list((tmp_path / "cache").glob("*-cache"))
    assert len(stored) == compiled["programs"] - compiled["cache_hits"] > 10
    analysis = xr.open_dataset(tmp_path / "run" / "analysis.nc")  # dates decoded
    np.testing.assert_array_equal(analysis["time"].values, ds["time"].values)
    assert str(analysis["time"].values[0]).startswith("2000-01-01")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in (
        "rmse_obs_heldout",
        "rmse_truth",
        "rmse_background",
        "wall_time_s",
        "method",
        "parameters",
    ):
        assert key in metrics, key
    assert metrics["rmse_truth"] < 0.5 * metrics["rmse_background"], metrics
    assert metrics["parameters"]["kappa"]["units"] == "length2 time-1"
    assert "relative_l2_error" in metrics["parameters"]["kappa"]
    assert metrics["method"]["analyser"]["solver"]["_target_"] == "assim.incremental"
    # Where it ran: the backend, its devices, the precision asked for, peak memory.
    runtime = metrics["runtime"]
    assert runtime["backend"] == "cpu" and runtime["devices"] >= 1, runtime
    assert runtime["device_kind"] and runtime["jax"] and runtime["processes"] == 1
    assert runtime["float64"] is True and runtime["peak_host_memory_mib"] > 0
    peak = runtime["peak_device_memory_mib"]
    assert peak is None or peak > 0  # None: a backend without device statistics
    # The same windows as independent problems, all at once (method.cycle=false).
    run = _app(
        "run",
        tmp_path,
        *_SMALL_1D,
        f"data.path={tmp_path / 'obs.nc'}",
        "method.analyser.max_steps=3",
        "method.cycle=false",
        "float64=true",
        "progress=false",
        "plot=false",
        run_dir=tmp_path / "independent",
    )
    assert run.returncode == 0, run.stderr
    independent = json.loads((tmp_path / "independent" / "metrics.json").read_text())
    assert independent["windows"] == metrics["windows"] == 2
    assert independent["rmse_truth"] < 0.5 * independent["rmse_background"]
    analysis = xr.open_dataset(tmp_path / "run" / "analysis.nc")
    assert analysis["analysis"].shape == (8, 24)
    assert analysis["kappa"].attrs["units"] == "length2 time-1"
    assert analysis["cost_history"].dims == ("window", "iteration")
    assert np.all(analysis["cost_final"] < analysis["cost_initial"])
    for png in ("fields.png", "parameter.png", "rmse.png"):
        assert (tmp_path / "run" / png).stat().st_size > 1000


def test_run_bundled_dataset_default(tmp_path):
    # The README's main job, cut to two windows of three outer loops for time.
    run = _app(
        "run",
        tmp_path,
        "data.max_windows=2",
        "method.analyser.max_steps=3",
        "plot=false",
        "progress=false",
        # Long compute, little compilation: XLA's default optimisation (conftest
        # lowers it for the other tests).
        env={**os.environ, "XLA_FLAGS": ""},
    )
    assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["simulator"] == "advection_diffusion2d"
    assert metrics["rmse_truth"] < 0.2 * metrics["rmse_background"], metrics
    # The diffusivity field: relative L2 error 0.52 (background) -> 0.098 measured
    # here; 0.066 with the full default run (README).
    kappa = metrics["parameters"]["kappa"]
    assert kappa["relative_l2_error"] < 0.15, kappa


def test_run_twin_lorenz96_3dvar(tmp_path):
    run = _app(
        "run",
        tmp_path,
        "simulator=lorenz96",
        "data=twin",
        "method=var3d",
        "twin.n_times=6",
        "twin.window_length=1",
        "twin.spinup_steps=100",
        "twin.sensors.pattern=stations",
        "twin.sensors.density=0.5",
        "twin.sensors.dropout=0.0",
        "twin.truth.missing_term.kind=none",
        "method.initial_background=climatology",
        "plot=false",
        "progress=false",
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "observations.nc").exists()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["windows"] == 6 and "parameters" not in metrics
    assert metrics["rmse_truth"] < metrics["rmse_background"], metrics
    # B's scale adapted from the second window on (the default)
    with xr.open_dataset(tmp_path / "analysis.nc") as ds:
        scale = ds["background_error_scale"].values
    assert scale[0] == 1.0 and np.all(scale[2:] != 1.0), scale


# A Lorenz-96 twin of the published setting, cut short: every variable observed
# every 0.05 with error std 1, 24 times.
_L96_FULL = [
    "simulator=lorenz96",
    "twin=dense",
    "twin.observation_interval=5",
    "twin.n_times=24",
    "twin.spinup_steps=500",
    "float64=true",  # the L-BFGS and sliding runs below agree across machines
]


def test_run_lorenz96_methods_on_one_twin(tmp_path):
    """The `assim-run` methods a DAPPER user compares, on one Lorenz-96 twin:
    climatology, optimal interpolation and cycled 3D-Var (each better than the
    last), L-BFGS 4D-Var on windows of 4 (its trial steps blow the chaotic model
    up: backed off from), and sliding-window 4D-Var (lag 3, shift 1); and the
    burn-in changing the scores as stated."""
    gen = _app("data", tmp_path, *_L96_FULL, "output=obs.nc")
    assert gen.returncode == 0, gen.stderr
    common = [*_L96_FULL, f"data.path={tmp_path / 'obs.nc'}", "data.heldout_fraction=0"]
    common += ["plot=false", "progress=false"]  # plots: test_data_then_run
    with xr.open_dataset(tmp_path / "obs.nc") as obs:  # physical bounds, known
        lower, upper = obs["truth"].min() - 0.005, obs["truth"].max() + 0.005
    steering = (
        f"steering=[{{_target_: assim.StateBounds, lower: {float(lower)}, "
        f"upper: {float(upper)}, tolerance: 0.01}}]"
    )
    found = {}
    for name, *overrides in [
        ("climatology", "method=climatology"),
        ("oi", "method=oi"),
        ("var3d", "method=var3d", "scoring.burn_in=0"),
        ("var4d_lbfgs", "method=var4d_lbfgs", "method.window_length=4"),
        ("sliding", "method=var4d_sliding", "method.window_length=4"),
        ("etkf", "method=etkf", "scoring.burn_in=8"),
        ("hybrid", "method=hybrid_4dvar", "method.window_length=4"),
        ("var4d", "method=var4d", "method.window_length=4"),
        ("var4d_bounded", "method=var4d", "method.window_length=4", steering),
    ]:
        run = _app("run", tmp_path, *common, *overrides, run_dir=tmp_path / name)
        assert run.returncode == 0, (name, run.stderr)
        found[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    rmse = {name: m["rmse_truth"] for name, m in found.items()}
    assert rmse["var3d"] < rmse["oi"] < rmse["climatology"], rmse
    assert 2.5 < rmse["climatology"] < 5.0, rmse  # the climate's spread, ~3.6
    # Burn-in (the ETKF's, 8): scored on the times from the 9th on only.
    assert found["var3d"]["scored_from_time_index"] == 0
    assert found["etkf"]["scored_from_time_index"] == 8
    with (
        xr.open_dataset(tmp_path / "etkf" / "analysis.nc") as ds,
        xr.open_dataset(tmp_path / "obs.nc") as obs,
    ):
        error = ds["analysis"].values - obs["truth"].values
    np.testing.assert_allclose(
        rmse["etkf"], np.sqrt(np.mean(error[8:] ** 2)), rtol=1e-6
    )
    assert rmse["etkf"] < np.sqrt(np.mean(error**2))  # the spin-up left out
    lbfgs = found["var4d_lbfgs"]
    assert lbfgs["windows"] == 6 and lbfgs["rmse_truth"] < 0.8, lbfgs
    sliding = found["sliding"]
    assert sliding["windows"] == 21, sliding  # windows start at times 0..20
    assert sliding["rmse_truth"] < 0.8, sliding
    with xr.open_dataset(tmp_path / "sliding" / "analysis.nc") as ds:
        assert ds.sizes["time"] == 24  # each time reported once
    # The ensemble filter: its spread written, scored with the Desroziers
    # statistics (R is right here: their estimate of the error std is near 1).
    etkf = found["etkf"]
    assert etkf["rmse_truth"] < rmse["oi"], etkf  # 24 times: still spinning up
    assert 0.3 < etkf["spread_skill_ratio"] < 3, etkf
    assert 0.8 < etkf["desroziers"]["observation_error_std_estimated"] < 1.2, etkf
    assert etkf["desroziers"]["observation_error_std_assumed"] == 1.0
    with xr.open_dataset(tmp_path / "etkf" / "analysis.nc") as ds:
        assert ds["spread"].shape == ds["analysis"].shape == (24, 40)
    assert found["hybrid"]["rmse_truth"] < rmse["oi"], found["hybrid"]
    # Steering from the command line: bounds the truth keeps, which plain 4D-Var
    # overshoots (by 0.06 here), honoured to their tolerance; the analysis is no
    # worse.
    violation = {}
    for name in ("var4d", "var4d_bounded"):
        with xr.open_dataset(tmp_path / name / "analysis.nc") as ds:
            x = ds["analysis"].values
        violation[name] = max(float(x.max() - upper), float(lower - x.min()), 0.0)
    assert violation["var4d_bounded"] < 0.01 < violation["var4d"], violation
    (reported,) = found["var4d_bounded"]["steering"]  # also in metrics.json
    assert reported["term"] == "StateBounds" and reported["tolerance"] == 0.01
    np.testing.assert_allclose(
        reported["max_violation"], violation["var4d_bounded"], rtol=1e-4, atol=1e-9
    )
    # `auto` times per call is the filters' (the ETKF above ran with it).
    auto = _app("run", tmp_path, *common, "method=var4d", "method.window_length=auto")
    assert auto.returncode != 0 and "window_length=auto" in auto.stderr
    assert found["var4d"]["steering"] == []
    assert rmse["var4d_bounded"] <= rmse["var4d"] * 1.01, rmse


def test_run_bad_input_fails_cleanly(tmp_path):
    missing = _app("run", tmp_path, f"data.path={tmp_path / 'nope.nc'}")
    assert missing.returncode == 2
    assert "observation file not found" in missing.stderr
    assert not (tmp_path / "analysis.nc").exists()
    # A file for another grid: the bundled 32x32 data with a 16x16 simulator.
    grid = _app("run", tmp_path, "simulator.model.grid.shape=[16,16]")
    assert grid.returncode == 2
    assert "does not match the simulator grid" in grid.stderr
    assert not (tmp_path / "metrics.json").exists()
    bad = _app("data", tmp_path, "twin.noise_std=-1", "output=x.nc")
    assert bad.returncode == 2 and "twin.noise_std must be > 0" in bad.stderr
    assert not (tmp_path / "x.nc").exists()
    # Three fill values (1e30) among the bundled observations: refused, one line.
    from assim import bundled_dataset

    ds = xr.open_dataset(bundled_dataset())
    obs = ds["obs"].values.copy()
    observed = np.argwhere(np.isfinite(obs))
    for t, y, x in observed[[0, 5, 9]]:
        obs[t, y, x] = 1e30
    ds.assign(obs=(ds["obs"].dims, obs)).to_netcdf(tmp_path / "fill.nc")
    fill = _app("run", tmp_path, "data=file", f"data.path={tmp_path / 'fill.nc'}")
    assert fill.returncode == 2, fill.stderr
    errors = [line for line in fill.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "exceed 1e+07 times their error std" in errors[0]
    assert not (tmp_path / "metrics.json").exists()
    assert not (tmp_path / "analysis.nc").exists()


# A tiny Lorenz-96 twin experiment for the training apps: 2 windows of 4 times.
TINY_L96_TWIN = [
    "simulator=lorenz96",
    "data=twin",
    "twin.n_times=8",
    "twin.window_length=4",
    "twin.spinup_steps=100",
    "twin.sensors.pattern=stations",
    "twin.sensors.density=0.5",
    "twin.sensors.dropout=0.0",
    "twin.truth.missing_term.kind=none",
    "twin.time_units='hours since 2000-01-01 00:00'",  # a CF datetime axis
]


def _summary(app) -> dict:
    """The summary an app prints (YAML) after its log lines."""
    lines = [line for line in app.stdout.splitlines() if not line.startswith("[")]
    return yaml.safe_load("\n".join(lines))


def _run_checkpoint(tmp_path, name, *overrides, method="unrolled"):
    """`assim-run method=unrolled` (or `hybrid`) with the checkpoint and
    observations that `assim-train` left in `tmp_path`; its metrics."""
    run = _app(
        "run",
        tmp_path,
        f"method={method}",
        f"method.checkpoint={tmp_path / 'checkpoint.eqx'}",
        f"data.path={tmp_path / 'observations.nc'}",
        "plot=false",
        "progress=false",
        *overrides,
        run_dir=tmp_path / name,
    )
    assert run.returncode == 0, run.stderr
    return json.loads((tmp_path / name / "metrics.json").read_text())


def test_train_resume_then_run_unrolled(tmp_path):
    """`assim-train` on a tiny Lorenz-96 twin (its backgrounds cycled by the network,
    refreshed before step 3, after the resume), resumed to one more step, then the
    checkpoint used by `assim-run method=unrolled`, cycled."""
    small = [
        *TINY_L96_TWIN,
        "network.net.n_layers=2",
        "network.net.width=4",
        "network.net.depth=2",
        "training.batch_size=1",
        "training.checkpoint_every=1",
        "training.cycle_every=2",
        "training.weights.cost=0.1",  # added to the default masking loss
        "training.loss.terms.cost.loss.refine=1",  # refined by Gauss-Newton
        "training.loss.terms.cost.loss.refine_cg=5",
        "progress=false",
    ]
    cache = f"compilation_cache.dir={tmp_path / 'cache'}"
    first = _app("train", tmp_path, *small, "training.steps=2", cache)
    assert first.returncode == 0, first.stderr
    # Every program compiled went to the persistent cache (none holds a host
    # callback: the training programs raise nothing inside, the run stops on a
    # non-finite loss on the host), and the resumed run loads most from it.
    compiled = _summary(first)["compilation"]
    assert _summary(first)["runtime"]["float64"] is False  # assim-train's default
    stored = len(list((tmp_path / "cache").glob("*-cache")))
    assert stored == compiled["programs"] - compiled["cache_hits"] > 10
    resumed = _app("train", tmp_path, *small, "training.steps=3", "resume=true", cache)
    assert resumed.returncode == 0, resumed.stderr
    compiled = _summary(resumed)["compilation"]
    new = len(list((tmp_path / "cache").glob("*-cache"))) - stored
    assert new == compiled["programs"] - compiled["cache_hits"], compiled
    assert compiled["cache_hits"] > 0.8 * compiled["programs"], compiled
    records = [
        json.loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r.get("cycled_windows") for r in records] == [None, None, 1]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert all(r["cost"] > 0 and "masking" in r for r in records)
    metrics = _run_checkpoint(tmp_path, "run")
    assert metrics["rmse_truth"] < metrics["rmse_background"], metrics
    # The warm-start hybrid: the network's analysis refined by 2 Gauss-Newton
    # iterations of 4D-Var is closer to the truth than the network's.
    hybrid = _run_checkpoint(tmp_path, "hybrid", method="hybrid")
    assert hybrid["rmse_truth"] < metrics["rmse_truth"], (hybrid, metrics)
    assert hybrid["method"]["refine_steps"] == 2
    # Where each window's refinement started (the network's analysis or, where it
    # fit worse, the background), per window in the file and counted in metrics.
    ds = xr.open_dataset(tmp_path / "hybrid" / "analysis.nc")
    from_guess = ds["refinement_from_guess"].values
    assert set(from_guess.tolist()) <= {0, 1} and len(from_guess) == hybrid["windows"]
    assert hybrid["windows_refined_from_guess"] == int(from_guess.sum())
    missing = _app("run", tmp_path, "method=unrolled", "method.checkpoint=nope.eqx")
    assert missing.returncode != 0 and "nope.eqx" in missing.stderr


def test_train_bilevel_with_evidence_then_run(tmp_path):
    """`assim-train network=bilevel` with the evidence loss (zero weights switch the
    default masking loss off) through a fully implicit scheme (backward Euler:
    Newton-Krylov stages, reverse-over-reverse Hessian products; the inner L-BFGS's
    first trial steps are too long for Newton and are backed off from), then its
    checkpoint in `assim-run`: converged 4D-Var in every window."""
    train = _app(
        "train",
        tmp_path,
        *TINY_L96_TWIN,
        "scheme@simulator.scheme=backward_euler",
        # Lorenz-96's default B is its climatology (variance ~13): with this twin's
        # small noise (0.05) the inner 4D-Var is too ill-conditioned for float32
        # L-BFGS to meet rtol 1e-6 in 500 iterations; a diffusion B (std 0.3) is.
        "covariance@simulator.background_covariance=diffusion",
        "network=bilevel",
        "training.batch_size=1",
        "training.steps=2",
        "training.weights.masking=0",
        "training.weights.evidence=1",
        "progress=false",
    )
    assert train.returncode == 0, train.stderr
    records = [
        json.loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(set(r) >= {"evidence", "loss"} for r in records)
    assert all("masking" not in r for r in records)
    metrics = _run_checkpoint(tmp_path, "run")
    assert metrics["windows_converged"] == metrics["windows"] == 2
    assert metrics["rmse_truth"] < metrics["rmse_background"], metrics
    metrics = _run_checkpoint(tmp_path, "independent", "method.cycle=false")
    assert metrics["windows_converged"] == metrics["windows"] == 2


def test_archive_of_files_streamed_to_train_and_run(tmp_path):
    """A twin split into 3 files: `assim-train data.stream=true` on the folder (the
    training windows read from disk batch by batch), `assim-run` on a glob of it;
    a file without the others' variables makes it fail naming the file, with
    nothing written."""
    twin = [arg for arg in TINY_L96_TWIN if arg != "data=twin"] + ["twin.n_times=24"]
    made = _app("data", tmp_path, *twin, "output=twin.nc")
    assert made.returncode == 0, made.stderr
    ds = xr.open_dataset(tmp_path / "twin.nc").load().drop_encoding()
    archive = tmp_path / "archive"
    archive.mkdir()
    # The twin's time unit kept (xarray would pick minutes for 3-minute spacing,
    # and the simulator's dt is in the file's unit).
    hours = {"time": {"units": "hours since 2000-01-01 00:00", "dtype": "f8"}}
    for k in range(3):
        part = ds.isel(time=slice(8 * k, 8 * k + 8))
        part.to_netcdf(archive / f"obs_{k}.nc", encoding=hours)
    small = ["network.net.n_layers=2", "network.net.width=4", "network.net.depth=2"]
    train = _app(
        "train",
        tmp_path,
        "simulator=lorenz96",
        f"data.path={archive}",
        "data.stream=true",
        "network.window_length=4",
        *small,
        "training.batch_size=2",
        "training.steps=2",
        "progress=false",
    )
    assert train.returncode == 0, train.stderr
    assert "train_windows: " in train.stdout
    metrics = _run_checkpoint(
        tmp_path, "run", f"data.path={archive}/obs_*.nc", "simulator=lorenz96"
    )
    assert metrics["windows"] == 6  # 24 times from 3 files, windows of 4
    part = ds.isel(time=slice(16, 24)).drop_vars("truth")
    part.to_netcdf(archive / "obs_2.nc", encoding=hours)
    bad = _app(
        "run",
        tmp_path,
        "simulator=lorenz96",
        f"data.path={archive}",
        "method=var4d_lbfgs",
        run_dir=tmp_path / "bad",
    )
    assert bad.returncode != 0
    assert f"{archive / 'obs_2.nc'}: does not match" in bad.stderr
    assert "obs_0.nc: variables" in bad.stderr
    assert not (tmp_path / "bad" / "analysis.nc").exists()


@pytest.mark.parametrize("network", ["unrolled_gn", "unrolled_admm"])
def test_train_then_run_unrolled_solvers(tmp_path, network):
    """`assim-train network=unrolled_gn` / `unrolled_admm` (two steps on a tiny
    Lorenz-96 twin), then the checkpoint run by `assim-run`: better than the
    background."""
    small = [*TINY_L96_TWIN, f"network={network}", "network.net.n_layers=2"]
    trained = _app(
        "train",
        tmp_path,
        *small,
        "training.batch_size=1",
        "training.steps=2",
        "progress=false",
    )
    assert trained.returncode == 0, trained.stderr
    metrics = _run_checkpoint(tmp_path, "run")
    assert metrics["rmse_truth"] < 0.7 * metrics["rmse_background"], metrics


def test_run_tv_4dvar(tmp_path):
    """`assim-run method=tv_4dvar` (FISTA with a TV prior, its diagonal B) on a
    small 1D twin: better than the background; a `problem.background_covariance`
    given on the command line is used instead of the method's."""
    run = _app(
        "run",
        tmp_path,
        *_SMALL_1D,
        "data=twin",
        "method=tv_4dvar",
        "method.analyser.prior.periodic=false",
        "method.analyser.max_steps=50",
        "plot=false",
        "progress=false",
    )
    assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["rmse_truth"] < metrics["rmse_background"], metrics
    assert metrics["method"]["analyser"]["_target_"] == "assim.ProximalGradient"
