"""The window problem: what every analyser estimates, written once.

A window's observations, a simulator, the background and model errors, the prior of
unknown parameters and any extra cost terms define the (strong- or weak-constraint)
4D-Var cost. `WindowProblem` is the only place where that cost, its residuals, its
gradient and its Gauss-Newton operator are computed; variational solvers, unrolled
networks and bilevel layers all evaluate it through this module."""

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, Float, PyTree

from simulators import Simulator, is_concrete

from ._covariance import AbstractCovariance
from ._observations import ObservationSet

SPD_TAGS = frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})


def bounded_log(theta, background, bound: float = 3.0):
    """`background * exp(bound * tanh(theta / bound))`: a positive parameter within a
    factor `e^bound` of its background, `~ background * exp(theta)` near it. Keeps
    joint estimation from proposing a diffusivity the model cannot step (the
    exponential of an unbounded control overflows after one bad Gauss-Newton step)."""
    return background * jnp.exp(bound * jnp.tanh(theta / bound))


class Parameter(eqx.Module):
    """An unknown positive coefficient of the simulator's model as a control.

    The control `theta` is whitened (prior `N(0, I)`); the physical value is
    `bounded_log(S theta, background)`, with `S` the square root of the prior
    covariance of `log(value / background)` (a smooth field or a scalar std).
    Calling it places the value in a simulator, so it is the `set_parameters` of a
    `WindowProblem`.

    **Arguments:**

    - `name`: the model's field (e.g. `"kappa"`, `"forcing"`).
    - `background`: the prior median (positive).
    - `covariance`: the prior covariance of the log (`DiffusionCovariance` for a
      field, `DiagonalCovariance` for a scalar).
    - `shape`: the control's shape (the grid's for a field, `()` for a scalar).
    - `units`, `long_name`: CF attributes of the written estimate.
    - `bound`: the log-range allowed (`bounded_log`).
    """

    name: str = eqx.field(static=True)
    background: float = eqx.field(static=True)
    covariance: AbstractCovariance
    shape: tuple[int, ...] = eqx.field(static=True, converter=tuple)
    units: str = eqx.field(static=True, default="1")
    long_name: str = eqx.field(static=True, default="")
    bound: float = eqx.field(static=True, default=3.0)

    def __check_init__(self):
        if not self.background > 0:
            raise ValueError(
                f"parameter {self.name!r}: background must be positive, got "
                f"{self.background}"
            )

    def value(self, theta) -> Array:
        """The physical value of the control `theta`."""
        return bounded_log(self.covariance.sqrt(theta), self.background, self.bound)

    def __call__(self, simulator: Simulator, theta) -> Simulator:
        if not hasattr(simulator.model, self.name):
            raise ValueError(
                f"{type(simulator.model).__name__} has no parameter {self.name!r}"
            )
        return eqx.tree_at(
            lambda s: getattr(s.model, self.name), simulator, self.value(theta)
        )

    def zeros(self, dtype=None) -> Array:
        """The prior mean of the control."""
        return jnp.zeros(self.shape, jnp.zeros((), dtype).dtype)


class ModelErrorForcing(eqx.Module):
    """A tendency forcing `q` added inside the model step (weak-constraint 4D-Var's
    model-error control), on top of an existing correction `base(u)` if any."""

    forcing: Float[Array, "..."]
    base: Callable | None = None

    def __call__(self, u):
        return self.forcing if self.base is None else self.forcing + self.base(u)


class Control(eqx.Module):
    """The control vector of a window problem.

    - `v`: whitened initial-state increment, `x_0 = x_b + B^{1/2} v`.
    - `theta`: the unknown parameters' controls (a pytree; `None` without joint
      estimation).
    - `w`: whitened model-error forcings, one per observation interval,
      `q_k = Q^{1/2} w_k`, shape `(n_obs - 1, *grid)` (weak constraint; else `None`).
    """

    v: Float[Array, "..."]
    theta: PyTree[Array] | None = None
    w: Float[Array, "interval ..."] | None = None


class Analysis(eqx.Module):
    """A window's estimate in physical terms: the initial state `x_0`, the
    parameters' controls `theta` and the whitened model-error forcings `w` (weak
    constraint), each `None` where not estimated. `WindowProblem.trajectory` runs
    it; `WindowProblem.control` / `WindowProblem.analysis` convert to and from the
    whitened `Control`."""

    initial_state: Float[Array, "..."]
    theta: PyTree[Array] | None = None
    w: Float[Array, "interval ..."] | None = None


class AbstractCostTerm(eqx.Module):
    """An extra term of the window cost in residual form, `|r|^2 / 2`, so that
    Gauss-Newton solvers and every analyser see it like the observation term: a
    prior on the state (e.g. total variation), a constraint added at inference
    (bounds, a conserved total), pseudo-observations."""

    @abc.abstractmethod
    def residual(
        self, trajectory: Float[Array, "time ..."], theta: PyTree[Array] | None
    ) -> Array:
        """The term's residual at the window's trajectory (model states at the
        observation times) and parameter controls."""


class StateBounds(AbstractCostTerm):
    """A penalty on states outside `[lower, upper]` (either may be `None`):
    `r = (max(x - upper, 0) + max(lower - x, 0)) / tolerance` at every observation
    time, i.e. a bound violation of `tolerance` costs as much as a one-sigma
    observation misfit. Positivity of a concentration is `StateBounds(lower=0)`.
    """

    lower: float | None = eqx.field(static=True, default=None)
    upper: float | None = eqx.field(static=True, default=None)
    tolerance: float = eqx.field(static=True, default=1e-2)

    def __check_init__(self):
        if self.lower is None and self.upper is None:
            raise ValueError("StateBounds needs a lower or an upper bound")
        both = self.lower is not None and self.upper is not None
        if both and not self.lower < self.upper:
            raise ValueError(
                f"StateBounds: lower {self.lower} must be below upper {self.upper}"
            )
        if not self.tolerance > 0:
            raise ValueError(
                f"StateBounds: tolerance must be positive, got {self.tolerance}"
            )

    def residual(self, trajectory, theta):
        del theta
        excess = jnp.zeros_like(trajectory)
        if self.upper is not None:
            excess = excess + jnp.maximum(trajectory - self.upper, 0.0)
        if self.lower is not None:
            excess = excess + jnp.maximum(self.lower - trajectory, 0.0)
        return excess / self.tolerance


class ConservedTotal(AbstractCostTerm):
    """Conservation of a total (mass, heat): `r_t = (cell sum_i x_{t,i} - total) /
    tolerance` at every observation time, or with `total=None` the change of the
    total from the window's initial state (`t >= 1`): a model that conserves it
    (periodic advection-diffusion) then carries an initial state of the right
    total through the window.

    **Arguments:**

    - `total`: the known total, or `None` (conserved, value free).
    - `cell`: the grid cell's size (length, area), so that the total is an
      integral; 1: a plain sum.
    - `tolerance`: a deviation of `tolerance` costs as much as a one-sigma
      observation misfit.
    """

    total: float | None = eqx.field(static=True, default=None)
    cell: float = eqx.field(static=True, default=1.0)
    tolerance: float = eqx.field(static=True, default=1e-2)

    def __check_init__(self):
        if not self.tolerance > 0:
            raise ValueError(
                f"ConservedTotal: tolerance must be positive, got {self.tolerance}"
            )

    def totals(self, trajectory: Float[Array, "time ..."]) -> Float[Array, " time"]:
        """The total of each state."""
        return self.cell * jnp.sum(trajectory.reshape(trajectory.shape[0], -1), 1)

    def residual(self, trajectory, theta):
        del theta
        totals = self.totals(trajectory)
        if self.total is None:
            return (totals[1:] - totals[0]) / self.tolerance
        return (totals - self.total) / self.tolerance


class KnownValues(AbstractCostTerm):
    """Known state values (pseudo-observations, e.g. at points or on the boundary):
    `r = (x_t - value) / tolerance` where a value is known, at every observation
    time or at the initial time only. Build it from a field with NaN where
    unknown, or with `KnownValues.at_points` / `KnownValues.on_boundary`.

    **Arguments:**

    - `values`: a field of the grid's shape, NaN where unknown.
    - `tolerance`: a deviation of `tolerance` costs a one-sigma misfit.
    - `initial_only`: only the window's initial state.
    """

    values: Float[Array, "..."]
    known: Array
    tolerance: float = eqx.field(static=True, default=1e-2)
    initial_only: bool = eqx.field(static=True, default=False)

    def __init__(self, values, tolerance: float = 1e-2, initial_only: bool = False):
        values = np.asarray(values, float)
        known = np.isfinite(values)
        if not known.any():
            raise ValueError("KnownValues: no value is known (all NaN)")
        if not tolerance > 0:
            raise ValueError(
                f"KnownValues: tolerance must be positive, got {tolerance}"
            )
        self.values = jnp.asarray(np.where(known, values, 0.0))
        self.known = jnp.asarray(known)
        self.tolerance = float(tolerance)
        self.initial_only = bool(initial_only)

    @classmethod
    def at_points(cls, shape, points, tolerance: float = 1e-2, initial_only=False):
        """Values at grid points, `points = [[i, (j,) value], ...]`."""
        values = np.full(tuple(shape), np.nan)
        for point in points:
            *index, value = point
            if len(index) != len(values.shape):
                raise ValueError(
                    f"KnownValues: point {list(point)} needs {len(values.shape)} "
                    "indices and a value"
                )
            values[tuple(int(i) for i in index)] = float(value)
        return cls(values, tolerance, initial_only)

    @classmethod
    def on_boundary(cls, shape, value: float, tolerance=1e-2, initial_only=False):
        """`value` at every boundary point (the first and last along each axis)."""
        values = np.full(tuple(shape), np.nan)
        for axis in range(values.ndim):
            index = [slice(None)] * values.ndim
            for end in (0, -1):
                index[axis] = end
                values[tuple(index)] = float(value)
        return cls(values, tolerance, initial_only)

    def residual(self, trajectory, theta):
        del theta
        states = trajectory[:1] if self.initial_only else trajectory
        return jnp.where(self.known, states - self.values, 0.0) / self.tolerance


class ParameterBounds(AbstractCostTerm):
    """Bounds on an estimated parameter's physical value (`Parameter.value`):
    `r = (max(p - upper, 0) + max(lower - p, 0)) / tolerance`.

    **Arguments:**

    - `parameter`: the problem's `Parameter` (the CLI passes the simulator's).
    - `lower`, `upper`: the bounds (either may be `None`).
    - `tolerance`: a violation of `tolerance` costs a one-sigma misfit.
    """

    parameter: Parameter
    lower: float | None = eqx.field(static=True, default=None)
    upper: float | None = eqx.field(static=True, default=None)
    tolerance: float = eqx.field(static=True, default=1e-3)

    def __check_init__(self):
        if self.lower is None and self.upper is None:
            raise ValueError("ParameterBounds needs a lower or an upper bound")
        if not self.tolerance > 0:
            raise ValueError(
                f"ParameterBounds: tolerance must be positive, got {self.tolerance}"
            )

    def residual(self, trajectory, theta):
        if theta is None:  # the parameter is not estimated: nothing to bound
            return jnp.zeros((), trajectory.dtype)
        bounds = StateBounds(self.lower, self.upper, self.tolerance)
        return bounds.residual(self.parameter.value(theta), None)


def half_sum_squares(tree) -> Array:
    """`|r|^2 / 2` of a pytree of residuals."""
    return 0.5 * sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(tree))


class WindowProblem(eqx.Module):
    """The variational problem of one assimilation window, in residual form:

    `J = |r|^2 / 2`, `r = (v, (theta - theta_b) / sigma_theta, w,
    (H(x_t) - y_t) / sigma_o over reporting sensors, extra terms)`

    with `x_0 = x_b + B^{1/2} v` (control-variable transform; Courtier, Thépaut &
    Hollingsworth, Q. J. R. Meteorol. Soc. 120, 1994) and `x_t` the model trajectory
    at the observation times. Strong constraint: the model is exact. Weak constraint
    (`model_error_covariance` given): a forcing `q_k = Q^{1/2} w_k`, constant over
    the k-th observation interval, is added to the tendency inside every implicit
    step (the forcing formulation of Trémolet, Q. J. R. Meteorol. Soc. 132, 2006).
    With one observation time it is 3D-Var. Gradients come from the simulator's
    adjoint (implicit function theorem through each implicit solve).

    The background state `x_b` is not part of the problem: it changes from window
    to window (a cycled forecast), so every method takes it as an argument, as it
    takes the window's observations.

    **Arguments:**

    - `simulator`: the model, stepped `observation_interval` steps between
      consecutive observation times (the first observation is at the initial time).
    - `background_covariance`: `B`, through its square root.
    - `observation_interval`: model steps between observation times.
    - `set_parameters`: `(simulator, theta) -> simulator` placing the estimated
      parameters (e.g. a `Parameter`); `None` estimates the state alone.
    - `parameter_background`, `parameter_std`: Gaussian prior of `theta` (pytrees
      of the same structure; `parameter_std` may use scalars). With a `Parameter`
      they default to its whitened prior (zeros, 1).
    - `model_error_covariance`: `Q` of the model-error forcing (weak constraint).
    - `terms`: extra cost terms (`AbstractCostTerm`).
    - `blow_up`: how a rollout that blows up (or a failed implicit stage solve) is
      met: `"raise"` (the default, an error inside the program), `"inf"` (the cost
      is `inf`, for line searches: `tolerating_blow_up`) or `"nan"` (NaN states
      reach whatever is computed from them, for callers that check finiteness on
      the host: `without_raising`). A simulator with `check_finite=False` is met
      as `"inf"` unless `"nan"` is asked for.
    """

    simulator: Simulator
    background_covariance: AbstractCovariance
    observation_interval: int = eqx.field(static=True, default=1)
    set_parameters: Callable | None = None
    parameter_background: PyTree[Array] | None = None
    parameter_std: PyTree[Array] | None = None
    model_error_covariance: AbstractCovariance | None = None
    terms: tuple[AbstractCostTerm, ...] = ()
    blow_up: Literal["raise", "inf", "nan"] = eqx.field(static=True, default="raise")

    def __init__(
        self,
        simulator: Simulator,
        background_covariance: AbstractCovariance,
        observation_interval: int = 1,
        *,
        set_parameters: Callable | None = None,
        parameter_background: PyTree[Array] | None = None,
        parameter_std: PyTree[Array] | None = None,
        model_error_covariance: AbstractCovariance | None = None,
        terms=(),
        blow_up: Literal["raise", "inf", "nan"] = "raise",
    ):
        if isinstance(set_parameters, Parameter):
            dtype = jnp.zeros(()).dtype
            if parameter_background is None:
                parameter_background = set_parameters.zeros(dtype)
            if parameter_std is None:
                parameter_std = jnp.ones((), dtype)
        self.simulator = simulator
        self.background_covariance = background_covariance
        self.observation_interval = int(observation_interval)
        self.set_parameters = set_parameters
        self.parameter_background = parameter_background
        self.parameter_std = parameter_std
        self.model_error_covariance = model_error_covariance
        self.terms = tuple(terms)
        self.blow_up = blow_up

    def __check_init__(self):
        if self.blow_up not in ("raise", "inf", "nan"):
            raise ValueError(
                f"blow_up must be 'raise', 'inf' or 'nan', got {self.blow_up!r}"
            )
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
        for term in self.terms:
            if not isinstance(term, AbstractCostTerm):
                raise TypeError(
                    f"cost terms must be AbstractCostTerm, got {type(term).__name__}"
                )

    @property
    def weak(self) -> bool:
        """Whether the problem is weak-constraint (model-error forcings in the
        control)."""
        return self.model_error_covariance is not None

    @property
    def estimates_parameters(self) -> bool:
        return self.set_parameters is not None

    def grid_shape(self) -> tuple[int, ...]:
        return self.simulator.model.grid.shape

    def check_background(self, background: Array) -> None:
        """A one-line error for a background that is not a state of the grid."""
        if background.shape != self.grid_shape():
            raise ValueError(
                f"background has shape {background.shape}, the simulator's grid is "
                f"{self.grid_shape()}"
            )

    # --- the model ------------------------------------------------------------

    def model(self, theta: PyTree[Array] | None = None) -> Simulator:
        """The simulator with the parameters `theta` in place (`None`: as it is)."""
        if theta is None or self.set_parameters is None:
            return self.simulator
        return self.set_parameters(self.simulator, theta)

    def with_parameters(self, theta: PyTree[Array] | None) -> "WindowProblem":
        """The problem with `theta` fixed in its simulator and no longer estimated
        (a network's learned parameters; a refinement with the model held)."""
        if self.set_parameters is None:
            return self
        return eqx.tree_at(
            lambda p: (p.simulator, p.set_parameters, p.parameter_background),
            self,
            (self.model(theta), None, None),
            is_leaf=lambda x: x is None,
        )

    def with_prior_parameters(self) -> "WindowProblem":
        """`with_parameters(parameter_background)`: the parameters fixed at their
        prior. A `Parameter` field at its prior median (a zero control) is set as
        that constant, a scalar: the same model (the models take a scalar for their
        coefficients) whose structured solves stay exact transforms (a constant
        diffusivity: FFT or DST) instead of the Krylov solves of a field."""
        parameter, background = self.set_parameters, self.parameter_background
        fixed = self.with_parameters(background)
        if (
            not isinstance(parameter, Parameter)
            or not parameter.shape
            or not is_concrete(background)
            or np.any(np.asarray(background) != 0)
        ):
            return fixed
        field = getattr(fixed.simulator.model, parameter.name)
        median = jnp.asarray(parameter.background, field.dtype)
        return eqx.tree_at(
            lambda p: getattr(p.simulator.model, parameter.name), fixed, median
        )

    def with_background_covariance(self, B: AbstractCovariance) -> "WindowProblem":
        """The problem with `B` as its background-error covariance."""
        return eqx.tree_at(lambda p: p.background_covariance, self, B)

    def with_terms(self, *terms: AbstractCostTerm) -> "WindowProblem":
        """The problem with `terms` added to its cost."""
        return eqx.tree_at(lambda p: p.terms, self, self.terms + tuple(terms))

    def with_correction(self, correction: Callable | None) -> "WindowProblem":
        """The problem with a model-error correction inside the simulator's step."""
        return eqx.tree_at(
            lambda p: p.simulator.correction,
            self,
            correction,
            is_leaf=lambda x: x is None,
        )

    def tolerating_blow_up(self) -> "WindowProblem":
        """The problem whose simulator does not raise on a non-finite rollout or a
        failed implicit stage solve (`check_finite=False`): its cost is then `inf`,
        so that a line search backs off from a trial step the model cannot
        integrate (a chaotic rollout from an over-long step) instead of stopping
        the run."""
        return self._unchecked("inf")

    def without_raising(self) -> "WindowProblem":
        """The problem whose programs raise nothing (`check_finite=False`): a
        rollout that blows up or a failed implicit stage solve gives NaN states,
        which reach the costs and losses computed from them, for a caller that
        checks their finiteness on the host (training). A raising check is a host
        callback, and JAX's persistent compilation cache stores no program that
        holds one."""
        return self._unchecked("nan")

    def _unchecked(self, blow_up: Literal["inf", "nan"]) -> "WindowProblem":
        simulator = dataclasses.replace(self.simulator, check_finite=False)
        return dataclasses.replace(self, simulator=simulator, blow_up=blow_up)

    def forcings(self, w: Array | None) -> Array | None:
        """The model-error forcings `q_k = Q^{1/2} w_k`, `(n_obs - 1, *grid)`."""
        if w is None:
            return None
        return jax.vmap(self.model_error_covariance.sqrt)(w)

    def trajectory(
        self, analysis: Analysis, n_times: int, *, simulator: Simulator | None = None
    ) -> Float[Array, "time ..."]:
        """Model states at the `n_times` observation times from `analysis`
        (`simulator`: the model to run, default `self.model(analysis.theta)`)."""
        if simulator is None:
            simulator = self.model(analysis.theta)
        x0, w = analysis.initial_state, analysis.w
        interval = self.observation_interval
        if w is None:
            return simulator.rollout(x0, (n_times - 1) * interval, every=interval)
        if w.shape[0] != n_times - 1:
            raise ValueError(
                f"{w.shape[0]} model-error forcings for {n_times - 1} intervals"
            )

        def interval_step(x, q):
            forced = eqx.tree_at(
                lambda s: s.correction,
                simulator,
                ModelErrorForcing(q, simulator.correction),
                is_leaf=lambda x: x is None,
            )
            x = forced.rollout(x, interval)[-1]
            return x, x

        _, states = jax.lax.scan(interval_step, x0, self.forcings(w))
        return jnp.concatenate([x0[None], states])

    def forecast(
        self, analysis: Analysis, trajectory: Array, shift: int | None = None
    ) -> Array:
        """The next window's background: the analysis `shift` observation times
        after the window's start (default: the time after its last). Inside the
        window it is the analysis trajectory; beyond it, the last state advanced
        by the model with the estimated parameters (no model-error forcing: it
        is unknown beyond the window)."""
        n = trajectory.shape[0]
        shift = n if shift is None else shift
        if shift < n:
            return trajectory[shift]
        simulator = self.model(analysis.theta)
        steps = (shift - n + 1) * self.observation_interval
        return simulator.rollout(trajectory[-1], steps)[-1]

    # --- controls ---------------------------------------------------------------

    def initial_control(self, window: ObservationSet, background: Array) -> Control:
        """The background: `v = 0`, `theta = theta_b`, `w = 0`."""
        w = None
        if self.weak:
            w = jnp.zeros((window.n_times - 1, *background.shape), background.dtype)
        v = self.background_covariance.zeros_control(background)
        return Control(v, self.parameter_background, w)

    def analysis(self, control: Control, background: Array) -> Analysis:
        """The physical estimate of a control: `x_0 = x_b + B^{1/2} v`."""
        x0 = background + self.background_covariance.sqrt(control.v)
        return Analysis(x0, control.theta, control.w)

    def control(self, analysis: Analysis, background: Array) -> Control:
        """The control of an estimate: `v = B^{-1/2} (x_0 - x_b)`."""
        v = self.background_covariance.whiten(analysis.initial_state - background)
        return Control(v, analysis.theta, analysis.w)

    # --- the cost ---------------------------------------------------------------

    def _model_residuals(
        self, analysis: Analysis, window: ObservationSet
    ) -> tuple[dict[str, Any], Array]:
        """Every residual but the background's, and whether the rollout stayed
        finite. With a simulator that does not check finiteness (`check_finite=False`,
        a line search's trial points), a non-finite rollout is replaced by zeros
        before the misfit, so that its gradient stays finite (NaN cotangents would
        reach the implicit stages' adjoint solves); `cost` then returns `inf`."""
        states = self.trajectory(analysis, window.n_times)
        finite = jnp.asarray(True)
        if not self.simulator.check_finite and self.blow_up != "nan":
            finite = jnp.all(jnp.isfinite(states))
            states = jnp.where(finite, states, 0.0)
        out: dict[str, Any] = {"observations": window.innovations(states)}
        if self.set_parameters is not None and analysis.theta is not None:
            out["parameters"] = jax.tree.map(
                lambda t, tb, s: (t - tb) / s,
                analysis.theta,
                self.parameter_background,
                self.parameter_std,
            )
        if analysis.w is not None:
            out["model_error"] = analysis.w
        for k, term in enumerate(self.terms):
            out[f"term{k}"] = term.residual(states, analysis.theta)
        return out, finite

    def residuals(
        self, control: Control, window: ObservationSet, background: Array
    ) -> dict[str, Any]:
        """The whitened residual `r` (a pytree); the cost is `|r|^2 / 2`."""
        out, _ = self._model_residuals(self.analysis(control, background), window)
        return {"background": control.v, **out}

    def cost(
        self, control: Control, window: ObservationSet, background: Array
    ) -> Float[Array, ""]:
        """The cost `J` of `control` against the window (`inf` where a rollout of a
        simulator with `check_finite=False` blew up)."""
        out, finite = self._model_residuals(self.analysis(control, background), window)
        value = half_sum_squares(control.v) + half_sum_squares(out)
        return jnp.where(finite & jnp.isfinite(value), value, jnp.inf)

    def cost_terms(
        self, analysis: Analysis, window: ObservationSet, background: Array
    ) -> dict[str, Array]:
        """Each term of `J` at an estimate given in physical terms: `background`
        (`|x_0 - x_b|^2_{B^-1} / 2`), `observations`, and where present
        `parameters`, `model_error` and the extra terms (summed as `terms`)."""
        v = self.background_covariance.whiten(analysis.initial_state - background)
        out, _ = self._model_residuals(analysis, window)
        values = {"background": half_sum_squares(v)}
        extra = [half_sum_squares(r) for k, r in out.items() if k.startswith("term")]
        values.update(
            {k: half_sum_squares(r) for k, r in out.items() if not k.startswith("term")}
        )
        if extra:
            values["terms"] = sum(extra)
        return values

    def value_and_grad_norm(
        self, control: Control, window: ObservationSet, background: Array
    ) -> tuple[Array, Array]:
        """`(J, |grad J|)` at a control."""
        value, grad = eqx.filter_value_and_grad(self.cost)(control, window, background)
        norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grad)))
        return value, norm

    def state_cost(self, analysis: Analysis, window: ObservationSet) -> Array:
        """`J` without its background term, at an estimate in physical terms: what
        a gradient step preconditioned by `B` descends besides the background."""
        out, _ = self._model_residuals(analysis, window)
        return half_sum_squares(out)

    def preconditioned_gradient(
        self, analysis: Analysis, window: ObservationSet
    ) -> Analysis:
        """`(B grad_{x_0} J_m, grad_w J_m)` with `J_m = state_cost`: the gradient of
        the non-background terms (the model-error prior `|w|^2 / 2` included),
        preconditioned by `B` for the initial state (so that no `B^-1` is needed:
        the background term's preconditioned gradient is `x_0 - x_b`) and by the
        identity for the whitened forcings: `grad_w J` itself. `theta` is held.
        """
        grad = jax.grad(
            lambda x, w: self.state_cost(Analysis(x, analysis.theta, w), window),
            argnums=(0, 1),
        )(analysis.initial_state, analysis.w)
        B = self.background_covariance
        return Analysis(B.apply(grad[0]), None, grad[1])

    def gauss_newton(
        self, control: Control, window: ObservationSet, background: Array
    ) -> lx.AbstractLinearOperator:
        """The Gauss-Newton Hessian of `J` with respect to the state controls
        `(v, w)` at `control` (the parameters held): `I + G^T G` with `G` the
        Jacobian of the non-background residuals, a matrix-free symmetric positive
        definite lineax operator (a tangent-linear rollout and an adjoint one per
        product). Its operand has `control`'s structure with `theta = None`."""
        theta = control.theta

        def residual(c):
            analysis = self.analysis(Control(c.v, theta, c.w), background)
            return self._model_residuals(analysis, window)[0]

        state = Control(control.v, None, control.w)
        _, tangent = jax.linearize(residual, state)
        adjoint = jax.linear_transpose(tangent, state)

        def apply(c):
            (back,) = adjoint(tangent(c))
            return jax.tree.map(jnp.add, c, back)

        return lx.FunctionLinearOperator(
            apply, jax.eval_shape(lambda: state), tags=SPD_TAGS
        )
