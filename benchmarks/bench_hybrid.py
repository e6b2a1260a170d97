"""Does hybrid ensemble-variational 4D-Var beat static-B 4D-Var at the same window?

Every row is one `assim-run` command on the literature's twins (the experiment
configs of `bench_assimilation.py`), both methods with their default settings and
non-overlapping windows of the same length:

- Lorenz-96, every variable observed every 0.2 with error variance 1
  (`+experiment=l96_4dvar_sliding`), windows of 4 observation times.
- Kuramoto-Sivashinsky, 128 points observed every 1.0 (`+experiment=ks_4dvar`),
  windows of 5.

Static: `method=var4d` (the CLI's default B: the climatology, its scale adapted
from the innovations). Hybrid: `method=hybrid_4dvar` (B = 0.2 x the static B
rescaled to the ensemble's variance + 0.8 x the localised covariance of a 30-member
LETKF-cycled ensemble). For reference, the sliding-window 4D-Var of lag 4 of
`bench_assimilation.py` and the ensemble filter alone on the same twin.

`python benchmarks/bench_hybrid.py` (about 10 minutes on 2 CPU cores).
"""

import argparse

from bench_ensemble import assim_run

L96 = ["+experiment=l96_4dvar_sliding"]
KS = ["+experiment=ks_4dvar"]
ROWS = [
    (
        "L96 dt_obs 0.2",
        "static 4D-Var, windows of 4",
        [*L96, "method=var4d", "method.window_length=4"],
    ),
    (
        "L96 dt_obs 0.2",
        "hybrid 4D-Var, windows of 4",
        [*L96, "method=hybrid_4dvar", "method.window_length=4"],
    ),
    ("L96 dt_obs 0.2", "sliding 4D-Var lag 4 (static)", L96),
    ("L96 dt_obs 0.2", "LETKF (N=20)", [*L96, "method=letkf"]),
    ("KS", "static 4D-Var, windows of 5", [*KS, "method=var4d"]),
    ("KS", "hybrid 4D-Var, windows of 5", [*KS, "method=hybrid_4dvar"]),
    ("KS", "sliding 4D-Var lag 4 (static)", KS),
    ("KS", "LETKF (N=20)", [*KS, "method=letkf"]),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=int, default=1200, help="observation times")
    parser.add_argument("--burn-in", type=int, default=200)
    args = parser.parse_args()
    table = []
    for system, method, overrides in ROWS:
        metrics, wall = assim_run(overrides, args.times, args.burn_in)
        row = (system, method, metrics["rmse_truth"], metrics["rmse_background"], wall)
        table.append(row)
        print(*row, sep=" | ", flush=True)
    print("\n| system | method | analysis RMSE | background RMSE | assim-run wall |")
    print("|---|---|---|---|---|")
    for system, method, rmse, background, wall in table:
        print(f"| {system} | {method} | {rmse:.3f} | {background:.3f} | {wall:.0f} s |")


if __name__ == "__main__":
    main()
