"""Background- and observation-error scales estimated from innovation statistics
while cycling, so that a static `B` (a climatology, a diffusion operator) fits the
forecast errors of the run without hand tuning."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._covariance import ScaledCovariance
from ._observations import ObservationSet
from ._problem import WindowProblem


class AdaptationState(eqx.Module):
    """What `InnovationAdaptation` has learned so far: sums over past windows,
    each older window weighted down by the forgetting factor (whitened by the
    configured observation-error std `sigma`).

    - `innovations`: `sum |R^-1/2 d_ob|^2` (innovations of the background).
    - `observations`: the number of innovations in that sum.
    - `background_trace`: `sum tr(R^-1/2 H M B0 M^T H^T R^-1/2)` (`B0`: the
      problem's unscaled `B`; Hutchinson estimates).
    - `desroziers`: `sum (R^-1/2 d_oa) . (R^-1/2 d_ob)`, for the observation-error
      scale.
    - `background_variance`, `observation_variance`: the current factors
      `s_b^2` on `B0` and `s_o^2` on `R`.
    - `windows`: windows seen.
    - `key`: for the trace probes.
    """

    innovations: Float[Array, ""]
    observations: Float[Array, ""]
    background_trace: Float[Array, ""]
    desroziers: Float[Array, ""]
    background_variance: Float[Array, ""]
    observation_variance: Float[Array, ""]
    windows: Int[Array, ""]
    key: PRNGKeyArray


class InnovationAdaptation(eqx.Module):
    """Estimate the scale of `B` (and optionally of `R`) from the innovations of the
    cycled run, before each window's analysis.

    With `B = s_b^2 B0` and `R = s_o^2 R0`, the innovations `d = y - H M x_b` of a
    window's background trajectory satisfy (Desroziers et al., Q. J. R. Meteorol.
    Soc. 131, 2005, in trace form; the chi-square matching of Ménard et al., Mon.
    Wea. Rev. 128, 2000)

    `E |R0^-1/2 d|^2 = s_b^2 tr(R0^-1/2 H M B0 M^T H^T R0^-1/2) + s_o^2 p`,

    with `p` innovations; the trace is estimated with `probes` tangent-linear runs
    (Hutchinson: `E |R0^-1/2 H M B0^1/2 z|^2` over Rademacher `z`), so the estimate
    holds for 4D windows and for observations late in a window. The sums are
    accumulated over windows with weight `forgetting^age`, and
    `s_b^2 = (sum |d|^2 - s_o^2 sum p) / sum tr`, clipped to `bounds`. With
    `observation_error`, `s_o^2 = sum d_oa . d_ob / sum p` (Desroziers' `R`
    diagnostic, from the previous windows' analyses). The first window is
    analysed with `B` and `R` as configured and its innovations are left out:
    its background (e.g. the observations' mean) is not a forecast, and its
    errors say nothing of the forecasts' that `B` describes while cycling.

    **Arguments:**

    - `background`: estimate `s_b` (else it stays 1).
    - `observation_error`: estimate `s_o` (else it stays 1: `R` as the file gives
      it).
    - `forgetting`: weight of the past per window, in `[0, 1)` (0: each window
      alone).
    - `probes`: tangent-linear runs per window for the trace.
    - `bounds`: the range of `s_b^2` (and `s_o^2`).
    """

    background: bool = eqx.field(static=True, default=True)
    observation_error: bool = eqx.field(static=True, default=False)
    forgetting: float = eqx.field(static=True, default=0.9)
    probes: int = eqx.field(static=True, default=4)
    bounds: tuple[float, float] = eqx.field(static=True, default=(1e-6, 1e6))

    def __check_init__(self):
        if not 0 <= self.forgetting < 1:
            raise ValueError(f"forgetting must be in [0, 1), got {self.forgetting}")
        if self.probes < 1:
            raise ValueError(f"probes must be at least 1, got {self.probes}")
        low, high = self.bounds
        if not 0 < low < high:
            raise ValueError(f"bounds must satisfy 0 < low < high, got {self.bounds}")

    def init(self, *, key: PRNGKeyArray | None = None) -> AdaptationState:
        """No window seen: both factors 1."""
        zero, one = jnp.asarray(0.0), jnp.asarray(1.0)
        key = jax.random.PRNGKey(0) if key is None else key
        return AdaptationState(zero, zero, zero, zero, one, one, jnp.asarray(0), key)

    def prepare(
        self,
        problem: WindowProblem,
        window: ObservationSet,
        background: Array,
        state: AdaptationState,
    ) -> tuple[WindowProblem, ObservationSet, AdaptationState]:
        """Add the window's innovations of `background` to the sums and return the
        problem and window with the updated scales (`B = s_b^2 B0`, observation
        error std `s_o sigma`), and the new state. `problem` carries `B0`."""
        key, probe_key = jax.random.split(state.key)
        start = problem.initial_control(window, background)

        def observed(v):
            control = dataclasses.replace(start, v=v)
            analysis = problem.analysis(control, background)
            return window.innovations(problem.trajectory(analysis, window.n_times))

        # Hutchinson: tr(J J^T) = E |J z|^2 over Rademacher z in control space
        # (forward mode); checkpointed rollouts have only reverse mode, where it is
        # E |J^T u|^2 over u in observation space (rows of J without a sensor are
        # zero).
        if problem.simulator.checkpoints is None:
            d, tangent = jax.linearize(observed, start.v)
            shape = start.v.shape
        else:
            d, transpose = jax.vjp(observed, start.v)
            tangent = lambda u: transpose(u)[0]  # noqa: E731
            shape = d.shape
        z = jax.random.rademacher(probe_key, (self.probes, *shape), d.dtype)
        out = jax.lax.map(tangent, z)
        trace = jnp.mean(jnp.sum(out**2, axis=tuple(range(1, out.ndim))))
        a = self.forgetting
        cycled = (state.windows > 0).astype(d.dtype)  # the first is not a forecast
        innovations = a * state.innovations + cycled * jnp.sum(d**2)
        count = a * state.observations + cycled * jnp.sum(window.mask)
        traces = a * state.background_trace + cycled * trace
        low, high = self.bounds
        s_o2 = state.observation_variance
        s_b2 = state.background_variance
        if self.background:
            estimate = (innovations - s_o2 * count) / jnp.maximum(traces, 1e-30)
            s_b2 = jnp.where(traces > 0, jnp.clip(estimate, low, high), s_b2)
        state = AdaptationState(
            innovations,
            count,
            traces,
            a * state.desroziers,
            s_b2,
            s_o2,
            state.windows + 1,
            key,
        )
        return self.apply(problem, window, state) + (state,)

    def apply(
        self, problem: WindowProblem, window: ObservationSet, state: AdaptationState
    ) -> tuple[WindowProblem, ObservationSet]:
        """`problem` with `B = s_b^2 B0` and `window` with std `s_o sigma`."""
        scaled = ScaledCovariance(
            problem.background_covariance, jnp.sqrt(state.background_variance)
        )
        problem = eqx.tree_at(lambda p: p.background_covariance, problem, scaled)
        std = window.error_std * jnp.sqrt(state.observation_variance)
        return problem, dataclasses.replace(window, error_std=std)

    def observe(
        self,
        window: ObservationSet,
        background_trajectory: Array,
        analysis_trajectory: Array,
        state: AdaptationState,
    ) -> AdaptationState:
        """Add the window's `d_oa . d_ob` (whitened by the configured std) after its
        analysis; with `observation_error`, update `s_o^2`. `window` is the one
        `prepare` was given."""
        d_ob = window.innovations(background_trajectory)
        d_oa = window.innovations(analysis_trajectory)
        cycled = (state.windows > 1).astype(d_ob.dtype)  # `prepare` counted it
        desroziers = state.desroziers + cycled * jnp.sum(d_oa * d_ob)
        s_o2 = state.observation_variance
        if self.observation_error:
            low, high = self.bounds
            estimate = desroziers / jnp.maximum(state.observations, 1.0)
            s_o2 = jnp.where(
                state.observations > 0, jnp.clip(estimate, low, high), s_o2
            )
        return dataclasses.replace(
            state, desroziers=desroziers, observation_variance=s_o2
        )
