"""`benchmarks/bench_accelerator.py` at tiny sizes on the CPU: it runs unchanged on a
GPU, so what it measures is checked here (the table, the JSON, the quantities)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_accelerator

        yield bench_accelerator
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_accelerator_benchmark_measures_windows_gradients_and_throughput(
    bench, tmp_path, capsys
):
    out = tmp_path / "accelerator.json"
    argv = ["--only", "windows", "gradients", "throughput", "--window-sizes", "12"]
    argv += ["--gradient-sizes", "16", "--repeats", "1", "--windows", "2"]
    argv += ["--throughput-grid", "16"]
    bench.main([*argv, "--train-steps", "2", "--json", str(out)])
    found = json.loads(out.read_text())
    assert not list(tmp_path.glob("*.tmp"))
    printed = capsys.readouterr().out
    assert "| grid | GN iterations |" in printed and "| 16^2 windows |" in printed

    (window,) = found["windows"]
    assert window["grid"] == 12 and window["outer_iterations"] >= 1
    assert window["window_s"] > 0 and window["host_driven_s"] > 0
    # The Python-driven iterations are the compiled solve's, one call each.
    assert window["host_driven_max_difference"] < 1e-3
    assert window["rmse_analysis"] < window["rmse_background"]

    burgers = [r for r in found["gradients"] if r["case"] == "burgers2d"]
    assert [r["method"][:3] for r in burgers] == ["f32", "f64"]
    ns = [r for r in found["gradients"] if r["case"] == "navier-stokes2d"]
    assert [r["method"][:3] for r in ns] == ["f32", "f64"]
    for row in found["gradients"]:
        assert row["grad_finite"] and np.isfinite(row["ratio"]) and row["ratio"] > 0
    for row in burgers:  # the counters saw the forward and the adjoint's solves
        assert row["krylov_forward"] > 0 and row["krylov_transpose"] > 0

    training, network, var4d, background = found["throughput"]
    assert network["method"] == "unrolled network, 4 layers"
    assert "4D-Var" in var4d["method"] and background["method"] == "background"
    for row in (training, network, var4d):
        assert row["windows_per_s"] > 0 and row["peak_mib"] > 0
    assert var4d["rmse"] < background["rmse"]
    assert network["rmse"] < background["rmse"]  # stable steps: no blow-up
