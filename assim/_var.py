"""Variational assimilation: 3D-Var, strong- and weak-constraint 4D-Var, joint
state-parameter estimation, and their solvers (L-BFGS; incremental Gauss-Newton with
a conjugate-gradient inner loop)."""

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
from jaxtyping import Array, Float, PyTree

from simulators import Simulator
from simulators._solve import DelegatingLinearSolver

from ._covariance import AbstractCovariance
from ._observations import ObservationSet


class ModelErrorForcing(eqx.Module):
    """A tendency forcing `q` added inside the model step (weak-constraint 4D-Var's
    model-error control), on top of an existing correction `base(u)` if any."""

    forcing: Float[Array, "..."]
    base: Callable | None = None

    def __call__(self, u):
        return self.forcing if self.base is None else self.forcing + self.base(u)


def bounded_log(theta, background, bound: float = 3.0):
    """`background * exp(bound * tanh(theta / bound))`: a positive parameter within a
    factor `e^bound` of its background, `~ background * exp(theta)` near it. Keeps
    joint estimation from proposing a diffusivity the model cannot step (the
    exponential of an unbounded control overflows after one bad Gauss-Newton step)."""
    return background * jnp.exp(bound * jnp.tanh(theta / bound))


class Control(eqx.Module):
    """The control vector of a variational problem.

    - `v`: whitened initial-state increment, `x_0 = x_b + B^{1/2} v`.
    - `theta`: transformed unknown parameters (a pytree; `None` without joint
      estimation), e.g. `log kappa`.
    - `w`: whitened model-error forcings, one per observation interval,
      `q_k = Q^{1/2} w_k`, shape `(n_obs - 1, *grid)` (weak constraint; else `None`).
    """

    v: Float[Array, "..."]
    theta: PyTree[Array] | None = None
    w: Float[Array, "interval ..."] | None = None


class Var4D(eqx.Module):
    """4D-Var cost over one window, in residual form:

    `J = |r|^2 / 2`, `r = (v, (theta - theta_b) / sigma_theta, w,
    (H(x_t) - y_t) / sigma_o over reporting sensors)`

    with `x_0 = x_b + B^{1/2} v` (control-variable transform; Courtier, Thépaut &
    Hollingsworth, Q. J. R. Meteorol. Soc. 120, 1994) and `x_t` the model trajectory
    at the observation times. Strong constraint: the model is exact. Weak constraint
    (`model_error_covariance` given): a forcing `q_k = Q^{1/2} w_k`, constant over
    the k-th observation interval, is added to the tendency inside every implicit step
    (the forcing formulation of Trémolet, Q. J. R. Meteorol. Soc. 132, 2006). With
    one observation time it is 3D-Var. Gradients come from the simulator's adjoint
    (implicit function theorem through each implicit solve); the residual form is
    what Gauss-Newton needs.

    **Arguments:**

    - `simulator`: the model, stepped `observation_interval` steps between
      consecutive observation times (the first observation is at the initial time).
    - `background`: `x_b`, the grid's shape.
    - `background_covariance`: `B`, through its square root.
    - `observation_interval`: model steps between observation times.
    - `set_parameters`: `(simulator, theta) -> simulator` placing the estimated
      parameters (e.g. `kappa = exp(theta)`); `None` estimates the state alone.
    - `parameter_background`, `parameter_std`: Gaussian prior of `theta` (pytrees
      of the same structure; `parameter_std` may use scalars).
    - `model_error_covariance`: `Q` of the model-error forcing (weak constraint).
    """

    simulator: Simulator
    background: Float[Array, "..."]
    background_covariance: AbstractCovariance
    observation_interval: int = eqx.field(static=True, default=1)
    set_parameters: Callable | None = None
    parameter_background: PyTree[Array] | None = None
    parameter_std: PyTree[Array] | None = None
    model_error_covariance: AbstractCovariance | None = None

    def __check_init__(self):
        if self.observation_interval < 1:
            raise ValueError(
                f"observation_interval must be >= 1, got {self.observation_interval}"
            )
        if (self.set_parameters is None) != (self.parameter_background is None):
            raise ValueError(
                "set_parameters and parameter_background go together (joint estimation)"
            )
        if self.set_parameters is not None and self.parameter_std is None:
            raise ValueError("joint estimation needs parameter_std (the prior's std)")
        shape = self.simulator.model.grid.shape
        if self.background.shape != shape:
            raise ValueError(
                f"background has shape {self.background.shape}, the simulator's grid "
                f"is {shape}"
            )

    @property
    def weak(self) -> bool:
        return self.model_error_covariance is not None

    def initial_control(self, obs: ObservationSet) -> Control:
        """The background: `v = 0`, `theta = theta_b`, `w = 0`."""
        w = None
        if self.weak:
            w = jnp.zeros((obs.n_times - 1, *self.background.shape))
            w = w.astype(self.background.dtype)
        return Control(jnp.zeros_like(self.background), self.parameter_background, w)

    def analysis(self, control: Control) -> tuple[Array, Simulator]:
        """`(x_0, simulator)` for a control vector."""
        x0 = self.background + self.background_covariance.sqrt(control.v)
        simulator = self.simulator
        if self.set_parameters is not None:
            simulator = self.set_parameters(simulator, control.theta)
        return x0, simulator

    def model_error(self, control: Control) -> Array | None:
        """The forcings `q_k = Q^{1/2} w_k`, `(n_obs - 1, *grid)`, or `None`."""
        if control.w is None:
            return None
        return jax.vmap(self.model_error_covariance.sqrt)(control.w)

    def trajectory(self, control: Control, n_obs: int) -> Array:
        """Model states at the `n_obs` observation times, `(n_obs, *grid)`."""
        x0, simulator = self.analysis(control)
        interval = self.observation_interval
        if control.w is None:
            return simulator.rollout(x0, (n_obs - 1) * interval, every=interval)
        if control.w.shape[0] != n_obs - 1:
            raise ValueError(
                f"{control.w.shape[0]} model-error forcings for {n_obs - 1} intervals"
            )

        def interval_step(x, q):
            forced = dataclasses.replace(
                simulator, correction=ModelErrorForcing(q, simulator.correction)
            )
            x = forced.rollout(x, interval)[-1]
            return x, x

        _, states = jax.lax.scan(interval_step, x0, self.model_error(control))
        return jnp.concatenate([x0[None], states])

    def residuals(self, control: Control, obs: ObservationSet) -> dict[str, Any]:
        """The whitened residual `r` (a pytree); the cost is `|r|^2 / 2`."""
        states = self.trajectory(control, obs.n_times)
        out = {"background": control.v, "observations": obs.innovations(states)}
        if self.set_parameters is not None:
            out["parameters"] = jax.tree.map(
                lambda t, tb, s: (t - tb) / s,
                control.theta,
                self.parameter_background,
                self.parameter_std,
            )
        if control.w is not None:
            out["model_error"] = control.w
        return out

    def __call__(self, control: Control, obs: ObservationSet) -> Float[Array, ""]:
        """The cost `J` of `control` against the window `obs`."""
        return _half_sum_squares(self.residuals(control, obs))


def _half_sum_squares(tree) -> Array:
    return 0.5 * sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(tree))


class _TruncatedCG(DelegatingLinearSolver):
    """lineax CG whose iteration cap is a truncation, not a failure: the inner loop of
    incremental 4D-Var stops after `max_steps` CG iterations or at `rtol`, whichever
    comes first (the usual practice: Gauss-Newton only needs a descent direction)."""

    def compute(self, state, vector, options):
        value, result, stats = self.inner.compute(state, vector, options)

        truncated = result == lx.RESULTS.max_steps_reached
        return value, lx.RESULTS.where(truncated, lx.RESULTS.successful, result), stats


@dataclasses.dataclass
class SolveInfo:
    """How a minimisation went, for diagnostics and metrics.

    - `cost`, `grad_norm`: per iteration, the first entry at the background.
    - `steps`: iterations taken; `result`: optimistix's result message
      (`"successful"` or why it stopped); `converged`: tolerances met.
    """

    cost: np.ndarray
    grad_norm: np.ndarray
    steps: int
    result: str
    converged: bool


Method = Literal["lbfgs", "gauss-newton"]


def make_solver(
    method: Method,
    *,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    inner_steps: int = 20,
    inner_rtol: float = 1e-3,
):
    """The optimistix solver for a method name.

    - `"lbfgs"`: `optx.LBFGS` on the cost.
    - `"gauss-newton"`: incremental 4D-Var: `optx.GaussNewton` on the residual, each
      outer iteration solving the linearised (tangent-linear) problem
      `(I + S^T M'^T H^T R^-1 H M' S) dv = -grad` with lineax CG on the normal
      equations (`lx.Normal(lx.CG)`, matrix-free: one tangent-linear and one adjoint
      run per CG iteration), truncated after `inner_steps` iterations. The
      control-variable transform (`S = B^{1/2}`) is the preconditioner: the Hessian is
      the identity plus a low-rank observation term.
      Full Gauss-Newton steps, as in operational incremental 4D-Var (no line
      search): keep estimated parameters in a bounded transform (see
      `bounded_log`) so that an early step cannot leave the model's valid range.
    """
    if method == "lbfgs":
        return optx.LBFGS(rtol=rtol, atol=atol)
    if method == "gauss-newton":
        inner = lx.CG(rtol=inner_rtol, atol=0.0, max_steps=inner_steps)
        return optx.GaussNewton(
            rtol=rtol, atol=atol, linear_solver=lx.Normal(_TruncatedCG(inner))
        )
    raise ValueError(f"unknown method {method!r}: expected 'lbfgs' or 'gauss-newton'")


def _objective(method: Method):
    if method != "lbfgs":
        return lambda y, args: (args[0].residuals(y, args[1]), None)
    return lambda y, args: (args[0](y, args[1]), None)


@eqx.filter_jit
def _init(solver, method, y, args):
    fn = _objective(method)
    f_struct, aux_struct = eqx.filter_eval_shape(fn, y, args)
    return solver.init(fn, y, args, {}, f_struct, aux_struct, frozenset())


@eqx.filter_jit
def _step(solver, method, y, state, args):
    fn = _objective(method)
    y, state, _ = solver.step(fn, y, args, {}, state, frozenset())
    done, result = solver.terminate(fn, y, args, {}, state, frozenset())
    if method == "lbfgs":  # the state holds the cost and gradient at `y`
        value, grad = state.f_info.f, state.f_info.grad
        gnorm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grad)))
    else:  # least-squares states hold a residual and a Jacobian operator
        value, gnorm = _value_and_grad_norm(*args, y)
    return y, state, done, result, value, gnorm


@eqx.filter_jit
def _value_and_grad_norm(cost, obs, control):
    value, grad = eqx.filter_value_and_grad(lambda c: cost(c, obs))(control)
    norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grad)))
    return value, norm


def _check_method(cost: Var4D, method: Method):
    if method == "gauss-newton" and cost.simulator.checkpoints is not None:
        raise ValueError(
            "Gauss-Newton needs the tangent-linear model (forward mode), which "
            "binomially checkpointed rollouts do not have: use method lbfgs "
            "(method=var4d_lbfgs) or simulator checkpoints=None"
        )


def solve_window(
    cost: Var4D,
    obs: ObservationSet,
    *,
    method: Method = "lbfgs",
    max_steps: int = 200,
    **solver_options,
):
    """One window's minimisation from the background as a single traced computation
    (optimistix's own loop, no per-iteration host round trip), so that it can be
    jitted, vmapped over windows and split over devices; `minimise` is the
    step-by-step version with a recorded history.

    **Returns:** `(control, steps, converged, cost, grad_norm)`, the last two at the
    background and at the solution (`(2,)` each).
    """
    _check_method(cost, method)
    solver = make_solver(method, **solver_options)
    objective = _objective(method)
    y0 = cost.initial_control(obs)
    run = optx.minimise if method == "lbfgs" else optx.least_squares
    sol = run(
        lambda y, args: objective(y, args)[0],
        solver,
        y0,
        (cost, obs),
        max_steps=max_steps,
        throw=False,
    )
    first, last = (_value_and_grad_norm(cost, obs, y) for y in (y0, sol.value))
    return (
        sol.value,
        sol.stats["num_steps"],
        sol.result == optx.RESULTS.successful,
        jnp.stack([first[0], last[0]]),
        jnp.stack([first[1], last[1]]),
    )


def minimise(
    cost: Var4D,
    obs: ObservationSet,
    *,
    method: Method = "lbfgs",
    max_steps: int = 200,
    control: Control | None = None,
    progress: Callable[[int, float], None] | None = None,
    **solver_options,
) -> tuple[Control, SolveInfo]:
    """Minimise a variational cost from `control` (default: the background).

    The optimistix solver (see `make_solver`) is stepped one iteration at a time
    (its `init` / `step` / `terminate`), so that the cost and gradient norm of every
    iterate are recorded and a progress callback can follow the run.

    **Arguments:**

    - `cost`, `obs`: the cost function and the window's observations.
    - `method`: `"lbfgs"` or `"gauss-newton"` (incremental 4D-Var).
    - `max_steps`: iteration cap (L-BFGS iterations or Gauss-Newton outer loops).
    - `control`: starting point.
    - `progress`: called as `progress(iteration, cost)` after every iteration.
    - `solver_options`: `rtol`, `atol`, `inner_steps`, `inner_rtol`.

    **Returns:** `(control, info)`; a run that hits `max_steps` returns its last
    iterate and says so in `info.result` (not an exception).
    """
    _check_method(cost, method)
    solver = make_solver(method, **solver_options)
    y = cost.initial_control(obs) if control is None else control
    args = (cost, obs)
    value, gnorm = _value_and_grad_norm(cost, obs, y)
    costs, gnorms = [float(value)], [float(gnorm)]
    state = _init(solver, method, y, args)
    result, steps, done = optx.RESULTS.successful, 0, False
    while not done and steps < max_steps:
        y, state, done, result, value, gnorm = _step(solver, method, y, state, args)
        steps += 1
        costs.append(float(value))
        gnorms.append(float(gnorm))
        if progress is not None:
            progress(steps, costs[-1])
        if not np.isfinite(costs[-1]):
            break
    if not np.isfinite(costs[-1]):
        message = "non-finite cost"
    elif not bool(done):
        message = "max_steps_reached"
    else:
        message = optx.RESULTS[result] or "successful"
    return y, SolveInfo(
        cost=np.asarray(costs),
        grad_norm=np.asarray(gnorms),
        steps=steps,
        result=message,
        converged=message == "successful",
    )
