"""Unrolled networks from config, and from a checkpoint's header."""

import equinox as eqx
import jax
import jax.numpy as jnp
from omegaconf import DictConfig, OmegaConf

from .common import build_simulator


def build_network(sim_cfg, net_cfg, *, n_times: int, interval: int, scale: float, seed):
    """`(network, parameter)`: an untrained `UnrolledVar` (`name: unrolled`) or
    `BilevelVar` (`name: bilevel`) for the configured simulator, with its unknown
    parameter learned when `learn_parameters`."""
    from assim import BilevelVar, DiffusionCovariance, NeuralCorrection, UnrolledVar

    if net_cfg.name not in ("unrolled", "bilevel"):
        raise ValueError(
            f"network name must be 'unrolled' or 'bilevel', got {net_cfg.name!r}"
        )

    simulator, parameter = build_simulator(sim_cfg)
    grid = simulator.model.grid
    key_net, key_correction = jax.random.split(jax.random.PRNGKey(int(seed)))
    if net_cfg.correction:
        correction = NeuralCorrection(
            grid,
            int(net_cfg.width),
            int(net_cfg.depth),
            int(net_cfg.kernel),
            scale=scale,
            rate=float(net_cfg.correction_rate),
            key=key_correction,
        )
        simulator = eqx.tree_at(
            lambda s: s.correction, simulator, correction, is_leaf=lambda x: x is None
        )
    learn = bool(net_cfg.learn_parameters) and parameter is not None
    dtype = jnp.zeros(()).dtype
    B = DiffusionCovariance(
        grid,
        float(net_cfg.background_std),
        float(net_cfg.background_length_scale) * min(grid.length),
    )
    theta = jnp.zeros(parameter.shape, dtype) if learn else None
    set_parameters = parameter.set if learn else None
    if net_cfg.name == "bilevel":
        net = BilevelVar(
            simulator,
            B,
            observation_interval=int(interval),
            theta=theta,
            set_parameters=set_parameters,
            scale=float(scale),
            rtol=float(net_cfg.rtol),
            atol=float(net_cfg.atol),
            max_steps=int(net_cfg.max_steps),
            hypergradient=str(net_cfg.hypergradient),
            hessian=net_cfg.get("hessian"),
        )
        return net, (parameter if learn else None)
    net = UnrolledVar(
        simulator,
        B,
        int(net_cfg.n_layers),
        observation_interval=int(interval),
        n_times=int(n_times),
        step=1.0 if net_cfg.step == "auto" else float(net_cfg.step),
        regularisation=float(net_cfg.regularisation),
        continuation=bool(net_cfg.continuation),
        momentum=bool(net_cfg.momentum),
        prior=net_cfg.prior,
        gradient_solver=bool(net_cfg.gradient_solver),
        warm_start=bool(net_cfg.warm_start),
        theta=theta,
        set_parameters=set_parameters,
        scale=float(scale),
        width=int(net_cfg.width),
        depth=int(net_cfg.depth),
        kernel=int(net_cfg.kernel),
        hidden=int(net_cfg.hidden),
        checkpoints=None if net_cfg.checkpoints is None else int(net_cfg.checkpoints),
        key=key_net,
    )
    return net, (parameter if learn else None)


def network_header(cfg: DictConfig, *, n_times, interval, scale) -> dict:
    """What a checkpoint needs to rebuild its network (JSON-able)."""
    return {
        "format": "assim-unrolled-1",
        "simulator": OmegaConf.to_container(cfg.simulator, resolve=True),
        "network": OmegaConf.to_container(cfg.network, resolve=True),
        "training": OmegaConf.to_container(cfg.training, resolve=True),
        "n_times": int(n_times),
        "interval": int(interval),
        "scale": float(scale),
        "seed": int(cfg.seed),
        "float64": bool(cfg.get("float64", False)),
    }


def training_settings(training_cfg, seed):
    from assim import TrainSettings

    values = OmegaConf.to_container(OmegaConf.create(training_cfg), resolve=True)
    values["losses"] = {str(k): float(v) for k, v in values["losses"].items()}
    return TrainSettings(**values, seed=int(seed))


def read_header(path) -> dict:
    from assim import read_header as read

    return read(path)


def load_network(path):
    """`(network, parameter, header)` from a checkpoint written by `assim-train`."""
    from assim import init_state, load_checkpoint, read_header
    from assim._train import network

    header = read_header(path)
    if header.get("format") != "assim-unrolled-1":
        raise ValueError(f"{path} is not an assim-train checkpoint")
    net, parameter = build_network(
        OmegaConf.create(header["simulator"]),
        OmegaConf.create(header["network"]),
        n_times=header["n_times"],
        interval=header["interval"],
        scale=header["scale"],
        seed=header["seed"],
    )
    settings = training_settings(header["training"], header["seed"])
    # The leaves are read in order and the network's come first: a refined cost
    # loss's stored analyses (the state's last leaf) are left unread.
    state, _ = load_checkpoint(path, init_state(net, settings))
    return network(net, state), parameter, header
