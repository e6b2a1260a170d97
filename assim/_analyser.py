"""The analyser interface: `analyser(problem, window, background) -> (analysis, info)`
for every method (variational solvers, unrolled networks, bilevel layers), and the
one vocabulary of outcomes their `Info` reports."""

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._observations import ObservationSet
from ._problem import Analysis, WindowProblem

# One vocabulary for how a window's analysis ended, whatever the analyser.
OUTCOMES = (
    "converged",  # the solver's tolerances were met
    "max_steps",  # the iteration cap came first; the last iterate is returned
    "non_finite",  # the cost became non-finite; the run stopped at that iterate
    "failed",  # the solver reported another failure (see its result code)
    "fixed_steps",  # a fixed number of layers, no convergence test (unrolled nets)
)
CONVERGED, MAX_STEPS, NON_FINITE, FAILED, FIXED_STEPS = range(len(OUTCOMES))


def outcome_name(code) -> str:
    """The name of an outcome code (`OUTCOMES`)."""
    return OUTCOMES[int(code)]


class Info(eqx.Module):
    """How an analyser's window went (arrays, so that it can be jitted and vmapped).

    - `steps`: iterations (solvers) or layers (unrolled networks).
    - `outcome`: an index into `OUTCOMES`.
    - `cost`, `grad_norm`: per iteration, the first entry at the starting point,
      NaN past the last iteration (`(max_steps + 1,)`); `None` for analysers that
      do not iterate on the cost.
    - `from_guess`: a refinement (`Refined`): whether it started from its guess's
      state (rather than the background's); `None` for other analysers.
    """

    steps: Int[Array, ""]
    outcome: Int[Array, ""]
    cost: Float[Array, " iteration"] | None = None
    grad_norm: Float[Array, " iteration"] | None = None
    from_guess: Bool[Array, ""] | None = None

    @property
    def converged(self) -> Array:
        return self.outcome == CONVERGED


class AbstractAnalyser(eqx.Module):
    """A method that estimates a window: `(analysis, info) = analyser(problem,
    window, background)`.

    Every analyser evaluates the window's cost through `problem` (it never writes
    its own), is an immutable pytree (jit, vmap and grad pass through it), and is
    driven by the same cycling loop and batched map (`assim.cycle`,
    `assim.assimilate`)."""

    @abc.abstractmethod
    def __call__(
        self, problem: WindowProblem, window: ObservationSet, background: Array
    ) -> tuple[Analysis, Info]:
        """The window's analysis from its observations and background state.

        **Arguments:**

        - `problem`: the window problem (simulator, covariances, parameter prior,
          extra cost terms).
        - `window`: the window's observations.
        - `background`: the background state `x_b` at the window's first time.

        **Returns:** `(analysis, info)`.
        """

    def model_problem(self, problem: WindowProblem) -> WindowProblem:
        """The problem whose model runs the analyser's estimates (trajectories,
        forecasts): the problem itself, or with a trained network's learned
        parameters and correction in place."""
        return problem


def fixed_steps_info(steps: int) -> Info:
    """The `Info` of an analyser that runs a fixed number of steps."""
    return Info(jnp.asarray(steps), jnp.asarray(FIXED_STEPS))


class NoUpdate(AbstractAnalyser):
    """The background as the analysis: no observation is used. Every window from a
    climatological mean (`assim.Climatology`, independent windows) is the
    climatology baseline; cycled, it is a free run of the model (the forecast
    without assimilation)."""

    def __call__(self, problem, window, background):
        control = problem.initial_control(window, background)
        return problem.analysis(control, background), fixed_steps_info(0)
