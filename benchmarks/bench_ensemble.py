"""Ensemble Kalman filters against the published figures and against DAPPER's own
implementations on the same settings: analysis RMSE and time per cycle, side by
side in one run.

Every assim row is one `assim-run` command (the experiment configs of
`bench_assimilation.py`, `method=etkf|enkf|letkf` with their default settings):

- Lorenz-96 (Sakov & Oke 2008; DAPPER's `mods/Lorenz96/sakov2008`): 40 variables,
  F = 8, every variable observed every 0.05 with error variance 1. ETKF (30
  members, inflation 1.02), stochastic EnKF (40, 1.06), LETKF (20, 1.02, radius 4).
  Published: EnKF/ETKF about 0.18.
- Kuramoto-Sivashinsky (Bocquet et al. 2019; DAPPER's `mods/KS/bocquet2019`):
  32 pi, 128 points, every point observed every 1.0 with error variance 1. LETKF
  (20 members, radius a tenth of the domain). Published: EnKF 0.12.

The LETKF rows run twice: with the default weight interpolation (local analyses
every `weight_stride` points, the radius: 4 on Lorenz-96, 12 on KS) and with
every point analysed (`method.analyser.weight_stride=1`, as DAPPER's LETKF does).

RMSE: `rmse_truth` after the burn-in. Time per cycle: assim's
`seconds_per_time_after_first_window` (the cycling loop with its scoring and
NetCDF writing, compilation and the twin's generation aside); DAPPER's
assimilation loop over the same number of cycles (`xp.assimilate`, with its
statistics). Each system integrates its own model (assim: RK4 dt 0.01 and IMEX
dt 0.25; DAPPER: RK4 dt 0.05 and ETD-RK4 dt 0.5).

`python benchmarks/bench_ensemble.py [--dapper-python PATH]` (about 3 minutes on
2 CPU cores; DAPPER in its own environment: `pip install dapper==1.7.1`).
"""

import argparse
import json
import subprocess
from pathlib import Path

from bench_assimilation import run

EXACT = ["method.analyser.weight_stride=1"]  # every point analysed
ROWS = [
    # (system, method as DAPPER's rows name it, published, overrides)
    ("L96", "ETKF N=30", "0.18", ["+experiment=l96_3dvar", "method=etkf"]),
    ("L96", "EnKF N=40", "0.18", ["+experiment=l96_3dvar", "method=enkf"]),
    ("L96", "LETKF N=20", "0.18", ["+experiment=l96_3dvar", "method=letkf"]),
    ("L96", "LETKF N=20", "0.18", ["+experiment=l96_3dvar", "method=letkf", *EXACT]),
    ("KS", "LETKF N=20", "0.12", ["+experiment=ks_4dvar", "method=letkf"]),
    ("KS", "LETKF N=20", "0.12", ["+experiment=ks_4dvar", "method=letkf", *EXACT]),
]


def assim_run(overrides, times: int, burn_in: int) -> tuple[dict, float]:
    """`assim-run` with `overrides` on a twin of `times` observation times, the
    first `burn_in` not scored: its metrics and wall time."""
    return run([*overrides, f"twin.n_times={times}", f"scoring.burn_in={burn_in}"])


def dapper_rows(python: str, times: int, burn_in: int) -> dict:
    """DAPPER's rows (`dapper_reference.py --ensembles` in its environment)."""
    script = Path(__file__).with_name("dapper_reference.py")
    result = subprocess.run(
        [
            python,
            str(script),
            "--ensembles",
            f"--times={times}",
            f"--burn-in={burn_in}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [json.loads(line) for line in result.stdout.splitlines() if line[:1] == "{"]
    return {(r["system"], r["method"]): r for r in rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=int, default=1200, help="observation times")
    parser.add_argument("--burn-in", type=int, default=200)
    parser.add_argument("--dapper-python", help="a Python with dapper==1.7.1")
    args = parser.parse_args()
    dapper = {}
    if args.dapper_python:
        dapper = dapper_rows(args.dapper_python, args.times, args.burn_in)
    table = []
    for system, method, published, overrides in ROWS:
        metrics, wall = assim_run(overrides, args.times, args.burn_in)
        theirs = dapper.get((system, method), {})
        per_cycle = metrics["seconds_per_time_after_first_window"]
        row = (
            system,
            f"{method} (`{' '.join(overrides)}`)",
            metrics["rmse_truth"],
            metrics["spread_skill_ratio"],
            per_cycle * 1e3,
            wall,
            theirs.get("rmse", float("nan")),
            theirs.get("seconds_per_cycle", float("nan")) * 1e3,
            published,
        )
        table.append(row)
        print(*row, sep=" | ", flush=True)
    print(
        "\n| system | method | assim RMSE | spread/skill | assim ms/cycle | "
        "assim-run wall | DAPPER RMSE | DAPPER ms/cycle | speed-up | published |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for system, method, rmse, ratio, ms, wall, d_rmse, d_ms, published in table:
        print(
            f"| {system} | {method} | {rmse:.3f} | {ratio:.2f} | {ms:.3f} | "
            f"{wall:.0f} s | {d_rmse:.3f} | {d_ms:.2f} | {d_ms / ms:.1f}x | "
            f"{published} |"
        )


if __name__ == "__main__":
    main()
