"""`assim-simulate`: roll out a simulator and write trajectory.nc, metrics.json, a plot.

Every option is a hydra override, e.g.
`assim-simulate simulator=navier_stokes2d scheme@simulator.scheme=imex_ars222
n_steps=100`.
"""

import dataclasses
import logging
import time
from pathlib import Path

import hydra
import jax
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("assim-simulate")


def smooth_random_state(grid, *, seed: int, amplitude: float) -> np.ndarray:
    """A smooth random field on `grid`: low Fourier modes with a k^-2 spectrum,
    scaled to max |u| = amplitude (sine modes on Dirichlet grids)."""
    rng = np.random.default_rng(seed)
    u = 0.0
    mesh = [np.asarray(x) for x in grid.mesh()]
    for _ in range(8):
        term = 1.0
        ks = []
        for x, length in zip(mesh, grid.length, strict=True):
            k = int(rng.integers(1, 5))
            ks.append(k)
            if grid.boundary == "dirichlet":
                term = term * np.sin(np.pi * k * x / length)
            else:
                term = term * np.sin(2 * np.pi * k * x / length + rng.uniform(0, 6))
        u = u + rng.normal() * term / sum(k * k for k in ks)
    return amplitude * u / np.abs(u).max()


def _dataset(model, trajectory, dt, cfg):
    import xarray as xr

    from assim._io import cf_coords

    grid = model.grid
    names, coords = cf_coords(grid, np.arange(trajectory.shape[0]) * dt)
    attrs = {
        "Conventions": "CF-1.8",
        "title": f"{type(model).__name__} rollout",
        "simulator": type(model).__name__,
        "scheme": cfg.simulator.scheme._target_,
        "dt": float(dt),
        "boundary": grid.boundary,
        "settings": OmegaConf.to_yaml(cfg.simulator),
    }
    return xr.Dataset(
        {"state": (("time", *names), np.asarray(trajectory), {"long_name": "state"})},
        coords=coords,
        attrs=attrs,
    )


def _plot(trajectory, model, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from assim._io import savefig

    fig, ax = plt.subplots(figsize=(6, 4))
    if model.grid.ndim == 1:
        im = ax.imshow(
            np.asarray(trajectory).T, aspect="auto", origin="lower", cmap="RdBu_r"
        )
        ax.set_xlabel("time step")
        ax.set_ylabel("x index")
    else:
        im = ax.imshow(np.asarray(trajectory[-1]), origin="lower", cmap="RdBu_r")
        ax.set_title("final state")
    fig.colorbar(im, ax=ax)
    savefig(fig, path)
    plt.close(fig)


def run(cfg: DictConfig) -> dict:
    """Run one simulation from a composed config; returns the metrics."""
    import jax.numpy as jnp

    from assim._cli.common import COMPILE_STATS
    from assim._config import build_simulator
    from assim._io import write_json, write_netcdf
    from assim._runtime import runtime_summary

    out = Path(HydraConfig.get().runtime.output_dir)
    simulator, _ = build_simulator(cfg.simulator)
    model, scheme = simulator.model, simulator.scheme
    u0 = jnp.asarray(
        smooth_random_state(model.grid, seed=cfg.seed, amplitude=cfg.initial_amplitude)
    )
    # Checked on the host, not inside the program (a raising check is a host
    # callback, and JAX's persistent compilation cache stores no program holding
    # one): a blow-up or a failed implicit stage solve gives non-finite states.
    unchecked = dataclasses.replace(simulator, check_finite=False)
    rollout = jax.jit(lambda s, u: s.rollout(u, cfg.n_steps, with_info=True))
    t0 = time.perf_counter()
    trajectory, info = jax.block_until_ready(rollout(unchecked, u0))
    wall = time.perf_counter() - t0
    states = np.asarray(trajectory).reshape(trajectory.shape[0], -1)
    finite = np.all(np.isfinite(states), axis=1)
    if not finite.all():
        raise ValueError(
            f"the rollout became non-finite at step {int(np.argmin(finite))} of "
            f"{cfg.n_steps}: the model blew up, or an implicit stage solve failed "
            "(a time step too long for the scheme?); nothing written"
        )
    dt = float(cfg.simulator.dt)
    write_netcdf(_dataset(model, trajectory, dt, cfg), out / "trajectory.nc")
    metrics = {
        "model": type(model).__name__,
        "scheme": type(scheme).__name__,
        "dt": dt,
        "n_steps": int(cfg.n_steps),
        "wall_time_s_including_compile": wall,
        "mean_newton_steps": float(np.mean(info["newton_steps"])),
        "max_abs_state": float(jnp.max(jnp.abs(trajectory))),
        "dtype": str(trajectory.dtype),
        "compilation": COMPILE_STATS.summary(),
        "runtime": runtime_summary(),
    }
    write_json(metrics, out / "metrics.json")
    if cfg.plot:
        _plot(trajectory, model, out / "trajectory.png")
    log.info("wrote %s", out)
    return metrics


@hydra.main(
    version_base=None, config_path="pkg://assim.configs", config_name="simulate"
)
def _main(cfg: DictConfig) -> None:
    from assim._cli.common import run_app

    metrics = run_app("assim-simulate", cfg, run)
    print(OmegaConf.to_yaml(OmegaConf.create(metrics)))


def main():
    _main()


if __name__ == "__main__":
    main()
