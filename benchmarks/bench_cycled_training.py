"""Does a network trained on cycled backgrounds survive cycling, and what does
cycling cost or buy against independent windows?

Run as a user runs it, every step one CLI command: `assim-data` makes a Lorenz-96
twin (40 variables, F = 8, half of the variables observed at fixed stations every
0.05 with error std 1, windows of 5 observation times; the first half of the
windows train, the next quarter validate, the last quarter test); `assim-train`
trains the default unrolled network with the masking loss (no truth) on the
observation-mean backgrounds only (`training.cycle_every=0`) and on its own cycled
forecasts refreshed every 25 steps (the default); `assim-run method=unrolled` then
assimilates the file cycled (each background the previous analysis's forecast) and
as independent windows (`method.cycle=false`, each from its own observations'
mean). For reference, cycled strong-constraint 4D-Var (`method=var4d`, the CLI's
default B) and the ensemble filters a DA user measures against (`method=etkf`, 30
members; `method=letkf`, 20), with their default settings, on the same file. RMSE
against the truth over the test windows only (`scoring.burn_in` = the training and
validation times), background RMSE, the analysis chi-square.

`python benchmarks/bench_cycled_training.py` (about 3 minutes on 2 CPU cores;
`--steps`, `--times` to change the training length and the twin).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cli(module: str, run_dir: Path, *overrides: str) -> float:
    """Run `python -m assim._cli.<module>` in `run_dir`; its wall time."""
    t0 = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            f"assim._cli.{module}",
            f"hydra.run.dir={run_dir}",
            *(["progress=false"] if module != "data" else []),
            *overrides,
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        lines = [
            line
            for line in result.stderr.strip().splitlines()
            if line.strip() and "HYDRA_FULL_ERROR" not in line
        ]
        raise RuntimeError(f"{module} failed: {(lines or ['(no message)'])[-1]}")
    return time.perf_counter() - t0


def scores(out: Path, *overrides: str) -> tuple[str, str, str]:
    """`assim-run` into `out`: its test RMSE, background RMSE and chi-square (or
    the failure)."""
    try:
        cli("run", out, "plot=false", *overrides)
    except RuntimeError as e:
        return (f"failed ({str(e).removeprefix('run failed: ')[:70]})", "-", "-")
    metrics = json.loads((out / "metrics.json").read_text())
    return (
        f"{metrics['rmse_truth']:.3f}",
        f"{metrics['rmse_background']:.3f}",
        f"{metrics.get('chi2_normalised_analysis', float('nan')):.2f}",
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=int, default=1000, help="observation times")
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
    args = parser.parse_args()
    twin = [
        "simulator=lorenz96",
        f"twin.n_times={args.times}",
        "twin.window_length=5",
        "twin.spinup_steps=2000",
        "twin.noise_std=1.0",
        "twin.sensors.pattern=stations",
        "twin.sensors.density=0.5",
        "twin.sensors.dropout=0.0",
        "twin.truth.missing_term.kind=none",
        "twin.truth.parameter_scale=0.0",
    ]
    # Windows: half train, a quarter validate, a quarter test (contiguous).
    windows = args.times // 5
    test_start = 5 * (round(0.5 * windows) + round(0.25 * windows))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cli("data", tmp / "data", *twin, "output=observations.nc")
        data = tmp / "data" / "observations.nc"
        common = ["data=file", f"data.path={data}", f"scoring.burn_in={test_start}"]
        table = []
        for label, every in (("observation means", 0), ("cycled forecasts", 25)):
            run_dir = tmp / f"train{every}"
            train_wall = cli(
                "train",
                run_dir,
                "simulator=lorenz96",
                "data=file",
                f"data.path={data}",
                f"training.steps={args.steps}",
                f"training.cycle_every={every}",
            )
            for mode, extra in (
                ("cycled", []),
                ("independent", ["method.cycle=false"]),
            ):
                row = scores(
                    run_dir / mode,
                    "method=unrolled",
                    f"method.checkpoint={run_dir / 'checkpoint.eqx'}",
                    *common,
                    *extra,
                )
                table.append((label, f"{train_wall:.0f} s", mode, *row))
                print(*table[-1], sep=" | ", flush=True)
        for method in ("var4d", "etkf", "letkf"):
            row = scores(
                tmp / method, "simulator=lorenz96", f"method={method}", *common
            )
            table.append((f"({method}, no training)", "-", "cycled", *row))
            print(*table[-1], sep=" | ", flush=True)
    print(
        "\n| trained on backgrounds | training wall | assim-run | test RMSE | "
        "background RMSE | chi2 (2J/p) |"
    )
    print("|---|---|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
