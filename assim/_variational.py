"""Variational assimilation (3D-Var, strong- and weak-constraint 4D-Var, joint
state-parameter estimation) as an analyser: an optimistix solver on the window
problem, run as one compiled loop per window."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
from jaxtyping import Array

from simulators import DelegatingLinearSolver

from ._analyser import CONVERGED, FAILED, MAX_STEPS, NON_FINITE, AbstractAnalyser, Info
from ._covariance import AbstractCovariance
from ._observations import ObservationSet
from ._problem import AbstractCostTerm, Analysis, Control, WindowProblem


class TruncatedCG(DelegatingLinearSolver):
    """lineax CG whose iteration cap is a truncation, not a failure: the inner loop of
    incremental 4D-Var stops after `max_steps` CG iterations or at `rtol`, whichever
    comes first (the usual practice: Gauss-Newton only needs a descent direction)."""

    def compute(self, state, vector, options):
        value, result, stats = self.inner.compute(state, vector, options)
        truncated = result == lx.RESULTS.max_steps_reached
        return value, lx.RESULTS.where(truncated, lx.RESULTS.successful, result), stats


class IncrementalGaussNewton(optx.AbstractGaussNewton):
    """Gauss-Newton whose steps are checked by a backtracking Armijo line search
    (optimistix's `BacktrackingArmijo` on `|r|^2 / 2`): a step that does not
    decrease the cost enough, or whose rollout blows up (a non-finite cost), is
    halved instead of accepted, so that a strongly nonlinear window (a chaotic
    model, a first background far from the truth) cannot end the run. Full
    steps are taken whenever they decrease the cost, as in operational
    incremental 4D-Var. Build it with `incremental`."""

    rtol: float
    atol: float
    norm: Callable
    descent: optx.NewtonDescent
    search: optx.BacktrackingArmijo
    verbose: Callable

    def __init__(self, rtol, atol, linear_solver, *, norm=optx.max_norm):
        self.rtol = rtol
        self.atol = atol
        self.norm = norm
        self.descent = optx.NewtonDescent(linear_solver=linear_solver)
        self.search = optx.BacktrackingArmijo(decrease_factor=0.5, slope=0.1)
        self.verbose = lambda **_: None


def incremental(
    *,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    inner_steps: int = 20,
    inner_rtol: float = 1e-3,
) -> IncrementalGaussNewton:
    """Incremental 4D-Var's solver: Gauss-Newton on the residuals, each outer
    iteration solving the linearised (tangent-linear) problem
    `(I + S^T M'^T H^T R^-1 H M' S) dv = -grad` with lineax CG on the normal
    equations (`lx.Normal(TruncatedCG)`, matrix-free: one tangent-linear and one
    adjoint run per CG iteration), truncated after `inner_steps` iterations. The
    control-variable transform (`S = B^{1/2}`) is the preconditioner: the Hessian
    is the identity plus a low-rank observation term. A step that does not
    decrease the cost (or blows the model up) is halved
    (`IncrementalGaussNewton`); keep estimated parameters in a bounded transform
    (`Parameter`) so that a step cannot leave the model's valid range."""
    if not isinstance(inner_steps, int) or isinstance(inner_steps, bool):
        raise TypeError(f"inner_steps must be an integer, got {inner_steps!r}")
    if inner_steps < 1:
        raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
    inner = lx.CG(rtol=inner_rtol, atol=0.0, max_steps=inner_steps)
    return IncrementalGaussNewton(rtol, atol, lx.Normal(TruncatedCG(inner)))


def _least_squares(solver) -> bool:
    return isinstance(solver, optx.AbstractLeastSquaresSolver)


class Variational(AbstractAnalyser):
    """A classical variational analysis: the window cost minimised by an optimistix
    solver from the background (3D-Var with one observation time, strong- or
    weak-constraint 4D-Var, joint parameter estimation: all set by the problem).

    The solver's `init` / `step` / `terminate` run inside one compiled while loop
    (no host round trip per iteration), recording the cost and gradient norm of
    every iterate; so a window's solve can be jitted, vmapped over windows and split
    over devices. `progress`, if given, is called on the host after every iteration
    as `progress(iteration, cost)` (`jax.debug.callback`; JAX's persistent
    compilation cache stores no program holding a host callback, so `assim-run`
    reports progress per window instead).

    **Arguments:**

    - `solver`: an optimistix minimiser on the cost (e.g. `optx.LBFGS`) or a
      least-squares solver on the residuals (e.g. `incremental(...)`, Gauss-Newton
      with truncated CG).
    - `max_steps`: iteration cap (L-BFGS iterations or Gauss-Newton outer loops);
      a run that reaches it returns its last iterate (outcome `max_steps`).
    - `progress`: the host callback above, or `None`.
    - `gradient_rtol`: also converged when the gradient norm has fallen by this
      factor from the background's (the usual test of operational 4D-Var, which
      float32 meets where the solver's tolerances on the iterates, near machine
      precision, would not); `None`: the solver's tolerances only.
    """

    solver: optx.AbstractMinimiser | optx.AbstractLeastSquaresSolver
    max_steps: int = eqx.field(static=True, default=100)
    progress: Callable[[int, float], None] | None = eqx.field(static=True, default=None)
    gradient_rtol: float | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if not isinstance(self.max_steps, int) or isinstance(self.max_steps, bool):
            raise TypeError(f"max_steps must be an integer, got {self.max_steps!r}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.gradient_rtol is not None and not 0 < self.gradient_rtol < 1:
            raise ValueError(
                f"gradient_rtol must be in (0, 1), got {self.gradient_rtol}"
            )
        if not isinstance(
            self.solver, (optx.AbstractMinimiser, optx.AbstractLeastSquaresSolver)
        ):
            raise TypeError(
                "Variational needs an optimistix minimiser or least-squares solver, "
                f"got {type(self.solver).__name__}"
            )

    def __call__(
        self,
        problem: WindowProblem,
        window: ObservationSet,
        background: Array,
        *,
        start: Control | None = None,
    ) -> tuple[Analysis, Info]:
        """The window's analysis; `start` overrides the starting control (default:
        the background)."""
        control, info = self.solve(problem, window, background, start=start)
        return problem.analysis(control, background), info

    def solve(
        self,
        problem: WindowProblem,
        window: ObservationSet,
        background: Array,
        *,
        start: Control | None = None,
    ) -> tuple[Control, Info]:
        """As `__call__`, returning the optimal control instead of the analysis."""
        problem.check_background(background)
        least_squares = _least_squares(self.solver)
        if least_squares and problem.simulator.checkpoints is not None:
            raise ValueError(
                "Gauss-Newton needs the tangent-linear model (forward mode), which "
                "binomially checkpointed rollouts do not have: use an L-BFGS solver "
                "(method=var4d_lbfgs) or simulator checkpoints=None"
            )
        # A line search backs off from a trial step whose rollout blows up (cost
        # or residuals non-finite) instead of stopping the run; the iterates it
        # accepts are finite.
        problem = problem.tolerating_blow_up()
        if least_squares:
            fn = lambda y, args: (problem.residuals(y, *args), None)  # noqa: E731
        else:
            fn = lambda y, args: (problem.cost(y, *args), None)  # noqa: E731
        args = (window, background)
        y0 = problem.initial_control(window, background) if start is None else start
        f_struct, aux_struct = eqx.filter_eval_shape(fn, y0, args)
        state = self.solver.init(fn, y0, args, {}, f_struct, aux_struct, frozenset())
        # The loop carries the state's arrays; the rest (e.g. a linearisation's
        # jaxpr) is the same at every iteration, as in optimistix's own loop.
        state, static_state = eqx.partition(state, eqx.is_array)
        value, gnorm = problem.value_and_grad_norm(y0, *args)
        nan = jnp.full(self.max_steps + 1, jnp.nan, value.dtype)
        costs, gnorms = nan.at[0].set(value), nan.at[0].set(gnorm)
        result = optx.RESULTS.successful
        # optimistix's first step only evaluates the start (the iterate it returns
        # is `y0`): after solver step `k` the iterate is the one after `k - 1`
        # updates, so the loop takes `max_steps + 1` solver steps for `max_steps`
        # updates, and records iterate `k - 1`.

        def cond(carry):
            k, _, _, done, _, costs, _ = carry
            last = costs[jnp.maximum(k - 1, 0)]
            return (~done) & (k <= self.max_steps) & jnp.isfinite(last)

        def body(carry):
            k, y, state, _, _, costs, gnorms = carry
            state = eqx.combine(state, static_state)
            y, state, _ = self.solver.step(fn, y, args, {}, state, frozenset())
            done, result = self.solver.terminate(fn, y, args, {}, state, frozenset())
            f_info = getattr(state, "f_info", None)
            if isinstance(f_info, optx.FunctionInfo.EvalGrad):
                # L-BFGS's state holds the cost and gradient at `y`.
                value = f_info.f
                gnorm = jnp.sqrt(
                    sum(jnp.sum(g**2) for g in jax.tree.leaves(f_info.grad))
                )
            else:  # least-squares states hold residuals and a Jacobian operator
                value, gnorm = problem.value_and_grad_norm(y, *args)
            steps = k  # updates made so far: iterate `k` after solver step `k + 1`
            if self.progress is not None:
                jax.lax.cond(
                    k > 0,
                    lambda: jax.debug.callback(self.progress, steps, value),
                    lambda: None,
                )
            costs, gnorms = costs.at[steps].set(value), gnorms.at[steps].set(gnorm)
            if self.gradient_rtol is not None:
                small = (k > 0) & (gnorm <= self.gradient_rtol * gnorms[0])
                result = optx.RESULTS.where(small, optx.RESULTS.successful, result)
                done = done | small
            state = eqx.filter(state, eqx.is_array)
            return k + 1, y, state, done, result, costs, gnorms

        carry = (jnp.asarray(0), y0, state, jnp.asarray(False), result, costs, gnorms)
        k, y, _, done, result, costs, gnorms = jax.lax.while_loop(cond, body, carry)
        steps = jnp.maximum(k - 1, 0)
        outcome = jnp.where(
            ~jnp.isfinite(costs[steps]),
            NON_FINITE,
            jnp.where(
                ~done,
                MAX_STEPS,
                jnp.where(result == optx.RESULTS.successful, CONVERGED, FAILED),
            ),
        )
        return y, Info(steps, outcome, costs, gnorms)


class Refined(AbstractAnalyser):
    """A first guess refined by a variational solver: `guess`'s analysis (a trained
    network, any analyser) as the start of `refinement` on the window problem with
    the cost `terms` added (steering: bounds, a conserved total, known values that
    the guess never saw; none: the warm-start hybrid, a network's output converged
    towards the 4D-Var minimum). The guess analyses the problem without them (a
    network's explicit layers, trained on the plain cost, are not stable on stiff
    penalty terms). The model is the guess's (`guess.model_problem`: a network's
    learned parameters and correction held), or with `estimate_parameters` the
    guess's with the problem's unknown parameters estimated again, jointly with
    the state (the problem's prior as their background term). The refinement
    starts from whichever of the guess's state and the background (the cold
    start), with the guess's parameters or the prior's, fits the window best: a
    network's analysis where it beats the background (a first window's poor
    one), the background where it does not.

    **Arguments:**

    - `guess`: the analyser giving the first guess.
    - `refinement`: a `Variational` (e.g. `incremental` Gauss-Newton, `max_steps`
      outer loops).
    - `terms`: cost terms (`AbstractCostTerm`) added for the refinement.
    - `guess_covariance`: the `B` the guess analyses with (a network: the one it
      was trained with, while cycling adapts the problem's for the refinement);
      `None`: the problem's.
    - `estimate_parameters`: re-estimate the problem's parameters in the
      refinement (when it has any), starting from the guess's values or from the
      problem's prior median (while cycling: the previous window's estimate),
      whichever gives the lower cost.
    """

    guess: AbstractAnalyser
    refinement: Variational
    terms: tuple[AbstractCostTerm, ...] = ()
    guess_covariance: AbstractCovariance | None = None
    estimate_parameters: bool = eqx.field(static=True, default=False)

    def __init__(
        self,
        guess,
        refinement,
        terms=(),
        guess_covariance=None,
        estimate_parameters=False,
    ):
        self.guess = guess
        self.refinement = refinement
        self.terms = tuple(terms)
        self.guess_covariance = guess_covariance
        self.estimate_parameters = bool(estimate_parameters)

    def __call__(self, problem, window, background):
        guess_problem = problem
        if self.guess_covariance is not None:
            guess_problem = problem.with_background_covariance(self.guess_covariance)
        first, guess_info = self.guess(guess_problem, window, background)
        model = self.model_problem(problem).with_terms(*self.terms)
        start, from_guess = self._start(model, first, window, background)
        analysis, info = self.refinement(model, window, background, start=start)
        if not model.estimates_parameters:
            analysis = Analysis(analysis.initial_state, first.theta, analysis.w)
        # Layers plus iterations; the costs are left to the caller (evaluated on
        # the plain problem, as for the network alone): the refinement's record is
        # on the augmented cost and counts its iterations only.
        steps = info.steps + guess_info.steps
        return analysis, Info(steps, info.outcome, from_guess=from_guess)

    @staticmethod
    def _start(model, first, window, background):
        """Where the refinement starts: of the guess's state and the background
        (the cold start), each with the guess's parameters or the prior median
        (while cycling, the previous window's estimate) where the refinement
        estimates them, the pair with the lowest refinement cost (the terms
        included; a rollout that blows up costs `inf`). A guess that fits the
        window worse than the background no longer starts the refinement further
        from the minimum than cold 4D-Var does; one that fits better (a network's
        on a first window's poor background) is kept. The guess is the first of
        equals. Returns the start and whether its state is the guess's."""
        cold = model.initial_control(window, background)
        w = cold.w if first.w is None else first.w
        guess = model.control(Analysis(first.initial_state, None, w), background)
        thetas = [cold.theta]
        if model.estimates_parameters and first.theta is not None:
            thetas = [first.theta, cold.theta]
        candidates = [
            Control(v, theta, forcing)
            for v, forcing in ((guess.v, guess.w), (cold.v, cold.w))
            for theta in thetas
        ]
        cost = model.tolerating_blow_up().cost  # a guess that blew up: inf
        costs = jnp.stack([cost(c, window, background) for c in candidates])
        best = jnp.argmin(jnp.where(jnp.isnan(costs), jnp.inf, costs))
        start = jax.tree.map(lambda *xs: jnp.stack(xs)[best], *candidates)
        return start, best < len(thetas)

    def model_problem(self, problem):
        """The guess's model problem; with `estimate_parameters` its parameters
        estimated again (the value the guess placed in the model is overwritten
        by every evaluation's)."""
        held = self.guess.model_problem(problem)
        if not (self.estimate_parameters and problem.estimates_parameters):
            return held
        return eqx.tree_at(
            lambda p: (p.set_parameters, p.parameter_background),
            held,
            (problem.set_parameters, problem.parameter_background),
            is_leaf=lambda x: x is None,
        )
