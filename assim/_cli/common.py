"""Pieces shared by the hydra apps: simulators, window problems and their unknown
parameters built from config, twin-experiment generation, error handling."""

import logging
import sys
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from assim import Parameter, WindowProblem
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


def instantiate_trusted(cfg, *, _convert_: str = "all", **objects):
    """`hydra.utils.instantiate` for configs that may come from a file someone else
    wrote (a checkpoint's header): every `_target_` must name something in this
    project's packages (`simulators.`, `assim.`, `optimistix.`, `lineax.`), so that
    loading a file can never call an arbitrary function. `objects` (a grid, a key,
    a callback) are passed to the built callable as they are: hydra would turn
    them into configs."""
    for target in _targets(OmegaConf.to_container(cfg) if _is_config(cfg) else cfg):
        if not str(target).startswith(_TRUSTED):
            raise ValueError(
                f"refusing to build {target!r}: configs may only name "
                f"{', '.join(p.rstrip('.') for p in _TRUSTED)} objects"
            )
    if not objects:
        return instantiate(cfg, _convert_=_convert_)
    return instantiate(cfg, _partial_=True, _convert_=_convert_)(**objects)


_TRUSTED = ("simulators.", "assim.", "optimistix.", "lineax.")


def _is_config(cfg) -> bool:
    return isinstance(cfg, (DictConfig, ListConfig))


def _targets(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                yield value
            else:
                yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


def build_simulator(cfg: DictConfig) -> tuple[Simulator, Parameter | None]:
    """The assimilating simulator from a `simulator` config (a model and a scheme),
    with its unknown parameter (an `assim.Parameter`, if any) at the prior's
    median."""
    model = instantiate_trusted(cfg.model, _convert_="all")
    if cfg.get("source_modes"):
        source = source_field(model.grid, OmegaConf.to_object(cfg.source_modes))
        model = eqx.tree_at(lambda m: m.source, model, jnp.asarray(source))
    scheme = instantiate_trusted(cfg.scheme, _convert_="all")
    # checkpoints: n binomial checkpoints of the rollouts (long windows, large grids;
    # gradients only: use with L-BFGS 4D-Var, not Gauss-Newton's forward mode).
    simulator = Simulator(model, scheme, cfg.dt, checkpoints=cfg.get("checkpoints"))
    if not cfg.get("parameter"):
        return simulator, None
    parameter = instantiate_trusted(cfg.parameter, _convert_="all")
    simulator = parameter(simulator, parameter.zeros())
    return simulator, parameter


def build_problem(
    sim_cfg: DictConfig, problem_cfg: DictConfig, interval: int
) -> tuple[WindowProblem, Parameter | None]:
    """The window problem from the `simulator` and `problem` configs, with `interval`
    model steps between observation times; the unknown parameter is estimated when
    `problem.estimate_parameters` (and the simulator has one)."""
    simulator, parameter = build_simulator(sim_cfg)
    grid = simulator.model.grid
    B = instantiate_trusted(problem_cfg.background_covariance)(grid=grid)
    Q = problem_cfg.get("model_error_covariance")
    Q = None if Q is None else instantiate_trusted(Q)(grid=grid)
    terms = [instantiate_trusted(t) for t in problem_cfg.get("terms") or ()]
    if not problem_cfg.get("estimate_parameters", True):
        parameter = None
    problem = WindowProblem(
        simulator,
        B,
        interval,
        set_parameters=parameter,
        model_error_covariance=Q,
        terms=terms,
    )
    return problem, parameter


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
        # The truth's log-parameter: a draw of the prior's Gaussian (field or
        # scalar), `parameter_scale` times its std.
        scale = float(twin_cfg.truth.parameter_scale)
        log_std = float(parameter.covariance.std)
        if parameter.shape:
            length = float(parameter.covariance.length_scale)
            white = random_field(grid, rng, length)
        else:
            white = rng.normal()
        true_value = parameter.background * np.exp(scale * log_std * white)
        truth_simulator = eqx.tree_at(
            lambda s: getattr(s.model, parameter.name),
            simulator,
            jnp.asarray(true_value),
        )
        extra[f"true_{parameter.name}"] = (
            tuple(names) if np.ndim(true_value) else (),
            np.asarray(true_value, np.float64),
            {
                "units": parameter.units,
                "long_name": f"true {parameter.long_name} (evaluation only)",
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
