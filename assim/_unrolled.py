"""Unrolled variational assimilation: K iterations of a B-preconditioned gradient
method on the window problem's cost, turned into K trainable layers; and the base of
every trainable analyser."""

import abc

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from simulators import Grid, is_concrete

from ._analyser import AbstractAnalyser, Info, fixed_steps_info
from ._networks import (
    ConvLSTMSolver,
    ConvNet,
    PlugAndPlayPrior,
    ProximalPrior,
    WarmStart,
)
from ._observations import ObservationSet
from ._problem import Analysis, WindowProblem


def _logit(p):
    return float(np.log(p / (1 - p)))


def held(tree):
    """`tree` with its arrays' gradients stopped."""
    arrays, rest = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.lax.stop_gradient(arrays), rest)


class AbstractWindowNet(AbstractAnalyser):
    """A trainable analyser: its learned leaves (`trainable()`) include physical
    parameters `theta` (the controls of the problem's `set_parameters`, shared by
    every window) and a model-error correction placed inside the simulator's step;
    both enter the problem through `model_problem`. The training losses and `train`
    work with any subclass."""

    theta: eqx.AbstractVar[PyTree[Array] | None]
    correction: eqx.AbstractVar[eqx.Module | None]
    scale: eqx.AbstractVar[float]

    @abc.abstractmethod
    def trainable(self) -> PyTree[bool]:
        """A filter spec of the learned leaves."""

    def parameters(self, problem: WindowProblem) -> PyTree[Array] | None:
        """The parameter controls the network's model runs with: its learned
        `theta`, or the problem's prior mean when it learns none."""
        return problem.parameter_background if self.theta is None else self.theta

    def corrected(self, problem: WindowProblem) -> WindowProblem:
        """The problem with the network's correction in the simulator's step."""
        if self.correction is None:
            return problem
        return problem.with_correction(self.correction)

    def model_problem(self, problem: WindowProblem) -> WindowProblem:
        """The problem the network analyses: its correction in the step and its
        parameters fixed in the model (no longer estimated per window)."""
        return self.corrected(problem).with_parameters(self.parameters(problem))

    def trajectory(
        self, problem: WindowProblem, window: ObservationSet, background: Array
    ) -> Array:
        """The analysed trajectory at the window's observation times."""
        analysis, _ = self(problem, window, background)
        return self.model_problem(problem).trajectory(analysis, window.n_times)

    def _learned_spec(self, learned) -> PyTree[bool]:
        spec = jax.tree.map(lambda _: False, self)
        values = jax.tree.map(eqx.is_inexact_array, learned(self))
        return eqx.tree_at(learned, spec, values, is_leaf=lambda x: x is None)


class UnrolledVar(AbstractWindowNet):
    """An unrolled variational assimilation network.

    Each of the `K` layers is one iteration on the window problem's cost with a
    learned weight on its background term,
    `J_k(x_0, w) = lambda_k |x_0 - x_b|^2_{B^-1} / 2 + J_m(x_0, w)`
    (`J_m`: every other term of the problem: observations, the model-error prior
    `|w|^2 / 2`, extra terms; `WindowProblem.state_cost`), preconditioned by `B`
    for the state (no `B^-1` is needed) and by the identity for the whitened
    model-error forcings `w` of a weak-constraint problem:

    `d_k = lambda_k (z_k - x_b) + B grad_{x_0} J_m(z_k)`,
    `z_k = x_k + beta_k (x_k - x_{k-1})` (Nesterov momentum),
    `x_{k+1} = P_k(z_k - alpha_k d_k - u_k)`,

    and `w_{k+1} = z^w_k - alpha_k grad_w J_m` alike, where the gradients
    run through the simulator's adjoint, `alpha_k` are learned step sizes,
    `lambda_k` learned regularisation weights (non-increasing under
    `continuation`), `beta_k` a learned momentum schedule, `u_k` the update of a
    ConvLSTM gradient solver (4DVarNet style) and `P_k` a learned proximal operator
    or plug-and-play denoiser. `x_0` is the background or a warm-start network's
    first guess. Unknown physical parameters (`theta`, the controls of the
    problem's `set_parameters`) and a model-error correction (`correction`) are
    trainable too: they enter every layer's rollout (`model_problem`).

    Hypergradients are by backpropagation through the layers: with `checkpoints`
    set, the layer loop is a binomially checkpointed loop (equinox's checkpointed
    while loop) that stores `checkpoints` iterates and recomputes the rest, so
    training memory grows sub-linearly in `K`; `None` stores every layer.

    **Arguments:**

    - `grid`: the state's grid (the networks' shapes).
    - `n_layers`: `K`.
    - `n_times`: observation times per window (for the warm-start network).
    - `step`: initial step size; `regularisation`: initial `lambda`.
    - `continuation`, `momentum`: the learned schedules to include.
    - `prior`: `None`, a prior module (`ProximalPrior`, `PlugAndPlayPrior`), or
      `"proximal"` / `"pnp"` for one built here (a `ConvNet` of `width`, `depth`,
      `kernel`).
    - `gradient_solver`: a `ConvLSTMSolver`, or `True` for one built here.
    - `warm_start`: a `WarmStart` network, or `True` for one built here.
    - `untied`: a separate prior network per layer (built here from `prior`'s
      name; stacked, layer `k` uses the `k`-th) instead of one shared by all.
    - `theta`: initial learned parameter controls (e.g. `Parameter.zeros()`), or
      `None` to run with the problem's prior mean.
    - `correction`: a learned model-error correction (e.g. `NeuralCorrection`).
    - `scale`: typical amplitude of the state (normalises the networks' inputs).
    - `width`, `depth`, `kernel`, `hidden`: network sizes.
    - `checkpoints`: see above.
    - `key`: initialisation key.
    """

    log_step: Float[Array, " K"]
    regularisation: Float[Array, " K"]
    momentum: Float[Array, " K"] | None
    prior_weight: Float[Array, " K"] | None
    prior: ProximalPrior | PlugAndPlayPrior | None
    gradient_solver: ConvLSTMSolver | None
    warm_start: WarmStart | None
    theta: PyTree[Array] | None
    correction: eqx.Module | None
    continuation: bool = eqx.field(static=True)
    scale: float = eqx.field(static=True)
    checkpoints: int | None = eqx.field(static=True)
    untied: bool = eqx.field(static=True)

    def __init__(
        self,
        grid: Grid,
        n_layers: int,
        *,
        n_times: int = 1,
        step: float = 0.5,
        regularisation: float = 1.0,
        continuation: bool = False,
        momentum: bool = False,
        prior: "str | ProximalPrior | PlugAndPlayPrior | None" = None,
        gradient_solver: "bool | ConvLSTMSolver" = False,
        warm_start: "bool | WarmStart" = False,
        untied: bool = False,
        theta: PyTree[Array] | None = None,
        correction: eqx.Module | None = None,
        scale: float = 1.0,
        width: int = 16,
        depth: int = 3,
        kernel: int = 3,
        hidden: int = 8,
        checkpoints: int | None = None,
        key: PRNGKeyArray,
    ):
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if step <= 0 or regularisation <= 0:
            raise ValueError("step and regularisation must be positive")
        modules = (ProximalPrior, PlugAndPlayPrior)
        if prior not in (None, "proximal", "pnp") and not isinstance(prior, modules):
            raise ValueError(
                "prior must be None, 'proximal', 'pnp' or a ProximalPrior / "
                f"PlugAndPlayPrior, got {prior!r}"
            )
        if untied and prior not in ("proximal", "pnp"):
            raise ValueError(
                "untied layers build their priors: prior must be 'proximal' or 'pnp'"
            )
        if checkpoints is not None and checkpoints < 1:
            raise ValueError(f"checkpoints must be None or >= 1, got {checkpoints}")
        # Training differentiates the adjoint in each layer (reverse over reverse),
        # which every scheme supports, Newton-Krylov stages included.
        dtype = jnp.zeros(()).dtype
        k_prior, k_solver, k_warm = jax.random.split(key, 3)
        K = n_layers
        self.log_step = jnp.full((K,), np.log(step), dtype)
        if continuation:
            # lambda_k = lambda_0 prod_{j <= k} sigmoid(a_j): non-increasing; the first
            # factor is the scale (its logit starts large: sigmoid ~ 1).
            self.regularisation = jnp.asarray(
                [np.log(regularisation)] + [_logit(0.9)] * (K - 1), dtype
            )
        else:
            self.regularisation = jnp.full((K,), np.log(regularisation), dtype)
        # Nesterov's schedule (k - 1) / (k + 2) as the starting point.
        self.momentum = (
            jnp.asarray([_logit(max(k - 1, 0.05) / (k + 2)) for k in range(K)], dtype)
            if momentum
            else None
        )
        net = lambda cin, k: ConvNet(grid, cin, 1, width, depth, kernel, key=k)  # noqa: E731
        kind = (
            {"proximal": ProximalPrior, "pnp": PlugAndPlayPrior}.get(prior)
            if isinstance(prior, str)
            else None
        )
        if kind is not None and untied:  # K networks, stacked leaf by leaf
            prior = eqx.filter_vmap(lambda k: kind(net(1, k), scale))(
                jax.random.split(k_prior, K)
            )
        elif kind is not None:
            prior = kind(net(1, k_prior), scale)
        self.prior = prior
        if isinstance(prior, ProximalPrior):
            self.prior_weight = jnp.ones((K,), dtype)
        elif isinstance(prior, PlugAndPlayPrior):
            self.prior_weight = jnp.full((K,), _logit(0.5), dtype)
        else:
            self.prior_weight = None
        if gradient_solver is True:
            gradient_solver = ConvLSTMSolver(grid, hidden, kernel, key=k_solver)
        self.gradient_solver = gradient_solver or None
        if warm_start is True:
            warm_start = WarmStart(net(1 + 2 * n_times, k_warm), n_times, scale)
        self.warm_start = warm_start or None
        self.theta = theta
        self.correction = correction
        self.continuation = bool(continuation)
        self.scale = float(scale)
        self.checkpoints = checkpoints
        self.untied = bool(untied)

    @property
    def n_layers(self) -> int:
        return self.log_step.shape[0]

    def regularisation_weights(self) -> Float[Array, " K"]:
        """`lambda_1, ..., lambda_K` (non-increasing under `continuation`)."""
        if self.continuation:
            factors = jax.nn.sigmoid(self.regularisation[1:])
            return jnp.exp(self.regularisation[0]) * jnp.concatenate(
                [jnp.ones(1, factors.dtype), jnp.cumprod(factors)]
            )
        return jnp.exp(self.regularisation)

    def trainable(self) -> PyTree[bool]:
        """A filter spec: the learned leaves (steps, weights, networks, parameters,
        the model-error correction)."""
        learned = lambda m: (  # noqa: E731
            m.log_step,
            m.regularisation,
            m.momentum,
            m.prior_weight,
            m.prior,
            m.gradient_solver,
            m.warm_start,
            m.theta,
            m.correction,
        )
        return self._learned_spec(learned)

    def layer_cost(
        self,
        problem: WindowProblem,
        k: int,
        analysis: Analysis,
        window: ObservationSet,
        background: Array,
    ) -> Float[Array, ""]:
        """`J_k`, the cost layer `k` descends: the problem's cost with the
        background term weighted by `lambda_k` (`lambda_k = 1`: the problem's)."""
        problem = self.model_problem(problem)
        v = problem.background_covariance.whiten(analysis.initial_state - background)
        lam = self.regularisation_weights()[k]
        return lam * 0.5 * jnp.sum(v**2) + problem.state_cost(analysis, window)

    def curvature(
        self,
        problem: WindowProblem,
        window: ObservationSet,
        background: Array,
        iterations: int = 20,
    ):
        """The largest eigenvalue of the problem's Gauss-Newton Hessian at the
        background (power iteration, matrix-free) less its identity part, i.e. of
        the B-preconditioned observation (and model-error) term, plus the
        regularisation `lambda_1`: a gradient step below `1 / curvature` is stable on
        the window's quadratic model, which is how `with_stable_steps` sets the
        initial steps."""
        problem = self.model_problem(problem)
        start = problem.initial_control(window, background)
        hessian = problem.gauss_newton(start, window, background)
        leaves = jax.tree.leaves(hessian.in_structure())
        size = sum(leaf.size for leaf in leaves)
        v = jax.tree.map(
            lambda s: jnp.ones(s.shape, s.dtype) / np.sqrt(size),
            hessian.in_structure(),
        )

        def norm(tree):
            return jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(tree)))

        def body(_, carry):
            v, _ = carry
            w = hessian.mv(v)
            n = norm(w)
            return jax.tree.map(lambda a: a / jnp.where(n > 0, n, 1.0), w), n

        zero = jnp.zeros((), background.dtype)
        _, top = jax.lax.fori_loop(0, iterations, body, (v, zero))
        return top - 1.0 + self.regularisation_weights()[0]

    def with_stable_steps(self, problem, window, background, fraction: float = 1.0):
        """The network with every step size set to `fraction / curvature` on one
        window (a stable start for training; the steps are learned afterwards).
        A curvature that overflows (the window's linearisation too large for the
        precision, e.g. a long chaotic window in float32) is an error, not a zero
        step."""
        # Without raising checks inside (checked below): a program holding one
        # stays out of JAX's persistent compilation cache.
        problem = problem.without_raising()
        step = fraction / self.curvature(problem, window, background)
        message = (
            "with_stable_steps: the curvature of the window's Gauss-Newton Hessian "
            "is not finite and positive (the linearisation overflows in this "
            "precision: float64, a shorter window or a larger observation error)"
        )
        if is_concrete(step):  # on the host: no program holding a callback
            if not (np.isfinite(step) and step > 0):
                raise ValueError(message)
        else:
            step = eqx.error_if(step, ~(jnp.isfinite(step) & (step > 0)), message)
        return eqx.tree_at(
            lambda m: m.log_step, self, jnp.full_like(self.log_step, jnp.log(step))
        )

    def first_guess(self, window: ObservationSet, background: Array) -> Array:
        if self.warm_start is None:
            return background
        _, transpose = jax.vjp(
            window.operator,
            jnp.zeros((window.n_times, *background.shape), background.dtype),
        )
        weights = jnp.where(window.mask, 1.0, 0.0).astype(background.dtype)
        (observed,) = transpose(weights * window.values)
        (mask,) = transpose(weights)
        return self.warm_start(background, observed, mask)

    def _layer(self, k, carry, problem, window, background):
        (x, w), (x_prev, w_prev), memory = carry
        z, zw = x, w
        if self.momentum is not None:
            beta = jax.nn.sigmoid(self.momentum[k])
            z = x + beta * (x - x_prev)
            if w is not None:
                zw = w + beta * (w - w_prev)
        gradient = problem.preconditioned_gradient(Analysis(z, None, zw), window)
        d = self.regularisation_weights()[k] * (z - background)
        d = d + gradient.initial_state
        alpha = jnp.exp(self.log_step[k])
        new = z - alpha * d
        new_w = None if w is None else zw - alpha * gradient.w
        if self.gradient_solver is not None:
            norm = jnp.sqrt(jnp.mean(d**2)) + jnp.finfo(d.dtype).tiny ** 0.25
            update, memory = self.gradient_solver(d / norm, z / self.scale, memory)
            new = new - self.scale * update
        if self.prior is not None:
            prior = self.prior
            if self.untied:
                arrays, static = eqx.partition(prior, eqx.is_array)
                prior = eqx.combine(jax.tree.map(lambda a: a[k], arrays), static)
            new = prior(new, self.prior_weight[k])
        return (new, new_w), (x, w), memory

    def __call__(
        self,
        problem: WindowProblem,
        window: ObservationSet,
        background: Float[Array, "..."],
    ) -> tuple[Analysis, Info]:
        """The window's analysis after the `K` layers."""
        theta = self.parameters(problem)
        problem = self.model_problem(problem)
        x = self.first_guess(window, background)
        w = problem.initial_control(window, background).w
        memory = (
            self.gradient_solver.init_state(x)
            if self.gradient_solver is not None
            else None
        )
        layer = lambda k, c: self._layer(k, c, problem, window, background)  # noqa: E731
        carry = ((x, w), (x, w), memory)
        if self.checkpoints is None:
            carry, _ = jax.lax.scan(
                lambda c, k: (layer(k, c), None), carry, jnp.arange(self.n_layers)
            )
        else:
            _, carry = eqxi.while_loop(
                lambda kc: kc[0] < self.n_layers,
                lambda kc: (kc[0] + 1, layer(kc[0], kc[1])),
                (jnp.asarray(0), carry),
                max_steps=self.n_layers,
                kind="checkpointed",
                checkpoints=self.checkpoints,
            )
        x, w = carry[0]
        return Analysis(x, theta, w), fixed_steps_info(self.n_layers)
