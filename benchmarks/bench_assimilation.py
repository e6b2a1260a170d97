"""Classical assimilation against published figures of the DA literature.

One truth and one set of observations per system, shared by every method:

- Lorenz-96 (40 variables, F = 8, RK4 dt = 0.01), every variable observed with error
  variance 1. Observations every 0.05: climatology, optimal interpolation (OI) and
  cycled 3D-Var with a tuned static B (published: 3.6, 0.95, 0.41; Sakov & Oke,
  Tellus 60A, 2008, as tabulated in DAPPER's `mods/Lorenz96/sakov2008.py`).
  Observations every 0.2: strong-constraint 4D-Var with windows of 1, 2 and 4
  observation intervals (published: 0.46, 0.39, 0.37, best 4D-Var 0.33), cycled as
  in DAPPER's `Var4D`: the window slides by one observation time and each cycle
  assimilates the newest observation (see `cycled`).
- Kuramoto-Sivashinsky (32 pi, 128 points, zero mean), every grid point observed
  with error variance 1 every 1 time unit: climatology, OI (published 1.3, 0.5;
  DAPPER's `mods/KS/bocquet2019.py`).

Climatology and OI use the mean and covariance of the scored truth itself, as the
published runs do (DAPPER's `Climatology` / `OptInterp`). 3D-Var / 4D-Var use
B = (scale) x the covariance of an independent climate run, the scale tuned on a
separate run. For these translation-invariant systems the climatological covariance
is diagonal in Fourier space (`SpectralCovariance`). RMSE: the analysis at each
observation time (4D-Var: the filtering analysis at the newest observation),
averaged in time over the scored cycles, with its standard error from batch means.
Plus the diffusivity-field recovery of `assim-run` on the bundled dataset.

`python benchmarks/bench_assimilation.py` (about 12 minutes on 2 CPU cores).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import simulators as sim  # noqa: E402
from assim import (  # noqa: E402
    ObservationSet,
    SpectralCovariance,
    Variational,
    WindowProblem,
    incremental,
)


def truth_run(simulator, n_obs, interval, spinup, seed, *, zero_mean=False):
    """A spun-up truth sampled every `interval` steps and its observations (error
    variance 1). `zero_mean`: start from a zero-mean state (the spatial mean of
    Kuramoto-Sivashinsky is conserved; the literature's runs have mean zero)."""
    rng = np.random.default_rng(seed)
    grid = simulator.model.grid
    u0 = rng.normal(size=grid.shape)
    u0 = jnp.asarray(u0 - u0.mean() if zero_mean else u0)
    roll = jax.jit(lambda s, u, n: s.rollout(u, n), static_argnums=2)
    u0 = roll(simulator, u0, spinup)[-1]
    states = [np.asarray(u0)]
    step = jax.jit(lambda s, u: s.rollout(u, interval)[-1])
    u = u0
    for _ in range(n_obs - 1):
        u = step(simulator, u)
        states.append(np.asarray(u))
    truth = np.stack(states)
    obs = truth + rng.normal(size=truth.shape)  # error variance 1
    return truth, obs


def mean_and_error(errors, batches=10):
    """Time mean of per-cycle RMSEs and its standard error (batch means)."""
    errors = np.asarray(errors)
    chunks = np.array_split(errors, batches)
    means = np.array([c.mean() for c in chunks])
    return float(errors.mean()), float(means.std(ddof=1) / np.sqrt(batches))


def cycled(simulator, B, truth, obs, interval, lag, burn, *, max_steps=6):
    """Cycled strong-constraint 4D-Var as in the published setting (DAPPER's `Var4D`,
    the iEnKS cycling): the window spans `lag` observation intervals and slides by
    one; each cycle assimilates the newest observation only (the older ones are in
    the background), the control is the state at the window start, its background
    is the previous cycle's smoothed state advanced one interval, and the score is
    the filtering analysis at the newest observation time."""
    n = obs.shape[0]
    xb = jnp.asarray(obs[0])  # first background: the first observation
    errors = []
    forecast = jax.jit(lambda s, u, n: s.rollout(u, n)[-1], static_argnums=2)
    problem = WindowProblem(simulator, B, interval)
    analyser = eqx.filter_jit(
        Variational(incremental(inner_steps=40, inner_rtol=1e-6), max_steps)
    )
    mask = np.zeros((lag + 1, *obs.shape[1:]), bool)
    mask[-1] = True
    t0, n_cycles = time.perf_counter(), 0
    for k in range(lag, n):
        window_obs = ObservationSet(
            jnp.asarray(obs[k - lag : k + 1]),
            jnp.asarray(mask),
            jnp.ones(mask.shape),
            jnp.arange(lag + 1) * 1.0,
        )
        if k == burn:
            t0, n_cycles = time.perf_counter(), 0
        x0 = analyser(problem, window_obs, xb)[0].initial_state
        n_cycles += 1
        if k >= burn:
            xa = forecast(simulator, x0, lag * interval)
            errors.append(float(np.sqrt(np.mean((np.asarray(xa) - truth[k]) ** 2))))
        xb = forecast(simulator, x0, interval)
    return errors, (time.perf_counter() - t0) / max(n_cycles, 1)


@eqx.filter_jit
def analyse(simulator, background, B, y, inner_steps, inner_rtol):
    """The 3D-Var analysis of one fully observed time `y` (R = I): step 1 of an
    optimistix solve evaluates the start, step 2 is the exact Gauss-Newton
    (linear-Gaussian) update."""
    shape = (1, *y.shape)
    window_obs = ObservationSet(
        jnp.asarray(y[None]), jnp.ones(shape, bool), jnp.ones(shape), jnp.zeros(1)
    )
    problem = WindowProblem(simulator, B)  # no model step
    solver = incremental(inner_steps=inner_steps, inner_rtol=inner_rtol)
    analysis, _ = Variational(solver, max_steps=2)(
        problem, window_obs, jnp.asarray(background)
    )
    return analysis.initial_state


def var3d(simulator, B, truth, obs, interval, burn):
    """Cycled 3D-Var: background = forecast, analysis at the observation time."""
    n = obs.shape[0]
    xb = jnp.asarray(obs[0])
    errors = []
    forecast = jax.jit(lambda s, u: s.rollout(u, interval)[-1])
    t0, count = None, 0
    for k in range(1, n):
        xb = forecast(simulator, xb)
        if k == burn:
            t0, count = time.perf_counter(), 0
        xb = analyse(simulator, xb, B, obs[k], 40, 1e-8)
        count += 1
        if k >= burn:
            errors.append(float(np.sqrt(np.mean((np.asarray(xb) - truth[k]) ** 2))))
    return errors, (time.perf_counter() - t0) / max(count, 1)


def optimal_interpolation(simulator, B, climate_mean, truth, obs):
    """OI: the climatological mean as background with the climatological B, R = I,
    at every observation time (a 3D-Var that does not use the model)."""
    errors = []
    t0 = time.perf_counter()
    for k in range(obs.shape[0]):
        xa = analyse(simulator, climate_mean, B, obs[k], 80, 1e-10)
        errors.append(float(np.sqrt(np.mean((np.asarray(xa) - truth[k]) ** 2))))
    return errors, (time.perf_counter() - t0) / obs.shape[0]


def climatology(truth, climate_mean):
    return [float(np.sqrt(np.mean((climate_mean - t) ** 2))) for t in truth]


def row(table, system, method, errors, per_cycle, published):
    mean, err = mean_and_error(errors)
    table.append((system, method, mean, err, per_cycle, published))
    print(
        f"{system:8s} {method:34s} {mean:6.3f} +- {err:5.3f}  "
        f"{per_cycle * 1e3:8.1f} ms/cycle  published {published}",
        flush=True,
    )


def bundled_kappa():
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "assim._cli.run",
                f"hydra.run.dir={tmp}",
                "progress=false",
                "plot=false",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        del run
        wall = time.perf_counter() - t0
        metrics = json.loads((Path(tmp) / "metrics.json").read_text())
    return metrics, wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--l96-cycles", type=int, default=1200)
    parser.add_argument("--l96-4dvar-cycles", type=int, default=400)
    parser.add_argument("--ks-cycles", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    table = []

    # Lorenz-96. Climatology and OI as in the published setting (DAPPER's
    # `Climatology` and `OptInterp`): mean and covariance of the scored truth itself.
    l96 = sim.Simulator(sim.Lorenz96(40, 8.0), sim.RK4(), 0.01)
    grid = l96.model.grid
    truth, obs = truth_run(l96, args.l96_cycles, 5, 2000, args.seed)
    burn = args.l96_cycles // 6
    climate_mean = truth.mean() * np.ones(40)
    B_clim = SpectralCovariance.from_samples(grid, truth)
    row(table, "L96", "climatology", climatology(truth[burn:], climate_mean), 0.0, 3.6)
    errors, per = optimal_interpolation(
        l96, B_clim, climate_mean, truth[burn : burn + 300], obs[burn : burn + 300]
    )
    row(table, "L96", "optimal interpolation (dt_obs 0.05)", errors, per, 0.95)
    # 3D-Var and 4D-Var: B = scale x an independent climatology, the scale tuned on
    # a separate run (another seed).
    climate, _ = truth_run(l96, 4000, 10, 2000, args.seed + 100)
    tune_truth, tune_obs = truth_run(l96, 300, 5, 2000, args.seed + 1)
    scores = {}
    for scale in (0.005, 0.01, 0.02, 0.05):
        B = SpectralCovariance.from_samples(grid, climate, scale)
        scores[scale] = np.mean(var3d(l96, B, tune_truth, tune_obs, 5, 50)[0])
    best = min(scores, key=scores.get)
    print("3D-Var B scale tuning:", {k: round(v, 3) for k, v in scores.items()})
    B = SpectralCovariance.from_samples(grid, climate, best)
    errors, per = var3d(l96, B, truth, obs, 5, burn)
    row(table, "L96", f"3D-Var (dt_obs 0.05, B = {best} B_clim)", errors, per, 0.41)

    truth4, obs4 = truth_run(l96, args.l96_4dvar_cycles, 20, 2000, args.seed + 2)
    tune4, tune_obs4 = truth_run(l96, 150, 20, 2000, args.seed + 3)
    published = {1: 0.46, 2: 0.39, 4: 0.37}
    for lag in (1, 2, 4):
        scores = {}
        for scale in (0.0025, 0.005, 0.01, 0.02, 0.05):
            B = SpectralCovariance.from_samples(grid, climate, scale)
            errors = cycled(l96, B, tune4, tune_obs4, 20, lag, 30)[0]
            scores[scale] = np.mean(errors) + 1e3 * (not np.all(np.isfinite(errors)))
        print(
            f"4D-Var window {lag} B scale tuning:",
            {k: round(v, 3) for k, v in scores.items()},
        )
        best = min(scores, key=scores.get)
        B = SpectralCovariance.from_samples(grid, climate, best)
        errors, per = cycled(l96, B, truth4, obs4, 20, lag, args.l96_4dvar_cycles // 6)
        row(
            table,
            "L96",
            f"4D-Var window {lag} (dt_obs 0.2, B = {best} B_clim)",
            errors,
            per,
            published[lag],
        )

    # Kuramoto-Sivashinsky (zero-mean, as Kassam & Trefethen's initial condition).
    ks = sim.Simulator(sim.KuramotoSivashinsky(), sim.IMEXRungeKutta("ars443"), 0.25)
    kgrid = ks.model.grid
    ktruth, kobs = truth_run(ks, args.ks_cycles, 4, 800, args.seed + 4, zero_mean=True)
    kmean = ktruth.mean() * np.ones(kgrid.shape)
    KB = SpectralCovariance.from_samples(kgrid, ktruth)
    row(table, "KS", "climatology", climatology(ktruth, kmean), 0.0, 1.3)
    errors, per = optimal_interpolation(ks, KB, kmean, ktruth, kobs)
    row(table, "KS", "optimal interpolation (dt_obs 1)", errors, per, 0.5)

    metrics, wall = bundled_kappa()
    kappa = metrics["parameters"]["kappa"]
    print(
        f"bundled  kappa relative L2 error {kappa['relative_l2_error']:.3f} "
        f"(background {kappa['background_relative_l2_error']:.3f}), rmse_truth "
        f"{metrics['rmse_truth']:.4f}, rmse_obs_heldout "
        f"{metrics['rmse_obs_heldout']:.4f}, wall {wall:.1f} s (target < 10%)"
    )

    print(
        "\n| system | method | analysis RMSE | +- (std. error) | time per cycle | "
        "published |"
    )
    print("|---|---|---|---|---|---|")
    for system, method, mean, err, per, pub in table:
        print(
            f"| {system} | {method} | {mean:.3f} | {err:.3f} | "
            f"{per * 1e3:.1f} ms | {pub} |"
        )
    print(
        f"| bundled AD2D | assim-run default (4D-Var + kappa field) | kappa rel. L2 "
        f"{kappa['relative_l2_error']:.3f} (background "
        f"{kappa['background_relative_l2_error']:.3f}) | - | {wall:.0f} s total | "
        "< 0.10 (target) |"
    )


if __name__ == "__main__":
    main()
