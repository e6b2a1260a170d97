"""Unrolled variational assimilation: K iterations of a B-preconditioned gradient
method on the window's 4D-Var cost, turned into K trainable layers."""

import abc
from collections.abc import Callable

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from simulators import Simulator

from ._covariance import AbstractCovariance
from ._networks import (
    ConvLSTMSolver,
    ConvNet,
    PlugAndPlayPrior,
    ProximalPrior,
    WarmStart,
)
from ._observations import ObservationSet


def _logit(p):
    return float(np.log(p / (1 - p)))


def _held(tree):
    """`tree` with its arrays' gradients stopped."""
    arrays, rest = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.lax.stop_gradient(arrays), rest)


def _check_learnable(theta, set_parameters):
    """Learned parameters come with the map that places them."""
    if (theta is None) != (set_parameters is None):
        raise ValueError("theta and set_parameters go together")


class AbstractWindowNet(eqx.Module):
    """A trainable map from a window's observations and background to its analysed
    initial state, through a simulator whose physical parameters (`theta`, placed by
    `set_parameters`) and model-error correction may be learned. The training losses
    and `train` work with any subclass."""

    simulator: eqx.AbstractVar[Simulator]
    background_covariance: eqx.AbstractVar[AbstractCovariance]
    theta: eqx.AbstractVar[PyTree[Array] | None]
    set_parameters: eqx.AbstractVar[Callable | None]
    observation_interval: eqx.AbstractVar[int]
    scale: eqx.AbstractVar[float]

    @abc.abstractmethod
    def __call__(self, obs: ObservationSet, background: Array) -> Array:
        """The analysed initial state of the window (`background`'s shape)."""

    @abc.abstractmethod
    def trainable(self) -> PyTree[bool]:
        """A filter spec of the learned leaves."""

    def model(self) -> Simulator:
        """The simulator with the learned parameters in place."""
        if self.set_parameters is None:
            return self.simulator
        return self.set_parameters(self.simulator, self.theta)

    def trajectory(self, x0: Array, n_times: int, simulator=None) -> Array:
        """The model states at the `n_times` observation times from `x0`."""
        simulator = self.model() if simulator is None else simulator
        k = self.observation_interval
        return simulator.rollout(x0, (n_times - 1) * k, every=k)

    def observation_cost(self, x0, obs: ObservationSet, simulator=None):
        """`J_o(x0) = |(H M(x0) - y) / sigma|^2 / 2` over the reporting sensors."""
        r = obs.innovations(self.trajectory(x0, obs.n_times, simulator))
        return 0.5 * jnp.sum(r**2)

    def observation_gradient(self, x0, obs: ObservationSet, simulator=None):
        """`B grad J_o(x0)`: the B-preconditioned gradient of the observation term."""
        g = jax.grad(self.observation_cost)(x0, obs, simulator)
        B = self.background_covariance
        return B.sqrt(B.sqrt_transpose(g))

    def analysis(self, obs: ObservationSet, background: Array) -> Array:
        """The analysed trajectory at the window's observation times."""
        return self.trajectory(self(obs, background), obs.n_times)

    def _learned_spec(self, learned: Callable) -> PyTree[bool]:
        spec = jax.tree.map(lambda _: False, self)
        values = jax.tree.map(eqx.is_inexact_array, learned(self))
        return eqx.tree_at(learned, spec, values, is_leaf=lambda x: x is None)


class UnrolledVar(AbstractWindowNet):
    """An unrolled variational assimilation network.

    Each of the `K` layers is one iteration on the window cost
    `J_k(x) = lambda_k |x - x_b|^2_{B^-1} / 2 + |(H M(x) - y) / sigma|^2 / 2`,
    preconditioned by `B` (no `B^-1` is needed):

    `d_k = lambda_k (z_k - x_b) + B grad J_o(z_k)`,
    `z_k = x_k + beta_k (x_k - x_{k-1})` (Nesterov momentum),
    `x_{k+1} = P_k(z_k - alpha_k d_k - u_k)`,

    where the data-consistency gradient `grad J_o` runs through the simulator's
    adjoint, `alpha_k` are learned step sizes, `lambda_k` learned regularisation
    weights (non-increasing under `continuation`), `beta_k` a learned momentum
    schedule, `u_k` the update of a ConvLSTM gradient solver (4DVarNet style) and
    `P_k` a learned proximal operator or plug-and-play denoiser. `x_0` is the
    background or a warm-start network's first guess. Unknown physical parameters
    (`theta`, placed by `set_parameters`) and a model-error correction
    (`simulator.correction`) are trainable too: they enter every layer's rollout.

    Hypergradients are by backpropagation through the layers: with `checkpoints`
    set, the layer loop is a binomially checkpointed loop (equinox's checkpointed
    while loop) that stores `checkpoints` iterates and recomputes the rest, so
    training memory grows sub-linearly in `K`; `None` stores every layer.

    **Arguments:**

    - `simulator`: the model (its `correction`, if any, is trained).
    - `background_covariance`: `B`.
    - `n_layers`: `K`.
    - `observation_interval`: model steps between observation times.
    - `n_times`: observation times per window (for the warm-start network).
    - `step`: initial step size; `regularisation`: initial `lambda`.
    - `continuation`, `momentum`, `prior` (`None | "proximal" | "pnp"`),
      `gradient_solver`, `warm_start`: the learned parts to include.
    - `theta`, `set_parameters`: learned physical parameters and how they enter the
      simulator (`set_parameters(simulator, theta) -> simulator`).
    - `scale`: typical amplitude of the state (normalises the networks' inputs).
    - `width`, `depth`, `kernel`, `hidden`: network sizes.
    - `checkpoints`: see above.
    - `key`: initialisation key.
    """

    simulator: Simulator
    background_covariance: AbstractCovariance
    log_step: Float[Array, " K"]
    regularisation: Float[Array, " K"]
    momentum: Float[Array, " K"] | None
    prior_weight: Float[Array, " K"] | None
    prior: ProximalPrior | PlugAndPlayPrior | None
    gradient_solver: ConvLSTMSolver | None
    warm_start: WarmStart | None
    theta: PyTree[Array] | None
    set_parameters: Callable | None
    observation_interval: int = eqx.field(static=True)
    continuation: bool = eqx.field(static=True)
    scale: float = eqx.field(static=True)
    checkpoints: int | None = eqx.field(static=True)

    def __init__(
        self,
        simulator: Simulator,
        background_covariance: AbstractCovariance,
        n_layers: int,
        *,
        observation_interval: int = 1,
        n_times: int = 1,
        step: float = 0.5,
        regularisation: float = 1.0,
        continuation: bool = False,
        momentum: bool = False,
        prior: str | None = None,
        gradient_solver: bool = False,
        warm_start: bool = False,
        theta: PyTree[Array] | None = None,
        set_parameters: Callable | None = None,
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
        if prior not in (None, "proximal", "pnp"):
            raise ValueError(f"prior must be None, 'proximal' or 'pnp', got {prior!r}")
        if checkpoints is not None and checkpoints < 1:
            raise ValueError(f"checkpoints must be None or >= 1, got {checkpoints}")
        # Training differentiates the adjoint in each layer (reverse over reverse),
        # which every scheme supports, Newton-Krylov stages included.
        _check_learnable(theta, set_parameters)
        grid = simulator.model.grid
        dtype = jnp.zeros(()).dtype
        k_prior, k_solver, k_warm = jax.random.split(key, 3)
        K = n_layers
        self.simulator = simulator
        self.background_covariance = background_covariance
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
        if prior == "proximal":
            self.prior = ProximalPrior(net(1, k_prior), scale)
            self.prior_weight = jnp.ones((K,), dtype)
        elif prior == "pnp":
            self.prior = PlugAndPlayPrior(net(1, k_prior), scale)
            self.prior_weight = jnp.full((K,), _logit(0.5), dtype)
        else:
            self.prior, self.prior_weight = None, None
        self.gradient_solver = (
            ConvLSTMSolver(grid, hidden, kernel, key=k_solver)
            if gradient_solver
            else None
        )
        self.warm_start = (
            WarmStart(net(1 + 2 * n_times, k_warm), n_times, scale)
            if warm_start
            else None
        )
        self.theta = theta
        self.set_parameters = set_parameters
        self.observation_interval = int(observation_interval)
        self.continuation = bool(continuation)
        self.scale = float(scale)
        self.checkpoints = checkpoints

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
        the model-error correction); the simulator's other fields and `B` stay
        fixed."""
        learned = lambda m: (  # noqa: E731
            m.log_step,
            m.regularisation,
            m.momentum,
            m.prior_weight,
            m.prior,
            m.gradient_solver,
            m.warm_start,
            m.theta,
            m.simulator.correction,
        )
        return self._learned_spec(learned)

    def curvature(self, obs: ObservationSet, background: Array, iterations: int = 20):
        """The largest eigenvalue of the B-preconditioned Gauss-Newton Hessian of the
        observation term at `background` (power iteration on
        `v -> B H'^T R^-1 H' v`, matrix-free), plus the regularisation `lambda_1`:
        a gradient step below `1 / curvature` is stable on the window's quadratic
        model, which is how `with_stable_steps` sets the initial steps."""
        simulator = self.model()

        def residual(x):
            return obs.innovations(self.trajectory(x, obs.n_times, simulator))

        _, linear = jax.linearize(residual, background)
        transpose = jax.linear_transpose(linear, background)
        B = self.background_covariance

        def apply(v):
            (g,) = transpose(linear(v))
            return B.sqrt(B.sqrt_transpose(g))

        v = jnp.ones_like(background) / np.sqrt(background.size)

        def body(_, carry):
            v, _ = carry
            w = apply(v)
            norm = jnp.linalg.norm(w)
            return w / jnp.where(norm > 0, norm, 1.0), norm

        _, top = jax.lax.fori_loop(0, iterations, body, (v, jnp.zeros((), v.dtype)))
        return top + self.regularisation_weights()[0]

    def with_stable_steps(self, obs, background, fraction: float = 1.0):
        """The network with every step size set to `fraction / curvature` on one
        window (a stable start for training; the steps are learned afterwards)."""
        step = fraction / self.curvature(obs, background)
        return eqx.tree_at(
            lambda m: m.log_step, self, jnp.full_like(self.log_step, jnp.log(step))
        )

    def first_guess(self, obs: ObservationSet, background: Array) -> Array:
        if self.warm_start is None:
            return background
        _, transpose = jax.vjp(
            obs.operator, jnp.zeros((obs.n_times, *background.shape), background.dtype)
        )
        weights = jnp.where(obs.mask, 1.0, 0.0).astype(background.dtype)
        (observed,) = transpose(weights * obs.values)
        (mask,) = transpose(weights)
        return self.warm_start(background, observed, mask)

    def _layer(self, k, carry, obs, background, simulator):
        x, previous, memory = carry
        z = x
        if self.momentum is not None:
            z = x + jax.nn.sigmoid(self.momentum[k]) * (x - previous)
        d = self.regularisation_weights()[k] * (z - background)
        d = d + self.observation_gradient(z, obs, simulator)
        new = z - jnp.exp(self.log_step[k]) * d
        if self.gradient_solver is not None:
            norm = jnp.sqrt(jnp.mean(d**2)) + jnp.finfo(d.dtype).tiny ** 0.25
            update, memory = self.gradient_solver(d / norm, z / self.scale, memory)
            new = new - self.scale * update
        if self.prior is not None:
            new = self.prior(new, self.prior_weight[k])
        return new, x, memory

    def __call__(self, obs: ObservationSet, background: Float[Array, "..."]) -> Array:
        """The analysed initial state of the window (`background`'s shape)."""
        simulator = self.model()
        x = self.first_guess(obs, background)
        memory = (
            self.gradient_solver.init_state(x)
            if self.gradient_solver is not None
            else None
        )
        layer = lambda k, c: self._layer(k, c, obs, background, simulator)  # noqa: E731
        carry = (x, x, memory)
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
        return carry[0]
