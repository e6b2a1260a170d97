"""The `assim-simulate` hydra app, end to end in a subprocess."""

import json
import subprocess
import sys

import numpy as np
import xarray as xr


def _run(tmp_path, *overrides):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "assim._cli.simulate",
            f"hydra.run.dir={tmp_path}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )


def test_simulate_writes_netcdf_metrics_and_plot(tmp_path):
    result = _run(
        tmp_path,
        "model=burgers1d",
        "scheme=crank_nicolson",
        "n_steps=6",
        "float64=true",
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


def test_simulate_bad_input_fails_cleanly(tmp_path):
    result = _run(tmp_path, "model=lorenz96", "dt=-0.1", "n_steps=3")
    assert result.returncode != 0
    assert "time step dt must be positive" in result.stderr
    assert not (tmp_path / "trajectory.nc").exists()
    assert not (tmp_path / "metrics.json").exists()
