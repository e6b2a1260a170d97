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


def _rows(found: dict) -> int:
    sections = ("windows", "gradients", "throughput", "cli")
    return sum(len(found.get(k, [])) for k in sections)


def test_accelerator_benchmark_measures_windows_gradients_and_throughput(
    bench, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "accelerator.json"
    written = []  # the rows in the JSON at each write
    write = bench.write_json
    monkeypatch.setattr(
        bench, "write_json", lambda f, p: (written.append(_rows(f)), write(f, p))
    )
    argv = ["--only", "windows", "gradients", "throughput", "--window-sizes", "12"]
    argv += ["--gradient-sizes", "16", "--repeats", "1", "--windows", "2"]
    argv += ["--throughput-grid", "16"]
    bench.main([*argv, "--train-steps", "2", "--json", str(out)])
    found = json.loads(out.read_text())
    assert not list(tmp_path.glob("*.tmp"))
    # Rewritten after every row (a run stopped part-way keeps them), then at the end.
    assert written == [*range(1, _rows(found) + 1), _rows(found)]
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


def test_accelerator_benchmark_budget_skips_what_it_has_no_time_for(bench, tmp_path):
    """`--budget-s`: no size or section starts once the budget is spent; what was
    left out is listed in the table and the JSON."""
    out = tmp_path / "accelerator.json"
    argv = ["--only", "windows", "throughput", "cli", "--window-sizes", "12", "16"]
    found = bench.main([*argv, "--budget-s", "0", "--json", str(out)])
    skipped = ["windows 12^2", "windows 16^2", "throughput"]
    assert found["skipped"] == [*skipped, "cli, empty cache", "cli, warm cache"]
    assert json.loads(out.read_text()) == found
    assert "windows" not in found and "throughput" not in found
