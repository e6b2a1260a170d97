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
import optimistix as optx
from jaxtyping import Array, Float, PRNGKeyArray

from ._bilevel import BilevelVar
from ._observations import ObservationSet
from ._unrolled import AbstractWindowNet, _held
from ._var import Control, Var4D, make_solver

Hide = Literal["points", "sensors"]


class Batch(eqx.Module):
    """A batch of windows: observations stacked along a leading axis (every leaf of
    the `ObservationSet`) and one background per window; `analysis`, if set, holds
    the refined 4D-Var analyses the cost loss is evaluated at (`train` sets it from
    its warm-started store)."""

    obs: ObservationSet
    background: Float[Array, "batch ..."]
    analysis: Float[Array, "batch ..."] | None = None

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


def _window_cost(net: AbstractWindowNet, x, obs: ObservationSet, background, windows):
    v = net.background_covariance.whiten(x - background)
    value = 0.5 * jnp.sum(v**2) + net.observation_cost(x, obs)
    if net.theta is not None:
        squares = sum(jnp.sum(t**2) for t in jax.tree.leaves(net.theta))
        value = value + 0.5 * squares / windows
    return value / jnp.maximum(jnp.sum(obs.mask), 1)


def _hold_model(net: AbstractWindowNet) -> AbstractWindowNet:
    """`net` with its model's learned parts (`theta`, the correction) held."""
    return eqx.tree_at(
        lambda n: (n.theta, n.simulator.correction),
        net,
        (_held(net.theta), _held(net.simulator.correction)),
        is_leaf=lambda x: x is None,
    )


def refine_analysis(
    net: AbstractWindowNet,
    obs: ObservationSet,
    background,
    x,
    *,
    steps: int,
    cg_steps: int = 20,
) -> Array:
    """The window's 4D-Var analysis reached from `x` (e.g. a network's output), the
    network's model held: `steps` Gauss-Newton iterations of incremental 4D-Var
    (`cg_steps` conjugate-gradient iterations each, `make_solver("gauss-newton")`)
    on `|x - x_b|^2_{B^-1} / 2 + J_o(x)`, started at `x`. Not differentiated (the
    gradients of `net` and `x` are stopped). For a model linear in the state, one
    iteration with enough CG iterations is the minimum."""
    net = _held(net)
    B = net.background_covariance
    cost = Var4D(net.model(), background, B, net.observation_interval)
    start = Control(B.whiten(jax.lax.stop_gradient(x) - background))
    solution = optx.least_squares(
        lambda y, args: cost.residuals(y, obs),
        # Tolerances below reach: the iterations run to `steps` (or a fixed point).
        make_solver("gauss-newton", rtol=1e-12, atol=1e-12, inner_steps=cg_steps),
        start,
        max_steps=steps + 1,  # optimistix's first step only linearises
        throw=False,
    )
    return jax.lax.stop_gradient(cost.analysis(solution.value)[0])


def cost_loss(
    net: AbstractWindowNet,
    obs: ObservationSet,
    background,
    *,
    windows: int = 1,
    refine: int = 0,
    refine_cg: int = 20,
    analysis: Array | None = None,
) -> Array:
    """The window's 4D-Var cost at the network's output, per observation:
    `(|x - x_b|^2_{B^-1} / 2 + J_o(x; theta) + |theta|^2 / (2 windows)) / n_obs`,
    with `theta` the whitened physical parameters (prior `N(0, I)`). Summed over the
    `windows` training windows it is the joint 4D-Var cost of their analyses and the
    shared parameters (unsupervised 4DVarNet; it reads the observations whole, no
    truth). `B` enters unscaled, so it is no criterion for a learned B scale (it
    falls as B widens): use the evidence for that.

    With `refine = 0` every learned leaf descends the cost at the network's output,
    so the learned `theta` is the joint MAP estimate only where the analyses reach
    the 4D-Var minimum: away from it the parameters absorb the network's error
    (README, bundled dataset). `refine > 0` separates the two: the value is the
    cost at `x* = refine_analysis(x)` (`refine` Gauss-Newton iterations from the
    network's output, `refine_cg` CG iterations each), and the model's learned
    parts (`theta`, the correction) descend it there, which is the gradient of
    `min_x J(x; theta)` (envelope theorem: `grad_x J(x*) = 0`) and so the joint
    4D-Var gradient; the network descends the cost at its own output with the
    model held, learning to start the refinement closer to the minimum.
    `analysis` (with `refine > 0`) replaces that refinement with an analysis refined
    elsewhere: `train` keeps one per training window and refines it a little more
    at every step (warm starts across steps, so that the iterations add up while
    the parameters move; amortised bilevel optimisation, Arbel & Mairal, ICLR
    2022)."""
    if refine == 0:
        return _window_cost(net, net(obs, background), obs, background, windows)
    held = _hold_model(net)
    x = held(obs, background)
    if analysis is None:
        analysis = refine_analysis(
            net, obs, background, x, steps=refine, cg_steps=refine_cg
        )
    x_star = jax.lax.stop_gradient(analysis)
    own = _window_cost(held, x, obs, background, windows)
    at_minimum = _window_cost(net, x_star, obs, background, windows)
    return at_minimum + own - jax.lax.stop_gradient(own)


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
    refine: int = 0,
    refine_cg: int = 20,
    analysis: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """A weighted sum of the named losses (`weights`, e.g. `{"masking": 1.0,
    "residual": 0.1}`) on one window, and each term. `fraction`, `by`: the masking
    loss's; `probes`: the evidence loss's log-determinant (0: exact); `windows`,
    `refine`, `refine_cg`, `analysis`: the cost loss's (the windows that share one
    parameter prior; the Gauss-Newton refinement of the output)."""
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
            terms[name] = cost_loss(
                net,
                obs,
                background,
                windows=windows,
                refine=refine,
                refine_cg=refine_cg,
                analysis=analysis,
            )
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
        lambda o, b, a, k: window_loss(
            net, o, b, key=k, windows=windows, analysis=a, **options
        )
    )(batch.obs, batch.background, batch.analysis, keys)
    return jnp.mean(total), jax.tree.map(jnp.mean, terms)
