"""Library objects built from hydra configs: simulators (a model and a scheme),
window problems (B, Q, the parameter prior, extra terms), trainable analysers,
training settings and twin experiments; and a trained network back from a
checkpoint. `assim-run`, `assim-train` and `assim-data` only call these, and so do
the benchmarks, so that every figure goes through the path a user runs.

Configs are `_target_` nodes that mirror the constructors. A config may come from
a file someone else wrote (a checkpoint's header), so `instantiate_trusted` builds
only objects of this project's packages."""

import importlib
import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from simulators import Grid, Simulator

from ._problem import Parameter, WindowProblem


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
        _check_target(target)
    if not objects:
        return instantiate(cfg, _convert_=_convert_)
    return instantiate(cfg, _partial_=True, _convert_=_convert_)(**objects)


_TRUSTED = ("simulators", "assim", "optimistix", "lineax")
# The functions a config may call: constructors of the objects above.
_FUNCTIONS = {
    "assim.incremental",
    "assim.climatological_covariance",
    "simulators.backward_euler",
    "simulators.crank_nicolson",
}
_FILE_CLASSES = {"assim.AnalysisWriter", "assim.WindowStream"}


def _check_target(target) -> None:
    """A `_target_` is allowed when it is one of the packages' public classes
    (`assim.Variational`, `simulators.Grid`, `optimistix.LBFGS`; not those that
    open or write files), a classmethod constructor of one
    (`assim.DiffusionCovariance.relative`), or one of the constructor functions
    in `_FUNCTIONS`: no private name, no module path (`assim._io.os.remove` would
    reach `os` through a module's imports), no function that writes
    (`assim.save_checkpoint`)."""
    parts = str(target).split(".")
    refused = ValueError(
        f"refusing to build {target!r}: configs may only name the public classes "
        f"and functions of {', '.join(_TRUSTED)}"
    )
    if (
        parts[0] not in _TRUSTED
        or not 2 <= len(parts) <= 3
        or any(not p.isidentifier() or p.startswith("_") for p in parts)
    ):
        raise refused
    obj = getattr(importlib.import_module(parts[0]), parts[1], None)
    name = ".".join(parts[:2])
    if inspect.isfunction(obj):
        if name not in _FUNCTIONS or len(parts) > 2:
            raise refused
    elif not (
        isinstance(obj, type)
        and obj.__module__.split(".")[0] in _TRUSTED
        and name not in _FILE_CLASSES
    ):
        raise refused
    if len(parts) == 3:
        member = inspect.getattr_static(obj, parts[2], None)
        if not isinstance(obj, type) or not isinstance(member, classmethod):
            raise refused


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
    `problem.estimate_parameters` (and the simulator has one). `B` is
    `problem.background_covariance`, or when that is null the simulator's own
    (`simulator.background_covariance`: a climatology for translation-invariant
    models); covariance configs are partials called with the simulator."""
    simulator, parameter = build_simulator(sim_cfg)
    B = problem_cfg.get("background_covariance")
    if B is None:
        B = sim_cfg.get("background_covariance")
    if B is None:
        raise ValueError(
            "no background covariance: set problem.background_covariance or the "
            "simulator's background_covariance"
        )
    B = instantiate_trusted(B)(simulator)
    Q = problem_cfg.get("model_error_covariance")
    Q = None if Q is None else instantiate_trusted(Q)(simulator)
    if not problem_cfg.get("estimate_parameters", True):
        parameter = None
    terms = build_terms(problem_cfg.get("terms"), simulator.model.grid, parameter)
    problem = WindowProblem(
        simulator,
        B,
        interval,
        set_parameters=parameter,
        model_error_covariance=Q,
        terms=terms,
    )
    return problem, parameter


def build_terms(term_cfgs, grid: Grid, parameter: Parameter | None) -> tuple:
    """Cost terms from a list of term configs (`problem.terms`, `assim-run`'s
    `steering`), each given what it needs from the problem: `ParameterBounds` the
    estimated parameter, `KnownValues.at_points` / `.on_boundary` the grid's shape,
    `ConservedTotal` the grid's cell size (a total is an integral) unless set."""
    terms = []
    for cfg in term_cfgs or ():
        target = str(cfg.get("_target_", ""))
        objects = {}
        if target.endswith("ParameterBounds"):
            if parameter is None:
                raise ValueError(
                    "ParameterBounds: the simulator has no estimated parameter "
                    "(simulator.parameter, problem.estimate_parameters)"
                )
            objects["parameter"] = parameter
        elif target.endswith(("KnownValues.at_points", "KnownValues.on_boundary")):
            objects["shape"] = tuple(grid.shape)
        elif target.endswith("ConservedTotal") and cfg.get("cell") is None:
            objects["cell"] = float(np.prod(grid.spacing))
        terms.append(instantiate_trusted(cfg, **objects))
    return tuple(terms)


def generate_twin(sim_cfg: DictConfig, twin_cfg: DictConfig, seed: int):
    """A twin experiment for `sim_cfg`: returns the observation `xarray.Dataset`.

    The truth differs from the assimilating model by its hidden parameter (drawn from
    the prior, `parameter_scale` times its std) and a missing term.
    """
    from ._twin import MissingTerm, random_field, run_twin, twin_dataset

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
        time_units=str(twin_cfg.get("time_units") or "model time units"),
    )


FORMAT = "assim-network-2"


def build_network(cfg, *, n_times: int, interval: int, scale: float, seed):
    """`(network, problem, parameter)`: an untrained network from the `network`
    config (its `net` is the constructor's arguments) for the window problem of the
    `simulator` and `problem` configs; the simulator's unknown parameter is learned
    when `network.learn_parameters` (`parameter` is then returned)."""
    net_cfg = cfg.network
    problem, parameter = build_problem(cfg.simulator, cfg.problem, interval)
    grid = problem.simulator.model.grid
    key_net, key_correction = jax.random.split(jax.random.PRNGKey(int(seed)))
    correction = None
    if net_cfg.get("correction"):
        correction = instantiate_trusted(
            net_cfg.correction, grid=grid, scale=scale, key=key_correction
        )
    learn = bool(net_cfg.learn_parameters) and parameter is not None
    theta = parameter.zeros() if learn else None
    if not learn:  # the model runs with the parameter's prior median
        problem = problem.with_prior_parameters()
    extra = {"theta": theta, "correction": correction, "scale": float(scale)}
    target = str(net_cfg.net._target_)
    if target.endswith("UnrolledVar"):
        extra.update(grid=grid, n_times=int(n_times), key=key_net)
    net = instantiate_trusted(net_cfg.net, **extra)
    return net, problem, (parameter if learn else None)


def network_header(cfg: DictConfig, *, n_times, interval, scale) -> dict:
    """What a checkpoint needs to rebuild its network and problem (JSON-able)."""
    return {
        "format": FORMAT,
        "simulator": OmegaConf.to_container(cfg.simulator, resolve=True),
        "problem": OmegaConf.to_container(cfg.problem, resolve=True),
        "network": OmegaConf.to_container(cfg.network, resolve=True),
        "training": OmegaConf.to_container(cfg.training, resolve=True),
        "n_times": int(n_times),
        "interval": int(interval),
        "scale": float(scale),
        "seed": int(cfg.seed),
        "float64": bool(cfg.get("float64", False)),
    }


def training_settings(training_cfg):
    """`assim.TrainSettings` from the `training` config (its `weights` are the loss
    terms' weights, interpolated into `loss`)."""
    if isinstance(training_cfg, DictConfig):  # resolved against its root config
        values = OmegaConf.to_container(training_cfg, resolve=True)
    else:  # a checkpoint header's copy, resolved when it was written
        values = dict(training_cfg)
    values.pop("weights", None)
    return instantiate_trusted(values)


def load_network(path):
    """`(network, problem, parameter, header)` from a checkpoint written by
    `assim-train`. Every object the header names is checked to be the project's
    (`instantiate_trusted`): a checkpoint cannot call arbitrary code."""
    from ._bilevel import BilevelVar
    from ._train import init_state, load_checkpoint, network, read_header

    header = read_header(path)
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not an assim-train checkpoint ({FORMAT})")
    if header.get("float64"):
        jax.config.update("jax_enable_x64", True)
    cfg = OmegaConf.create(
        {key: header[key] for key in ("simulator", "problem", "network")}
    )
    net, problem, parameter = build_network(
        cfg,
        n_times=header["n_times"],
        interval=header["interval"],
        scale=header["scale"],
        seed=header["seed"],
    )
    settings = training_settings(header["training"])
    # The leaves are read in order and the network's come first: a refined cost
    # loss's stored analyses (the state's last leaf) are left unread.
    state, _ = load_checkpoint(path, init_state(net, settings))
    net = network(net, state)
    if isinstance(net, BilevelVar):  # assimilating: report, do not raise
        net = net.with_throw(False)
    return net, problem, parameter, header
