"""Bilevel learning: 4D-Var solved to convergence inside a learning problem, its
hyperparameters (background-error scale, physical coefficients, a model-error
correction) learned through the implicit function theorem at the inner solution."""

import copy

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._analyser import CONVERGED, FAILED, MAX_STEPS, Info
from ._covariance import ScaledCovariance
from ._observations import ObservationSet
from ._problem import SPD_TAGS, Analysis, WindowProblem
from ._unrolled import AbstractWindowNet, held


def _inner_cost(c, args):
    net, problem, window, background = args
    return net.inner_problem(problem).cost(c, window, background)


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
        lambda w: hessian_vjp(w)[0], jax.eval_shape(lambda: v), tags=SPD_TAGS
    )
    ct = jax.tree.map(
        lambda c, x: c if c is not None or x is None else jnp.zeros_like(x),
        ct,
        v,
        is_leaf=lambda x: x is None,
    )
    if args[1].blow_up == "raise":  # the problem's: raise inside the program
        lam = lx.linear_solve(hessian, ct, linear_solver).value
    else:  # NaN, for a caller that checks on the host (no host callback)
        solution = lx.linear_solve(hessian, ct, linear_solver, throw=False)
        failed = solution.result != lx.RESULTS.successful
        lam = jax.tree.map(lambda a: jnp.where(failed, jnp.nan, a), solution.value)
    _, args_vjp = jax.vjp(lambda d: gradient(v, d), dyn)
    return args_vjp(jax.tree.map(jnp.negative, lam))[0]


def _default_cg() -> lx.CG:
    return lx.CG(rtol=1e-6, atol=1e-6, max_steps=200)


class ReverseImplicitAdjoint(eqx.Module):
    """The implicit function theorem at the inner minimum with Hessian-vector
    products reverse over reverse (`BilevelVar`'s own rule, `_implicit_minimum`):
    what fully implicit (Newton-Krylov) schemes need, whose stage solves JAX cannot
    differentiate forward over reverse.

    **Arguments:**

    - `linear_solver`: the solver of `H lambda = ct` (default CG, rtol 1e-6).
    """

    linear_solver: lx.AbstractLinearSolver = eqx.field(default_factory=_default_cg)


class BilevelVar(AbstractWindowNet):
    """Strong-constraint 4D-Var run to convergence as a differentiable layer.

    The inner problem is the window problem with the network's parameters and
    correction in the model and its background covariance scaled by `s^2`; in the
    control-variable form (`w`: whitened model-error forcings, weak constraint only)

    `(v*, w*) = argmin |v|^2 / 2 + J_m(x_b + s B^{1/2} v, w; theta)`,

    solved by optimistix (L-BFGS), and the analysis is `x_0* = x_b + s B^{1/2} v*`.
    Its derivative with respect to the hyperparameters
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

    - `background_scale`: initial `s` (learned as `log s`; `s^2 B` is the background
      error covariance, i.e. `1 / s^2` is the regularisation weight).
    - `theta`: initial learned parameter controls (the problem's `set_parameters`
      places them), or `None`.
    - `correction`: a learned model-error correction, or `None`.
    - `scale`: typical amplitude of the state (normalises the losses).
    - `solver`: the inner optimistix minimiser (default L-BFGS, tolerances 1e-6).
    - `max_steps`: the inner minimisation's cap.
    - `adjoint`: how the hypergradient is formed. `optx.ImplicitAdjoint(
      linear_solver=...)`: the implicit function theorem with Hessian-vector
      products forward over reverse (the cheaper one); `ReverseImplicitAdjoint(
      linear_solver)`: the same theorem with products reverse over reverse, in this
      module's own rule (one linearisation of `grad_v J` at `v*`, reused by every
      CG iteration), which fully implicit (Newton-Krylov) schemes need;
      `optx.RecursiveCheckpointAdjoint()`: backpropagation through the inner
      solver's iterations, for comparison (it stores iterates). `None` picks the
      reverse implicit rule for Newton-Krylov schemes and the forward one
      otherwise, both with CG at rtol 1e-6.
    - `throw`: `False` returns the iterate reached at `max_steps` instead of raising
      (4D-Var truncated after `max_steps` iterations; its hypergradient is then
      not the exact one).
    """

    log_scale: Float[Array, ""]
    theta: PyTree[Array] | None
    correction: eqx.Module | None
    solver: optx.AbstractMinimiser
    adjoint: "optx.AbstractAdjoint | ReverseImplicitAdjoint | None"
    scale: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)

    def __init__(
        self,
        *,
        background_scale: float = 1.0,
        theta: PyTree[Array] | None = None,
        correction: eqx.Module | None = None,
        scale: float = 1.0,
        solver: optx.AbstractMinimiser | None = None,
        max_steps: int = 500,
        adjoint=None,
        throw: bool = True,
    ):
        if background_scale <= 0:
            raise ValueError(
                f"background_scale must be positive, got {background_scale}"
            )
        if adjoint is not None and not isinstance(
            adjoint,
            (
                optx.ImplicitAdjoint,
                optx.RecursiveCheckpointAdjoint,
                ReverseImplicitAdjoint,
            ),
        ):
            raise TypeError(
                "adjoint must be optx.ImplicitAdjoint, ReverseImplicitAdjoint, "
                f"optx.RecursiveCheckpointAdjoint or None, got {type(adjoint).__name__}"
            )
        dtype = jnp.zeros(()).dtype
        self.log_scale = jnp.asarray(jnp.log(background_scale), dtype)
        self.theta = theta
        self.correction = correction
        self.solver = optx.LBFGS(rtol=1e-6, atol=1e-6) if solver is None else solver
        self.adjoint = adjoint
        self.scale = float(scale)
        self.max_steps = int(max_steps)
        self.throw = bool(throw)

    def with_throw(self, throw: bool) -> "BilevelVar":
        """The same network whose unconverged inner solve raises (`True`, for
        training: its hypergradient would be wrong) or is reported in the outcome
        (`False`, for assimilation)."""
        new = copy.copy(self)
        object.__setattr__(new, "throw", bool(throw))
        return new

    def trainable(self) -> PyTree[bool]:
        """The learned leaves: `log s`, `theta` and the correction."""
        return self._learned_spec(lambda m: (m.log_scale, m.theta, m.correction))

    def adjoint_for(self, problem: WindowProblem):
        """The hypergradient's adjoint for this problem's scheme (`adjoint`, or the
        default: see the class)."""
        newton_krylov = problem.simulator.newton_krylov is not None
        if isinstance(self.adjoint, optx.ImplicitAdjoint) and newton_krylov:
            raise ValueError(
                "optx.ImplicitAdjoint (Hessian products forward over reverse) cannot "
                "differentiate the Newton-Krylov stage solves of a fully implicit "
                "scheme: use ReverseImplicitAdjoint"
            )
        if self.adjoint is not None:
            return self.adjoint
        if newton_krylov:
            return ReverseImplicitAdjoint()
        return optx.ImplicitAdjoint(linear_solver=_default_cg())

    def model_problem(self, problem: WindowProblem) -> WindowProblem:
        """The network's problem (its parameters and correction in the model) with
        `B` scaled by `s^2`."""
        problem = super().model_problem(problem)
        return problem.with_background_covariance(
            ScaledCovariance(problem.background_covariance, jnp.exp(self.log_scale))
        )

    def inner_problem(self, problem: WindowProblem) -> WindowProblem:
        """`model_problem` with a simulator that does not raise on a non-finite
        rollout or a failed stage solve: its cost is then `inf`, so that the line
        search backs off from a trial step the model cannot integrate instead of
        stopping the run."""
        return self.model_problem(problem).tolerating_blow_up()

    def solve(
        self,
        problem: WindowProblem,
        window: ObservationSet,
        background,
        *,
        throw: bool | None = None,
    ) -> optx.Solution:
        """The inner minimisation from the background (`v = 0`, `w = 0`), with the
        implicit adjoint (or the unrolled one). `throw` overrides the network's:
        `False` returns the iterate at `max_steps` with its result code instead of
        raising. The solution's value is the inner `Control` (`theta = None`)."""
        args = (self, problem, window, background)
        adjoint = self.adjoint_for(problem)
        own_rule = isinstance(adjoint, ReverseImplicitAdjoint)
        start = self.model_problem(problem).initial_control(window, background)
        throw = self.throw if throw is None else throw
        # A problem that must not raise inside the program (`without_raising`:
        # training, `analyse_window`) gets NaN for an unconverged solve instead.
        raising = problem.blow_up == "raise"
        solution = optx.minimise(
            _inner_cost,
            self.solver,
            start,
            held(args) if own_rule else args,
            max_steps=self.max_steps,
            adjoint=optx.ImplicitAdjoint() if own_rule else adjoint,
            throw=throw and raising,
            tags=SPD_TAGS,
        )
        value = solution.value
        if own_rule:
            value = _implicit_minimum(args, value, adjoint.linear_solver)
        if throw and not raising:
            failed = solution.result != optx.RESULTS.successful
            value = jax.tree.map(lambda a: jnp.where(failed, jnp.nan, a), value)
        return eqx.tree_at(lambda s: s.value, solution, value)

    def __call__(
        self, problem: WindowProblem, window: ObservationSet, background: Array
    ) -> tuple[Analysis, Info]:
        solution = self.solve(problem, window, background)
        analysis = self.model_problem(problem).analysis(solution.value, background)
        result = solution.result
        outcome = jnp.where(
            result == optx.RESULTS.successful,
            CONVERGED,
            jnp.where(result == optx.RESULTS.max_steps_reached, MAX_STEPS, FAILED),
        )
        info = Info(solution.stats["num_steps"], outcome)
        theta = self.parameters(problem)
        return Analysis(analysis.initial_state, theta, analysis.w), info

    def negative_log_evidence(
        self,
        problem: WindowProblem,
        window: ObservationSet,
        background,
        *,
        probes: int = 0,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, ""]:
        """`-log p(y | h)` up to a constant, by the Laplace approximation at the
        inner solution with the problem's Gauss-Newton Hessian:
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
        control = self.solve(problem, window, background).value
        inner = self.model_problem(problem)
        cost = inner.cost(control, window, background)
        H = inner.gauss_newton(control, window, background)
        if probes == 0:
            return cost + 0.5 * jnp.linalg.slogdet(H.as_matrix())[1]
        if key is None:
            raise ValueError("a stochastic log-determinant (probes > 0) needs a key")
        structure = H.in_structure()
        leaves, treedef = jax.tree.flatten(structure)
        keys = jax.random.split(key, len(leaves))
        z = jax.tree.unflatten(
            treedef,
            [
                jax.random.rademacher(k, (probes, *s.shape), s.dtype)
                for k, s in zip(keys, leaves, strict=True)
            ],
        )
        cg = getattr(self.adjoint_for(problem), "linear_solver", None) or _default_cg()
        solve = lambda b: lx.linear_solve(H, b, cg).value  # noqa: E731
        w = jax.lax.stop_gradient(jax.vmap(solve)(z))

        def product(a, b):
            hb = H.mv(b)
            return sum(
                jnp.vdot(x, y)
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(hb), strict=True)
            )

        surrogate = 0.5 * jnp.mean(jax.vmap(product)(w, z))
        return cost + surrogate - jax.lax.stop_gradient(surrogate)
