"""Training losses for window networks: supervised (against `truth`), observation
masking (no ground truth), the variational cost and the optimality residual
(physics; no ground truth), the marginal likelihood of the observations (bilevel
networks; no ground truth), and denoising (for a plug-and-play prior). All take one
window; `batch_loss` vmaps them over a batch."""

import dataclasses
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._bilevel import BilevelVar
from ._observations import ObservationSet
from ._unrolled import AbstractWindowNet

Hide = Literal["points", "sensors"]


class Batch(eqx.Module):
    """A batch of windows: observations stacked along a leading axis (every leaf of
    the `ObservationSet`) and one background per window."""

    obs: ObservationSet
    background: Float[Array, "batch ..."]

    @classmethod
    def stack(cls, windows: list[ObservationSet], backgrounds) -> "Batch":
        obs = jax.tree.map(lambda *leaves: jnp.stack(leaves), *windows)
        return cls(obs, jnp.stack(list(backgrounds)))

    @property
    def size(self) -> int:
        return self.background.shape[0]

    def observed_std(self) -> float:
        """The spread of the observed values (no truth): the networks' input scale."""
        values = np.asarray(self.obs.values)[np.asarray(self.obs.mask)]
        return float(values.std()) or 1.0


def hide(obs: ObservationSet, fraction: float, by: Hide, *, key: PRNGKeyArray):
    """Split a window's observations into what the network sees and what scores it.

    `by="points"` hides each observed value with probability `fraction`;
    `by="sensors"` hides whole sensors (a location at every time). Neither set holds
    `truth`.

    **Returns:** `(visible, hidden)` `ObservationSet`s.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"masking fraction must be in (0, 1), got {fraction}")
    if by == "points":
        drop = jax.random.uniform(key, obs.mask.shape) < fraction
    elif by == "sensors":
        drop = jax.random.uniform(key, obs.mask.shape[1:]) < fraction
        drop = jnp.broadcast_to(drop, obs.mask.shape)
    else:
        raise ValueError(f"hide by must be 'points' or 'sensors', got {by!r}")
    visible = dataclasses.replace(obs, mask=obs.mask & ~drop, truth=None)
    hidden = dataclasses.replace(obs, mask=obs.mask & drop, truth=None)
    return visible, hidden


def _mean_square(r, weight):
    return jnp.sum(weight * r**2) / jnp.maximum(jnp.sum(weight), 1.0)


def supervised_loss(net: AbstractWindowNet, obs: ObservationSet, background) -> Array:
    """Mean squared error of the analysed trajectory against `obs.truth`, divided by
    `net.scale ** 2` (twin experiments only)."""
    if obs.truth is None:
        raise ValueError("the supervised loss needs 'truth' (a twin experiment)")
    trajectory = net.analysis(obs, background)
    return jnp.mean((trajectory - obs.truth) ** 2) / net.scale**2


def masking_loss(
    net: AbstractWindowNet,
    obs: ObservationSet,
    background,
    *,
    key: PRNGKeyArray,
    fraction: float = 0.2,
    by: Hide = "points",
) -> Array:
    """The observation-masking loss: the network assimilates the visible part of the
    window and is scored (mean squared whitened misfit) on the hidden part. It never
    reads `truth` (both sets are built without it)."""
    visible, hidden = hide(obs, fraction, by, key=key)
    trajectory = net.analysis(visible, background)
    weight = hidden.mask.astype(trajectory.dtype)
    return _mean_square(hidden.innovations(trajectory), weight)


def residual_loss(net: AbstractWindowNet, obs: ObservationSet, background) -> Array:
    """The optimality residual at the network's output: the mean square of the
    B-preconditioned gradient of the window cost (`lambda = 1`),
    `(x - x_b) + B grad J_o(x)`, divided by `net.scale ** 2`. Zero at a stationary
    point of 4D-Var; no truth needed."""
    x = net(obs, background)
    d = (x - background) + net.observation_gradient(x, obs)
    return jnp.mean(d**2) / net.scale**2


def cost_loss(
    net: AbstractWindowNet, obs: ObservationSet, background, *, windows: int = 1
) -> Array:
    """The window's 4D-Var cost at the network's output, per observation:
    `(|x - x_b|^2_{B^-1} / 2 + J_o(x; theta) + |theta|^2 / (2 windows)) / n_obs`,
    with `theta` the whitened physical parameters (prior `N(0, I)`). Summed over the
    `windows` training windows it is the joint 4D-Var cost of their analyses and the
    shared parameters (unsupervised 4DVarNet; it reads the observations whole, no
    truth). The learned `theta` is their joint MAP estimate only where the analyses
    reach the 4D-Var minimum: away from it the parameters absorb the network's error
    (README, bundled dataset). `B` enters unscaled, so it is no criterion for a
    learned B scale (it falls as B widens): use the evidence for that."""
    x = net(obs, background)
    v = net.background_covariance.whiten(x - background)
    value = 0.5 * jnp.sum(v**2) + net.observation_cost(x, obs)
    if net.theta is not None:
        squares = sum(jnp.sum(t**2) for t in jax.tree.leaves(net.theta))
        value = value + 0.5 * squares / windows
    return value / jnp.maximum(jnp.sum(obs.mask), 1)


def evidence_loss(
    net: AbstractWindowNet,
    obs: ObservationSet,
    background,
    *,
    probes: int = 0,
    key: PRNGKeyArray | None = None,
) -> Array:
    """The negative log marginal likelihood of the window's observations (Laplace
    approximation at the converged 4D-Var solution, `BilevelVar.negative_log_evidence`)
    per observation: type-II maximum likelihood of the B scale, the physical
    parameters and a model-error correction. No truth needed; the bilevel network's
    inner 4D-Var must be solved to convergence."""
    if not isinstance(net, BilevelVar):
        raise ValueError(
            "the evidence loss needs a bilevel network (assim.BilevelVar): it is the "
            "marginal likelihood at a converged 4D-Var solution, got "
            f"{type(net).__name__}"
        )
    value = net.negative_log_evidence(obs, background, probes=probes, key=key)
    return value / jnp.maximum(jnp.sum(obs.mask), 1)


def denoising_loss(
    net: AbstractWindowNet, fields: Array, noise_std: float, *, key: PRNGKeyArray
) -> Array:
    """Train a plug-and-play prior's denoiser on clean fields `(batch, *grid)`:
    mean squared error of `D(x + noise)` against `x`, divided by `net.scale ** 2`."""
    if net.prior is None or not hasattr(net.prior, "denoise"):
        raise ValueError("denoising_loss needs a network with a plug-and-play prior")
    noisy = fields + noise_std * jax.random.normal(key, fields.shape, fields.dtype)
    clean = jax.vmap(net.prior.denoise)(noisy)
    return jnp.mean((clean - fields) ** 2) / net.scale**2


Loss = Literal["supervised", "masking", "residual", "cost", "evidence"]


def window_loss(
    net: AbstractWindowNet,
    obs: ObservationSet,
    background,
    *,
    key: PRNGKeyArray,
    weights: dict[str, float],
    fraction: float = 0.2,
    by: Hide = "points",
    probes: int = 0,
    windows: int = 1,
) -> tuple[Array, dict[str, Array]]:
    """A weighted sum of the named losses (`weights`, e.g. `{"masking": 1.0,
    "residual": 0.1}`) on one window, and each term. `fraction`, `by`: the masking
    loss's; `probes`: the evidence loss's log-determinant (0: exact); `windows`: the
    cost loss's (the windows that share one parameter prior)."""
    terms = {}
    for name in weights:
        if name == "supervised":
            terms[name] = supervised_loss(net, obs, background)
        elif name == "masking":
            terms[name] = masking_loss(
                net, obs, background, key=key, fraction=fraction, by=by
            )
        elif name == "residual":
            terms[name] = residual_loss(net, obs, background)
        elif name == "cost":
            terms[name] = cost_loss(net, obs, background, windows=windows)
        elif name == "evidence":
            terms[name] = evidence_loss(
                net, obs, background, probes=probes, key=jax.random.fold_in(key, 1)
            )
        else:
            raise ValueError(
                f"unknown loss {name!r}: expected supervised, masking, residual, cost "
                "or evidence"
            )
    total = sum(weights[name] * terms[name] for name in terms)
    return total, terms


def batch_loss(
    net: AbstractWindowNet,
    batch: Batch,
    *,
    key: PRNGKeyArray,
    windows: int | None = None,
    **options,
):
    """`window_loss` averaged over a batch (vmapped; one key per window).
    `windows`: the size of the set the batch is drawn from (default: the batch)."""
    keys = jax.random.split(key, batch.size)
    windows = batch.size if windows is None else windows
    total, terms = jax.vmap(
        lambda o, b, k: window_loss(net, o, b, key=k, windows=windows, **options)
    )(batch.obs, batch.background, keys)
    return jnp.mean(total), jax.tree.map(jnp.mean, terms)
