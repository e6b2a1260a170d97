"""Pieces shared by the hydra apps: simulators and their unknown parameters from
config, twin-experiment generation, error handling."""

import logging
import sys
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from simulators import Grid, Simulator

log = logging.getLogger("assim")


def source_field(grid: Grid, modes) -> np.ndarray:
    """`s = sum a cos(2 pi (ky y / Ly + kx x / Lx) + phase)` from rows
    `[a, ky, kx, phase]` (1D: `[a, 0, kx, phase]`)."""
    mesh = [np.asarray(m) for m in grid.mesh()]
    out = np.zeros(grid.shape)
    for row in modes:
        a, ky, kx, phase = (float(v) for v in row)
        angle = kx * mesh[-1] / grid.length[-1]
        if grid.ndim == 2:
            angle = angle + ky * mesh[0] / grid.length[0]
        out = out + a * np.cos(2 * np.pi * angle + phase)
    return out


class Parameter(eqx.Module):
    """The simulator's unknown coefficient as a control: `theta` whitened, the
    physical value `bounded_log(S theta, background)` with `S` the prior's square
    root (a smooth field, or a scalar std)."""

    name: str = eqx.field(static=True)
    background: float = eqx.field(static=True)
    sqrt: Callable
    shape: tuple = eqx.field(static=True)

    def value(self, theta):
        from assim import bounded_log

        return bounded_log(self.sqrt(theta), self.background)

    def set(self, simulator: Simulator, theta) -> Simulator:
        return eqx.tree_at(
            lambda s: getattr(s.model, self.name), simulator, self.value(theta)
        )


def build_simulator(cfg: DictConfig) -> tuple[Simulator, Parameter | None]:
    """The assimilating simulator from a `simulator` config, with its unknown
    parameter (if any) set to the prior's background value."""
    model = instantiate(cfg.model, _convert_="all")
    if cfg.get("source_modes"):
        source = source_field(model.grid, OmegaConf.to_object(cfg.source_modes))
        model = eqx.tree_at(lambda m: m.source, model, jnp.asarray(source))
    scheme = instantiate(cfg.scheme, _convert_="all")
    # checkpoints: n binomial checkpoints of the rollouts (long windows, large grids;
    # gradients only: use with L-BFGS 4D-Var, not Gauss-Newton's forward mode).
    simulator = Simulator(model, scheme, cfg.dt, checkpoints=cfg.get("checkpoints"))
    spec = cfg.get("parameter")
    if not spec:
        return simulator, None
    from assim import DiagonalCovariance, DiffusionCovariance

    if spec.kind == "field":
        sqrt = DiffusionCovariance(model.grid, spec.log_std, spec.length_scale).sqrt
        shape = model.grid.shape
    elif spec.kind == "scalar":
        sqrt = DiagonalCovariance(spec.log_std).sqrt
        shape = ()
    else:
        raise ValueError(f"parameter kind must be 'field' or 'scalar', got {spec.kind}")
    if not hasattr(model, spec.name):
        raise ValueError(f"{type(model).__name__} has no parameter {spec.name!r}")
    parameter = Parameter(spec.name, float(spec.background), sqrt, shape)
    dtype = jnp.zeros(()).dtype
    simulator = parameter.set(simulator, jnp.zeros(shape, dtype))
    return simulator, parameter


def generate_twin(sim_cfg: DictConfig, twin_cfg: DictConfig, seed: int):
    """A twin experiment for `sim_cfg`: returns the observation `xarray.Dataset`.

    The truth differs from the assimilating model by its hidden parameter (drawn from
    the prior, `parameter_scale` times its std) and a missing term.
    """
    from assim._twin import MissingTerm, random_field, run_twin, twin_dataset

    rng = np.random.default_rng(seed)
    simulator, parameter = build_simulator(sim_cfg)
    grid = simulator.model.grid
    extra = {}
    truth_simulator = simulator
    names = ["x"] if grid.ndim == 1 else ["y", "x"]
    if parameter is not None:
        spec = sim_cfg.parameter
        scale = float(twin_cfg.truth.parameter_scale)
        if spec.kind == "field":
            white = random_field(grid, rng, float(spec.length_scale))
            true_value = spec.background * np.exp(scale * spec.log_std * white)
        else:
            true_value = spec.background * np.exp(scale * spec.log_std * rng.normal())
        truth_simulator = eqx.tree_at(
            lambda s: getattr(s.model, spec.name), simulator, jnp.asarray(true_value)
        )
        extra[f"true_{spec.name}"] = (
            tuple(names) if np.ndim(true_value) else (),
            np.asarray(true_value, np.float64),
            {
                "units": spec.units,
                "long_name": f"true {spec.long_name} (evaluation only)",
            },
        )
    missing = MissingTerm(
        twin_cfg.truth.missing_term.kind, twin_cfg.truth.missing_term.rate
    )
    if missing.kind != "none":
        truth_simulator = eqx.tree_at(
            lambda s: s.correction,
            truth_simulator,
            missing,
            is_leaf=lambda x: x is None,
        )
    u0 = twin_cfg.initial_amplitude * random_field(
        grid, rng, twin_cfg.initial_length_scale * min(grid.length)
    )
    twin = run_twin(
        truth_simulator,
        jnp.asarray(u0, jnp.zeros(()).dtype),
        n_times=int(twin_cfg.n_times),
        observation_interval=int(twin_cfg.observation_interval),
        spinup_steps=int(twin_cfg.spinup_steps),
        noise_std=float(twin_cfg.noise_std),
        window_length=int(twin_cfg.window_length),
        splits=tuple(twin_cfg.splits),
        rng=rng,
        sensors=OmegaConf.to_object(twin_cfg.sensors),
    )
    attrs = {
        "title": f"twin experiment: {sim_cfg.name}",
        "simulator": sim_cfg.name,
        "simulator_settings": OmegaConf.to_yaml(sim_cfg),
        "dt": float(sim_cfg.dt),
        "observation_interval_steps": int(twin_cfg.observation_interval),
        "window_length": int(twin_cfg.window_length),
        "missing_term": missing.describe(),
        "sensor_pattern": str(twin_cfg.sensors.pattern),
        "seed": int(seed),
        "history": "generated by assim-data",
    }
    return twin_dataset(
        twin,
        grid,
        dt=float(sim_cfg.dt),
        observation_interval=int(twin_cfg.observation_interval),
        noise_std=float(twin_cfg.noise_std),
        attrs=attrs,
        extra=extra,
    )


def run_app(name: str, cfg: DictConfig, body: Callable[[DictConfig], dict]):
    """Run a CLI body: float64 switch, joining a multi-host run (`distributed`),
    one-line errors and exit code 2 on bad input."""
    from assim import ObservationError, TrainingStopped

    if cfg.get("float64"):
        jax.config.update("jax_enable_x64", True)
    try:
        distributed = cfg.get("distributed")
        if distributed is not None and distributed.enabled:
            from assim import initialize_distributed

            initialize_distributed(
                distributed.coordinator_address,
                distributed.num_processes,
                distributed.process_id,
            )
        metrics = body(cfg)
    except (ObservationError, ValueError, TypeError, FileNotFoundError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        log.error("%s", message)
        print(f"{name}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError, TrainingStopped) as e:
        from assim._train import error_summary

        message = error_summary(e)
        log.error("%s", message)
        print(f"{name}: solver error: {message}", file=sys.stderr)
        sys.exit(3)
    return metrics
