"""Trainable analysers from config, and from a checkpoint's header."""

import jax
from omegaconf import DictConfig, OmegaConf

from .common import build_problem, instantiate_trusted

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
        problem = problem.with_parameters(problem.parameter_background)
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
    from assim import BilevelVar
    from assim._train import init_state, load_checkpoint, network, read_header

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
