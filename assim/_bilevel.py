"""Bilevel learning: 4D-Var solved to convergence inside a learning problem, its
hyperparameters (background-error scale, physical coefficients, a model-error
correction) learned through the implicit function theorem at the inner solution."""

import dataclasses
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from simulators import Simulator

from ._covariance import AbstractCovariance
from ._observations import ObservationSet
from ._unrolled import AbstractWindowNet, _check_learnable, _held

_HESSIAN_TAGS = frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})


def _inner_cost(v, args):
    net, obs, background = args
    return net.cost(v, obs, background)


@eqx.filter_custom_vjp
def _implicit_minimum(args, v, linear_solver):
    """The identity on a converged minimiser `v*` of `_inner_cost(., args)`, whose
    reverse-mode rule is the implicit function theorem with the Hessian applied by
    reverse over reverse: `lambda = H^{-1} ct` (CG, `H w` as the vector-Jacobian
    product of `grad_v J` at `v*`, `H` symmetric), then
    `args_bar = -(d grad_v J / d args)^T lambda`."""
    del args, linear_solver
    return v


@_implicit_minimum.def_fwd
def _implicit_minimum_fwd(perturbed, args, v, linear_solver):
    del perturbed, args, linear_solver
    return v, None


@_implicit_minimum.def_bwd
def _implicit_minimum_bwd(residuals, ct, perturbed, args, v, linear_solver):
    del residuals
    dyn, static = eqx.partition(args, perturbed)
    if ct is None:
        return jtu.tree_map(lambda _: None, args)

    def gradient(u, d):
        return jax.grad(_inner_cost)(u, eqx.combine(d, static))

    _, hessian_vjp = jax.vjp(lambda u: gradient(u, dyn), v)
    hessian = lx.FunctionLinearOperator(
        lambda w: hessian_vjp(w)[0], jax.eval_shape(lambda: v), tags=_HESSIAN_TAGS
    )
    lam = lx.linear_solve(hessian, ct, linear_solver).value
    _, args_vjp = jax.vjp(lambda d: gradient(v, d), dyn)
    return args_vjp(-lam)[0]


class BilevelVar(AbstractWindowNet):
    """Strong-constraint 4D-Var run to convergence as a differentiable layer.

    The inner problem, in the control-variable form,

    `v* = argmin_v |v|^2 / 2 + J_o(x_b + s B^{1/2} v; theta)`,

    is solved by optimistix (L-BFGS by default) and the analysis is
    `x_0* = x_b + s B^{1/2} v*`. Its derivative with respect to the hyperparameters
    `h = (log s, theta, correction)` is not obtained by differentiating the solver's
    iterations: at the minimum `grad_v J(v*, h) = 0`, so by the implicit function
    theorem `dv*/dh = -(grad_vv J)^{-1} grad_vh J`. That system is solved with
    lineax conjugate gradients on the Hessian, applied matrix-free as Hessian-vector
    products through the simulator's adjoint; the Hessian is symmetric positive
    definite at a minimum (the `|v|^2 / 2` term), which is what CG needs and what
    makes the operator its own transpose in the backward pass. Memory does not grow
    with the number of inner iterations. See
    e.g. Kunisch & Pock, SIAM J. Imaging Sci. 6 (2013) for bilevel learning of
    variational regularisers.

    The inner solution must be converged for the hypergradient to be right: a solve
    that stops at `max_steps` raises (inside `jit`, through optimistix's error
    handling), and `train` turns that into `TrainingStopped`.

    **Arguments:**

    - `simulator`, `background_covariance`: the model and `B`.
    - `observation_interval`: model steps between observation times.
    - `background_scale`: initial `s` (learned as `log s`; `s^2 B` is the background
      error covariance, i.e. `1 / s^2` is the regularisation weight).
    - `theta`, `set_parameters`: learned physical parameters and how they enter the
      simulator.
    - `scale`: typical amplitude of the state (normalises the losses).
    - `rtol`, `atol`, `max_steps`: the inner minimisation's tolerances and cap.
    - `cg_rtol`, `cg_max_steps`: the hypergradient's CG solve.
    - `hypergradient`: `"implicit"` (the above) or `"unrolled"`: backpropagation
      through the inner solver's iterations (optimistix's recursively checkpointed
      adjoint), for comparison; it needs the same converged solve and stores
      iterates.
    - `hessian`: how the Hessian-vector products are formed. `"forward"`: forward
      over reverse, inside `optx.ImplicitAdjoint` (the cheaper one); `"reverse"`:
      reverse over reverse, in this module's own implicit-function-theorem rule
      (one linearisation of `grad_v J` at `v*`, reused by every CG iteration). The
      default, `None`, picks `"reverse"` for fully implicit (Newton-Krylov) schemes,
      whose stage solves JAX cannot differentiate forward over reverse, and
      `"forward"` otherwise.
    - `throw`: `False` returns the iterate reached at `max_steps` instead of raising
      (4D-Var truncated after `max_steps` iterations; its hypergradient is then
      not the exact one).
    """

    simulator: Simulator
    background_covariance: AbstractCovariance
    log_scale: Float[Array, ""]
    theta: PyTree[Array] | None
    set_parameters: Callable | None
    solver: optx.AbstractMinimiser
    hypergradient_solver: lx.AbstractLinearSolver
    observation_interval: int = eqx.field(static=True)
    scale: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    hypergradient: str = eqx.field(static=True)
    hessian: str = eqx.field(static=True)
    throw: bool = eqx.field(static=True)

    def __init__(
        self,
        simulator: Simulator,
        background_covariance: AbstractCovariance,
        *,
        observation_interval: int = 1,
        background_scale: float = 1.0,
        theta: PyTree[Array] | None = None,
        set_parameters: Callable | None = None,
        scale: float = 1.0,
        rtol: float = 1e-6,
        atol: float = 1e-6,
        max_steps: int = 500,
        cg_rtol: float = 1e-6,
        cg_max_steps: int = 200,
        hypergradient: Literal["implicit", "unrolled"] = "implicit",
        hessian: Literal["forward", "reverse"] | None = None,
        throw: bool = True,
    ):
        if background_scale <= 0:
            raise ValueError(
                f"background_scale must be positive, got {background_scale}"
            )
        if hypergradient not in ("implicit", "unrolled"):
            raise ValueError(
                f"hypergradient must be 'implicit' or 'unrolled', got {hypergradient!r}"
            )
        _check_learnable(theta, set_parameters)
        newton_krylov = simulator.newton_krylov is not None
        if hessian is None:
            hessian = "reverse" if newton_krylov else "forward"
        if hessian not in ("forward", "reverse"):
            raise ValueError(f"hessian must be 'forward' or 'reverse', got {hessian!r}")
        if hessian == "forward" and newton_krylov:
            raise ValueError(
                "hessian='forward' (forward over reverse) cannot differentiate the "
                "Newton-Krylov stage solves of a fully implicit scheme: use "
                "hessian='reverse'"
            )
        dtype = jnp.zeros(()).dtype
        self.simulator = simulator
        self.background_covariance = background_covariance
        self.log_scale = jnp.asarray(jnp.log(background_scale), dtype)
        self.theta = theta
        self.set_parameters = set_parameters
        self.solver = optx.LBFGS(rtol=rtol, atol=atol)
        self.hypergradient_solver = lx.CG(
            rtol=cg_rtol, atol=cg_rtol, max_steps=cg_max_steps
        )
        self.observation_interval = int(observation_interval)
        self.scale = float(scale)
        self.max_steps = int(max_steps)
        self.hypergradient = hypergradient
        self.hessian = hessian
        self.throw = bool(throw)

    def trainable(self) -> PyTree[bool]:
        """The learned leaves: `log s`, `theta` and the simulator's correction."""
        return self._learned_spec(
            lambda m: (m.log_scale, m.theta, m.simulator.correction)
        )

    def initial_state(self, v, background):
        """`x_0 = x_b + s B^{1/2} v`."""
        return background + jnp.exp(self.log_scale) * self.background_covariance.sqrt(v)

    def cost(self, v, obs: ObservationSet, background) -> Float[Array, ""]:
        """The inner cost `|v|^2 / 2 + J_o(x_b + s B^{1/2} v)`; `inf` where the
        rollout blows up or an implicit stage solve fails, so that the line search
        backs off from a trial step the model cannot integrate instead of stopping
        the run."""
        x0 = self.initial_state(v, background)
        simulator = dataclasses.replace(self.model(), check_finite=False)
        states = self.trajectory(x0, obs.n_times, simulator)
        finite = jnp.all(jnp.isfinite(states))
        # A non-finite rollout is replaced before the cost, so that the gradient at
        # that trial point (which the line search computes, then discards) is finite:
        # NaN cotangents would reach the implicit stages' adjoint solves.
        r = obs.innovations(jnp.where(finite, states, 0.0))
        value = 0.5 * jnp.sum(v**2) + 0.5 * jnp.sum(r**2)
        return jnp.where(finite & jnp.isfinite(value), value, jnp.inf)

    def solve(
        self, obs: ObservationSet, background, *, throw: bool | None = None
    ) -> optx.Solution:
        """The inner minimisation from `v = 0`, with the implicit adjoint (or the
        unrolled one). `throw` overrides the network's: `False` returns the
        iterate at `max_steps` with its result code instead of raising."""
        args = (self, obs, background)
        own_rule = self.hypergradient == "implicit" and self.hessian == "reverse"
        if self.hypergradient == "unrolled":
            adjoint = optx.RecursiveCheckpointAdjoint()
        else:
            adjoint = optx.ImplicitAdjoint(linear_solver=self.hypergradient_solver)
        solution = optx.minimise(
            _inner_cost,
            self.solver,
            jnp.zeros_like(background),
            _held(args) if own_rule else args,
            max_steps=self.max_steps,
            adjoint=adjoint,
            throw=self.throw if throw is None else throw,
            tags=_HESSIAN_TAGS,
        )
        if not own_rule:
            return solution
        v = _implicit_minimum(args, solution.value, self.hypergradient_solver)
        return eqx.tree_at(lambda s: s.value, solution, v)

    def __call__(self, obs: ObservationSet, background: Array) -> Array:
        return self.initial_state(self.solve(obs, background).value, background)

    def gauss_newton(
        self, v, obs: ObservationSet, background
    ) -> lx.AbstractLinearOperator:
        """The Gauss-Newton Hessian of the inner cost at `v`, `I + G^T G` with `G`
        the Jacobian of the whitened innovations, as a matrix-free symmetric positive
        definite lineax operator (a tangent-linear rollout and an adjoint one per
        product)."""

        def residual(u):
            x0 = self.initial_state(u, background)
            return obs.innovations(self.trajectory(x0, obs.n_times))

        _, tangent = jax.linearize(residual, v)
        adjoint = jax.linear_transpose(tangent, v)
        return lx.FunctionLinearOperator(
            lambda w: w + adjoint(tangent(w))[0],
            jax.eval_shape(lambda: v),
            tags=_HESSIAN_TAGS,
        )

    def negative_log_evidence(
        self,
        obs: ObservationSet,
        background,
        *,
        probes: int = 0,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, ""]:
        """`-log p(y | h)` up to a constant, by the Laplace approximation at the
        inner solution with the Gauss-Newton Hessian:
        `J(v*) + log det(I + G^T G) / 2`.

        Minimising it over the hyperparameters `h` (B scale, `theta`, the correction)
        is type-II maximum likelihood: the observations' marginal likelihood, with
        the window's state integrated out. Minimising the cost `J(v*)` alone instead
        (joint MAP of state and parameters) biases the parameters, because the
        number of states grows with the number of windows (Neyman-Scott), and it
        sends the B scale to infinity; the log-determinant corrects both.

        `probes = 0` computes the log-determinant exactly from the dense Hessian
        (one matrix-free product per state variable: small states). `probes > 0`
        keeps it matrix-free for large grids: the gradient of `log det H / 2` is
        `tr(H^-1 dH) / 2`, estimated with `probes` Rademacher vectors `z` as
        `(H^-1 z)^T dH z / 2` (CG solves, `H^-1 z` held constant); that term then
        contributes to the gradient only, and the value returned is `J(v*)`.
        """
        v = self.solve(obs, background).value
        cost = self.cost(v, obs, background)
        H = self.gauss_newton(v, obs, background)
        if probes == 0:
            return cost + 0.5 * jnp.linalg.slogdet(H.as_matrix())[1]
        if key is None:
            raise ValueError("a stochastic log-determinant (probes > 0) needs a key")
        z = jax.random.rademacher(key, (probes, *v.shape), v.dtype)
        solve = lambda b: (
            lx.linear_solve(  # noqa: E731
                H, b, self.hypergradient_solver
            ).value
        )
        w = jax.lax.stop_gradient(jax.vmap(solve)(z))
        surrogate = 0.5 * jnp.mean(jax.vmap(lambda a, b: jnp.vdot(a, H.mv(b)))(w, z))
        return cost + surrogate - jax.lax.stop_gradient(surrogate)
