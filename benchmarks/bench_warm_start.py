"""Does a trained network's analysis, refined by a few Gauss-Newton iterations,
reach 4D-Var's accuracy sooner than 4D-Var started cold?

Everything runs through the command line a user runs (`assim-data`, `assim-train`,
`assim-run`, as subprocesses): a Lorenz-96 twin (half the variables observed at
stations, noise std `--noise`, windows of 5 observation times 0.05 apart), one file
to train on and another (another seed) to assimilate; `assim-train` fits an
unrolled network (`--layers` layers, masking loss: no truth); then, cycled over
the assimilated file's windows:

- `assim-run method=hybrid method.refine_steps=N method.refine_parameters=false`
  for N = 0 (the network alone), 1, 2, 5: the network's analysis refined by N
  incremental Gauss-Newton iterations of 4D-Var (20 CG iterations each), the
  network's learned parameters held;
- with `--hybrid-joint N ...`: `method.refine_parameters=true` (the default), the
  refinement re-estimating the simulator's unknown parameters (the network's as
  the start);
- `assim-run method=var4d method.analyser.max_steps=N` (cold start from the
  cycled background) for N = 1, 2, 5, 20.

`--problem bundled`: the main job instead, on the bundled dataset with every
default (`assim-train` on its training windows, the diffusivity field learned;
`assim-run` over its 4 windows, cold 4D-Var estimating the field jointly).

Printed: analysis RMSE against the truth, the steady wall time per window (after
the first window, which compiles) and the run's total wall time.

`python benchmarks/bench_warm_start.py` (about 3 minutes on 2 CPU cores).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import app, print_table


def lorenz96_files(args, out):
    """Two Lorenz-96 twins (`assim-data`): `(assim-train's overrides, assim-run's
    overrides, times per window)`."""
    twin = [
        "simulator=lorenz96",
        "twin.window_length=5",
        "twin.sensors.pattern=stations",
        "twin.sensors.density=0.5",
        "twin.sensors.dropout=0.0",
        f"twin.noise_std={args.noise}",
        "twin.truth.missing_term.kind=none",
        "twin.splits=[0.8,0.2,0.0]",
    ]
    for name, times, seed in (
        ("train", args.train_times, 0),
        ("test", args.test_times, 1),
    ):
        app(
            "data",
            out,
            *twin,
            f"twin.n_times={times}",
            f"seed={seed}",
            f"output={out / name}.nc",
        )
    print(f"twins written in {out}", flush=True)
    train = [
        "simulator=lorenz96",
        "data=file",
        f"data.path={out / 'train.nc'}",
        "training.batch_size=8",
    ]
    run = [
        "simulator=lorenz96",
        "data=file",
        f"data.path={out / 'test.nc'}",
        "data.heldout_fraction=0",
        "plot=false",
    ]
    return train, run, 5


def bundled_files():
    """The bundled dataset, as the main job runs it: the network trained by
    `assim-train`'s defaults (its training windows), every run on the whole file
    (the defaults: 10% of the grid points held out for scoring)."""
    return [], ["plot=false"], 10


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--train-times", type=int, default=800)
    parser.add_argument("--test-times", type=int, default=200)
    parser.add_argument("--hybrid", type=int, nargs="+", default=[0, 1, 2, 5])
    parser.add_argument(
        "--hybrid-joint",
        type=int,
        nargs="*",
        default=[],
        help="refinement steps with the parameters re-estimated "
        "(method.refine_parameters=true)",
    )
    parser.add_argument("--cold", type=int, nargs="+", default=[1, 2, 5, 20])
    parser.add_argument("--out", type=Path, help="keep the runs here")
    parser.add_argument(
        "--problem",
        choices=["lorenz96", "bundled"],
        default="lorenz96",
        help="bundled: the main job's dataset and defaults (assim-train, assim-run)",
    )
    args = parser.parse_args()
    t0 = time.perf_counter()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_warm_start."))
    if args.problem == "bundled":
        train, common, window = bundled_files()
        title = (
            f"bundled dataset ({args.layers}-layer network, masking loss, "
            f"{args.steps} steps), cycled over its 4 windows"
        )
    else:
        train, common, window = lorenz96_files(args, out)
        title = (
            f"Lorenz-96 twin, {args.test_times // 5} windows of 5 times, noise "
            f"{args.noise:g}, cycled; network: {args.layers} layers, masking loss, "
            f"{args.steps} steps"
        )
    t1 = time.perf_counter()
    app(
        "train",
        out / "network",
        *train,
        f"network.net.n_layers={args.layers}",
        f"training.steps={args.steps}",
    )
    print(f"assim-train: {time.perf_counter() - t1:.0f} s", flush=True)
    checkpoint = out / "network" / "checkpoint.eqx"
    hybrid = [(n, False) for n in args.hybrid] + [(n, True) for n in args.hybrid_joint]
    runs = [
        (
            ("network" if n == 0 else f"network + {n} Gauss-Newton")
            + (", parameters re-estimated" if joint else ""),
            ["method=hybrid", f"method.checkpoint={checkpoint}"]
            + [
                f"method.refine_steps={n}",
                f"method.refine_parameters={str(joint).lower()}",
            ],
        )
        for n, joint in hybrid
    ] + [
        (
            f"4D-Var, {n} Gauss-Newton (cold)",
            ["method=var4d", f"method.analyser.max_steps={n}"],
        )
        for n in args.cold
    ]
    rows = []
    for i, (name, overrides) in enumerate(runs):
        app("run", out / f"run{i}", *common, *overrides)
        m = json.loads((out / f"run{i}" / "metrics.json").read_text())
        per_window = m["seconds_per_time_after_first_window"] * window
        rows.append(
            [
                name,
                f"{m['rmse_truth']:.3f}",
                f"{per_window * 1e3:.0f}",
                f"{m['wall_time_s']:.1f}",
            ]
        )
        print(f"  {' | '.join(rows[-1])}", flush=True)
    print_table(
        title,
        ["analyser", "analysis RMSE", "ms / window (steady)", "run wall s"],
        rows,
    )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
