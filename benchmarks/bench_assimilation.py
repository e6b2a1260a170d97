"""Classical assimilation against published figures of the DA literature, run as a
user runs it: every row is one `assim-run` command (the experiment configs in
`configs/experiment/`, the CLI's default B: the model's climatology with its scale
adapted while cycling, no hand tuning), and the figures are read from its
`metrics.json`.

- Lorenz-96 (Sakov & Oke, Tellus 60A, 2008; DAPPER's `mods/Lorenz96/sakov2008`):
  40 variables, F = 8, every variable observed with error variance 1. Every 0.05:
  climatology, optimal interpolation, cycled 3D-Var (published 3.6, 0.95, 0.41).
  Every 0.2: sliding-window 4D-Var of lag 1, 2, 4, shift 1 (published 0.46, 0.39,
  0.37; DAPPER's `Var4D`).
- Kuramoto-Sivashinsky (Bocquet et al. 2019; DAPPER's `mods/KS/bocquet2019`): 32 pi,
  128 points, every point observed every 1.0 with error variance 1: climatology,
  optimal interpolation, sliding 4D-Var lag 4 (published 1.3, 0.5; EnKF 0.12).
- The bundled dataset: the default `assim-run` (4D-Var with the diffusivity
  field estimated).

RMSE: `rmse_truth` of the analysed times after `scoring.burn_in` (sliding windows:
the filtering analysis at each newest observation time).

`python benchmarks/bench_assimilation.py` (about 15 minutes on 2 CPU cores;
`--quick` runs 300 observation times per experiment).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = [
    # (system, method, published, overrides)
    ("L96", "climatology", "3.6", ["+experiment=l96_3dvar", "method=climatology"]),
    ("L96", "optimal interpolation", "0.95", ["+experiment=l96_3dvar", "method=oi"]),
    ("L96", "3D-Var (dt_obs 0.05)", "0.41", ["+experiment=l96_3dvar"]),
    (
        "L96",
        "4D-Var lag 1 (dt_obs 0.2)",
        "0.46",
        ["+experiment=l96_4dvar_sliding", "method.window_length=2"],
    ),
    (
        "L96",
        "4D-Var lag 2 (dt_obs 0.2)",
        "0.39",
        ["+experiment=l96_4dvar_sliding", "method.window_length=3"],
    ),
    ("L96", "4D-Var lag 4 (dt_obs 0.2)", "0.37", ["+experiment=l96_4dvar_sliding"]),
    ("KS", "climatology", "1.3", ["+experiment=ks_4dvar", "method=climatology"]),
    ("KS", "optimal interpolation", "0.5", ["+experiment=ks_4dvar", "method=oi"]),
    ("KS", "4D-Var lag 4 (dt_obs 1)", "0.12 (EnKF)", ["+experiment=ks_4dvar"]),
    ("bundled AD2D", "assim-run default", "-", []),
]


def run(overrides, quick: bool = False) -> tuple[dict, float]:
    """`assim-run` with `overrides` in a temporary directory: its metrics and wall
    time."""
    if quick and overrides:
        overrides = [*overrides, "twin.n_times=300", "scoring.burn_in=100"]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "assim._cli.run",
                f"hydra.run.dir={tmp}",
                "progress=false",
                "plot=false",
                *overrides,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.perf_counter() - t0
        return json.loads((Path(tmp) / "metrics.json").read_text()), wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 times each")
    parser.add_argument("--only", help="rows whose system or method contain this")
    args = parser.parse_args()
    table = []
    for system, method, published, overrides in ROWS:
        if args.only and args.only not in f"{system} {method}":
            continue
        metrics, wall = run(overrides, args.quick)
        extra = ""
        if "parameters" in metrics:
            kappa = metrics["parameters"]["kappa"]
            extra = f"kappa rel. L2 {kappa['relative_l2_error']:.3f}"
        row = (
            system,
            method,
            metrics["rmse_truth"],
            metrics.get("chi2_normalised_analysis", float("nan")),
            metrics.get("background_error_scale"),
            metrics["windows"],
            wall,
            published,
            extra,
        )
        table.append(row)
        print(
            f"{system:12s} {method:28s} rmse {row[2]:.3f}  chi2 {row[3]:.2f}  "
            f"{wall:6.1f} s  published {published} {extra}",
            flush=True,
        )
    print(
        "\n| system | method | analysis RMSE | chi2 (2J/p) | B scale | windows | "
        "wall | published |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for system, method, rmse, chi2, scale, windows, wall, published, extra in table:
        scale = "-" if scale is None else f"{scale:.3g}"
        rmse = f"{rmse:.3f}" + (f" ({extra})" if extra else "")
        print(
            f"| {system} | {method} | {rmse} | {chi2:.2f} | {scale} | {windows} | "
            f"{wall:.0f} s | {published} |"
        )


if __name__ == "__main__":
    main()
