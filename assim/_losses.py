"""Training losses for window networks, as modules: supervised (against `truth`),
observation masking (no ground truth), the variational cost and the optimality
residual (physics; no ground truth), the marginal likelihood of the observations
(bilevel networks; no ground truth), and denoising (for a plug-and-play prior).
Each takes one window and evaluates the window problem through its methods; a
training loss is a `WeightedLoss` of them, vmapped over a batch by `batch_loss`."""

import abc
from collections.abc import Mapping
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._batch import Batch
from ._bilevel import BilevelVar
from ._observations import ObservationSet
from ._problem import Analysis, WindowProblem
from ._unrolled import AbstractWindowNet, held
from ._variational import Variational, incremental

Hide = Literal["points", "sensors"]


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
    visible = eqx.tree_at(
        lambda o: (o.mask, o.truth), obs, (obs.mask & ~drop, None), is_leaf=_is_none
    )
    hidden = eqx.tree_at(
        lambda o: (o.mask, o.truth), obs, (obs.mask & drop, None), is_leaf=_is_none
    )
    return visible, hidden


def _is_none(x):
    return x is None


class AbstractLoss(eqx.Module):
    """A training loss on one window:
    `loss(net, problem, window, background, *, key, windows, analysis)`.

    `windows`: the number of training windows that share the learned parameters'
    prior (the cost loss's); `analysis`: a refined analysis of the window kept by
    `train` (the refined cost loss's). Losses ignore what they do not use."""

    @abc.abstractmethod
    def __call__(
        self,
        net: AbstractWindowNet,
        problem: WindowProblem,
        window: ObservationSet,
        background: Array,
        *,
        key: PRNGKeyArray,
        windows: int = 1,
        analysis: Array | None = None,
    ) -> Float[Array, ""]:
        """The loss's value."""


def _mean_square(r, weight):
    return jnp.sum(weight * r**2) / jnp.maximum(jnp.sum(weight), 1.0)


class Supervised(AbstractLoss):
    """Mean squared error of the analysed trajectory against `window.truth`, divided
    by `net.scale ** 2` (twin experiments only)."""

    def __call__(self, net, problem, window, background, **_):
        if window.truth is None:
            raise ValueError("the supervised loss needs 'truth' (a twin experiment)")
        trajectory = net.trajectory(problem, window, background)
        return jnp.mean((trajectory - window.truth) ** 2) / net.scale**2


class Masking(AbstractLoss):
    """The observation-masking loss: the network assimilates the visible part of the
    window and is scored (mean squared whitened misfit) on the hidden part. It never
    reads `truth` (both sets are built without it).

    **Arguments:**

    - `fraction`: the share hidden.
    - `by`: `"points"` (each observed value) or `"sensors"` (a location at every
      time).
    """

    fraction: float = eqx.field(static=True, default=0.2)
    by: Hide = eqx.field(static=True, default="points")

    def __check_init__(self):
        if not 0 < self.fraction < 1:
            raise ValueError(f"masking fraction must be in (0, 1), got {self.fraction}")
        if self.by not in ("points", "sensors"):
            raise ValueError(
                f"masking by must be 'points' or 'sensors', got {self.by!r}"
            )

    def __call__(self, net, problem, window, background, *, key, **_):
        visible, hidden = hide(window, self.fraction, self.by, key=key)
        trajectory = net.trajectory(problem, visible, background)
        weight = hidden.mask.astype(trajectory.dtype)
        return _mean_square(hidden.innovations(trajectory), weight)


class Residual(AbstractLoss):
    """The optimality residual at the network's output: the mean square of the
    B-preconditioned gradient of the window problem's cost (`x_0 - x_b + B grad J_m`
    and, weak constraint, `grad_w J_m`, which holds the `|w|^2 / 2` prior's `w`),
    divided by `net.scale ** 2`. Zero at a
    stationary point of 4D-Var; no truth needed."""

    def __call__(self, net, problem, window, background, **_):
        analysis, _ = net(problem, window, background)
        problem = net.model_problem(problem)
        state = Analysis(analysis.initial_state, None, analysis.w)
        gradient = problem.preconditioned_gradient(state, window)
        d = (analysis.initial_state - background) + gradient.initial_state
        value = jnp.mean(d**2)
        if analysis.w is not None:
            value = value + jnp.mean(gradient.w**2)
        return value / net.scale**2


def _cost_per_observation(net, problem, analysis, window, background, windows):
    """The window problem's cost at `analysis` with the network's correction in the
    model and the parameters' prior shared by `windows` windows, per observation."""
    terms = net.corrected(problem).cost_terms(analysis, window, background)
    value = sum(v for k, v in terms.items() if k != "parameters")
    if "parameters" in terms:
        value = value + terms["parameters"] / windows
    return value / jnp.maximum(jnp.sum(window.mask), 1)


def _hold_model(net: AbstractWindowNet) -> AbstractWindowNet:
    """`net` with its model's learned parts (`theta`, the correction) held."""
    return eqx.tree_at(
        lambda n: (n.theta, n.correction),
        net,
        (held(net.theta), held(net.correction)),
        is_leaf=_is_none,
    )


def refine_analysis(
    net: AbstractWindowNet,
    problem: WindowProblem,
    window: ObservationSet,
    background,
    x,
    *,
    steps: int,
    cg_steps: int = 20,
) -> Array:
    """The window's 4D-Var analysis reached from `x` (e.g. a network's output), the
    network's model held: `steps` Gauss-Newton iterations of incremental 4D-Var
    (`cg_steps` conjugate-gradient iterations each, `Variational(incremental())`)
    on the network's problem, started at `x`. Not differentiated (the gradients of
    `net` and `x` are stopped). For a model linear in the state, one iteration with
    enough CG iterations is the minimum."""
    net = held(net)
    problem = net.model_problem(held(problem))
    w = problem.initial_control(window, background).w  # zero forcings (weak)
    start = problem.control(Analysis(jax.lax.stop_gradient(x), None, w), background)
    # Tolerances below reach: the iterations run to `steps` (or a fixed point).
    solver = Variational(
        incremental(rtol=1e-12, atol=1e-12, inner_steps=cg_steps), max_steps=steps
    )
    analysis, _ = solver(problem, window, background, start=start)
    return jax.lax.stop_gradient(analysis.initial_state)


class Cost(AbstractLoss):
    """The window's 4D-Var cost at the network's output, per observation:
    `(J_b + J_m(x; theta) + J_theta / windows) / n_obs`, with the parameters' prior
    term shared by the `windows` training windows (summed over them, the joint
    4D-Var cost of their analyses and the shared parameters: unsupervised 4DVarNet;
    it reads the observations whole, no truth). `B` enters unscaled, so it is no
    criterion for a learned B scale (it falls as B widens): use `Evidence` for that.

    With `refine = 0` every learned leaf descends the cost at the network's output,
    so the learned `theta` is the joint MAP estimate only where the analyses reach
    the 4D-Var minimum: away from it the parameters absorb the network's error.
    `refine > 0` separates the two: the value is the cost at
    `x* = refine_analysis(x)` (`refine` Gauss-Newton iterations from the network's
    output, `refine_cg` CG iterations each), and the model's learned parts descend
    it there, which is the gradient of `min_x J(x; theta)` (envelope theorem) and
    so the joint 4D-Var gradient; the network descends the cost at its own output
    with the model held, learning to start the refinement closer to the minimum.
    `analysis` (given by `train`, which keeps one per training window and refines
    it a little more at every step: warm starts across steps, amortised bilevel
    optimisation, Arbel & Mairal, ICLR 2022) replaces that refinement.
    """

    refine: int = eqx.field(static=True, default=0)
    refine_cg: int = eqx.field(static=True, default=20)

    def __check_init__(self):
        if self.refine < 0 or self.refine_cg < 1:
            raise ValueError(
                "cost refine must be >= 0 and refine_cg >= 1, got "
                f"{self.refine} and {self.refine_cg}"
            )

    def __call__(
        self, net, problem, window, background, *, windows=1, analysis=None, **_
    ):
        if self.refine == 0:
            estimate, _ = net(problem, window, background)
            return _cost_per_observation(
                net, problem, estimate, window, background, windows
            )
        model_held = _hold_model(net)
        estimate, _ = model_held(problem, window, background)
        if analysis is None:
            analysis = refine_analysis(
                net,
                problem,
                window,
                background,
                estimate.initial_state,
                steps=self.refine,
                cg_steps=self.refine_cg,
            )
        x_star = Analysis(
            jax.lax.stop_gradient(analysis), net.parameters(problem), estimate.w
        )
        own = _cost_per_observation(
            model_held, problem, estimate, window, background, windows
        )
        at_minimum = _cost_per_observation(
            net, problem, x_star, window, background, windows
        )
        return at_minimum + own - jax.lax.stop_gradient(own)


class Evidence(AbstractLoss):
    """The negative log marginal likelihood of the window's observations (Laplace
    approximation at the converged 4D-Var solution, `BilevelVar.negative_log_evidence`)
    per observation: type-II maximum likelihood of the B scale, the physical
    parameters and a model-error correction. No truth needed; the bilevel network's
    inner 4D-Var must be solved to convergence.

    **Arguments:**

    - `probes`: the log-determinant: 0 exact, `n > 0` a stochastic gradient with
      `n` probe vectors (large grids).
    """

    probes: int = eqx.field(static=True, default=0)

    def __check_init__(self):
        if self.probes < 0:
            raise ValueError(f"evidence probes must be >= 0, got {self.probes}")

    def __call__(self, net, problem, window, background, *, key, **_):
        if not isinstance(net, BilevelVar):
            raise ValueError(
                "the evidence loss needs a bilevel network (assim.BilevelVar): it is "
                "the marginal likelihood at a converged 4D-Var solution, got "
                f"{type(net).__name__}"
            )
        # Its own key: the probes independent of a masking loss's draw.
        value = net.negative_log_evidence(
            problem,
            window,
            background,
            probes=self.probes,
            key=jax.random.fold_in(key, 1),
        )
        return value / jnp.maximum(jnp.sum(window.mask), 1)


def denoising_loss(
    net: AbstractWindowNet, fields: Array, noise_std: float, *, key: PRNGKeyArray
) -> Array:
    """Train a plug-and-play prior's denoiser on clean fields `(batch, *grid)`:
    mean squared error of `D(x + noise)` against `x`, divided by `net.scale ** 2`."""
    prior = getattr(net, "prior", None)
    if prior is None or not hasattr(prior, "denoise"):
        raise ValueError("denoising_loss needs a network with a plug-and-play prior")
    noisy = fields + noise_std * jax.random.normal(key, fields.shape, fields.dtype)
    clean = jax.vmap(prior.denoise)(noisy)
    return jnp.mean((clean - fields) ** 2) / net.scale**2


class Term(eqx.Module):
    """A loss and its weight in a `WeightedLoss`."""

    loss: AbstractLoss
    weight: float = eqx.field(static=True, default=1.0)


class WeightedLoss(eqx.Module):
    """A weighted sum of named losses, e.g.
    `WeightedLoss({"masking": Term(Masking(0.2)), "cost": Term(Cost(), 0.1)})`.
    Terms weighted 0 are dropped (not computed); every call returns the total and
    each term.

    **Arguments:**

    - `terms`: `{name: Term(loss, weight)}` (weights non-negative, one positive).
    """

    terms: tuple[tuple[str, Term], ...] = eqx.field(static=True)

    def __init__(self, terms: Mapping[str, Term]):
        terms = dict(terms)
        for name, term in terms.items():
            if not isinstance(term, Term) or not isinstance(term.loss, AbstractLoss):
                raise TypeError(f"loss {name!r} must be a Term of an AbstractLoss")
            if not term.weight >= 0:
                raise ValueError(
                    f"loss weights must be non-negative, got {name}={term.weight}"
                )
        kept = tuple(sorted((n, t) for n, t in terms.items() if t.weight > 0))
        if not kept:
            raise ValueError(
                f"losses: no positive weight, got "
                f"{ {n: t.weight for n, t in terms.items()} }"
            )
        self.terms = kept

    @classmethod
    def of(cls, **weights: float) -> "WeightedLoss":
        """The named losses with their default settings and these weights, e.g.
        `WeightedLoss.of(masking=1.0, residual=0.1)` (names: supervised, masking,
        residual, cost, evidence)."""
        defaults = {
            "supervised": Supervised,
            "masking": Masking,
            "residual": Residual,
            "cost": Cost,
            "evidence": Evidence,
        }
        unknown = set(weights) - set(defaults)
        if unknown:
            raise ValueError(
                f"unknown losses {sorted(unknown)}: expected {sorted(defaults)}"
            )
        return cls({k: Term(defaults[k](), float(w)) for k, w in weights.items()})

    def __call__(
        self, net, problem, window, background, *, key, windows=1, analysis=None
    ) -> tuple[Array, dict[str, Array]]:
        values = {
            name: term.loss(
                net,
                problem,
                window,
                background,
                key=key,
                windows=windows,
                analysis=analysis,
            )
            for name, term in self.terms
        }
        total = sum(term.weight * values[name] for name, term in self.terms)
        return total, values

    def refined_cost(self) -> Cost | None:
        """The refined cost loss among the terms (`Cost(refine > 0)`), if any:
        `train` then keeps a warm-started refined analysis per window."""
        for _, term in self.terms:
            if isinstance(term.loss, Cost) and term.loss.refine > 0:
                return term.loss
        return None


def batch_loss(
    loss: WeightedLoss,
    net: AbstractWindowNet,
    problem: WindowProblem,
    batch: Batch,
    *,
    key: PRNGKeyArray,
    windows: int | None = None,
):
    """`loss` averaged over a batch (vmapped; one key per window). `windows`: the
    size of the set the batch is drawn from (default: the batch)."""
    keys = jax.random.split(key, batch.size)
    windows = batch.size if windows is None else windows
    total, terms = jax.vmap(
        lambda o, b, a, k: loss(net, problem, o, b, key=k, windows=windows, analysis=a)
    )(batch.obs, batch.background, batch.analysis, keys)
    return jnp.mean(total), jax.tree.map(jnp.mean, terms)
