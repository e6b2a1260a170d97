"""Background- and observation-error scales estimated from the statistics of the
cycled analyses, so that a static `B` (a climatology, a diffusion operator) fits
the forecast errors of the run without hand tuning."""

import dataclasses

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._covariance import ScaledCovariance
from ._observations import ObservationSet
from ._problem import WindowProblem


class AdaptationState(eqx.Module):
    """What `InnovationAdaptation` has learned so far: sums over the cycled
    windows, each older window weighted down by the forgetting factor.

    - `background_term`: `sum s_b^2 2 J_b(x_a)` (the background term at the
      analyses, times the factor each was analysed with).
    - `explained`: `sum (p - 2 J_o(x_a) - 2 J_other(x_a))`, with `p` the number of
      assimilated observations.
    - `desroziers`: `sum (R0^-1/2 d_oa) . (R0^-1/2 d_ob)` (`R0`: the configured
      observation error).
    - `observations`: `sum p`.
    - `background_variance`, `observation_variance`: the current factors `s_b^2`
      on the configured `B0` and `s_o^2` on `R0`.
    - `windows`: windows seen.
    """

    background_term: Float[Array, ""]
    explained: Float[Array, ""]
    desroziers: Float[Array, ""]
    observations: Float[Array, ""]
    background_variance: Float[Array, ""]
    observation_variance: Float[Array, ""]
    windows: Int[Array, ""]


class InnovationAdaptation(eqx.Module):
    """Estimate the scale of `B` (and optionally of `R`) while cycling, from the
    consistency of each window's analysis with its innovations.

    With `B = s_b^2 B0`, the expected background term at the analysis is
    `E[2 J_b(x_a)] = tr(K H)`, and `tr(K H) = p - E[2 J_o(x_a)]` when `R` is right
    (Desroziers & Ivanov, Q. J. R. Meteorol. Soc. 127, 2001). The update

    `s_b^2 <- s_b^2 * sum 2 J_b(x_a) / sum (p - 2 J_o(x_a))`

    has its fixed point where the analyses' cost matches its expectation,
    `E[2 J(x_a)] = p` (chi-square matching: Ménard et al., Mon. Wea. Rev. 128,
    2000; Talagrand, ECMWF 1999), which holds for 4D-Var windows of any length and
    needs nothing but the cost terms. The sums run over windows with weight
    `forgetting^age`; each update is limited to a factor `max_factor`, and
    `s_b^2` to `bounds`. With `observation_error`,
    `s_o^2 = sum d_oa . d_ob / sum p` (Desroziers et al., Q. J. R. Meteorol. Soc.
    131, 2005). The first window is analysed with `B` and `R` as configured and
    is left out of the sums: its background (e.g. the observations' mean) is not
    a forecast, and its errors say nothing of the forecasts' that `B` describes
    while cycling.

    **Arguments:**

    - `background`: estimate `s_b` (else it stays 1).
    - `observation_error`: estimate `s_o` (else it stays 1: `R` as the file gives
      it).
    - `forgetting`: weight of the past per window, in `[0, 1)`.
    - `max_factor`: the largest change of `s_b^2` (or `s_o^2`) per window.
    - `bounds`: the range of `s_b^2` (and `s_o^2`).
    """

    background: bool = eqx.field(static=True, default=True)
    observation_error: bool = eqx.field(static=True, default=False)
    forgetting: float = eqx.field(static=True, default=0.95)
    max_factor: float = eqx.field(static=True, default=2.0)
    bounds: tuple[float, float] = eqx.field(static=True, default=(1e-6, 1e6))

    def __check_init__(self):
        if not 0 <= self.forgetting < 1:
            raise ValueError(f"forgetting must be in [0, 1), got {self.forgetting}")
        if not self.max_factor > 1:
            raise ValueError(f"max_factor must be > 1, got {self.max_factor}")
        low, high = self.bounds
        if not 0 < low < high:
            raise ValueError(f"bounds must satisfy 0 < low < high, got {self.bounds}")

    def init(self) -> AdaptationState:
        """No window seen: both factors 1."""
        # Strongly typed (not weak): the updated state has the same types, so the
        # second window does not compile the cycle's program again.
        dtype = jnp.zeros(()).dtype
        zero, one = jnp.zeros((), dtype), jnp.ones((), dtype)
        return AdaptationState(
            zero, zero, zero, zero, one, one, jnp.zeros((), jnp.int32)
        )

    def apply(
        self, problem: WindowProblem, window: ObservationSet, state: AdaptationState
    ) -> tuple[WindowProblem, ObservationSet]:
        """`problem` (which carries `B0`) with `B = s_b^2 B0`, and `window` with the
        observation-error std `s_o sigma`."""
        scaled = ScaledCovariance(
            problem.background_covariance, jnp.sqrt(state.background_variance)
        )
        problem = problem.with_background_covariance(scaled)
        std = window.error_std * jnp.sqrt(state.observation_variance)
        return problem, dataclasses.replace(window, error_std=std)

    def update(
        self,
        state: AdaptationState,
        window: ObservationSet,
        cost_terms: dict[str, Array],
        background_trajectory: Array,
        analysis_trajectory: Array,
    ) -> AdaptationState:
        """Add one window's statistics after its analysis and return the scales
        for the next.

        **Arguments:**

        - `state`: the state the window was analysed with (`apply`).
        - `window`: the window as configured (before `apply`).
        - `cost_terms`: `WindowProblem.cost_terms` at the analysis, of the
          problem and window `apply` returned.
        - `background_trajectory`, `analysis_trajectory`: the model states at the
          window's times from the background and from the analysis.
        """
        a = self.forgetting
        cycled = (state.windows > 0).astype(state.background_term.dtype)
        p = jnp.sum(window.mask).astype(cycled.dtype)
        j_b = 2 * cost_terms["background"]
        j_rest = 2 * sum(v for k, v in cost_terms.items() if k != "background")
        d_ob = window.innovations(background_trajectory)
        d_oa = window.innovations(analysis_trajectory)
        s_b2, s_o2 = state.background_variance, state.observation_variance
        background_term = a * state.background_term + cycled * s_b2 * j_b
        explained = a * state.explained + cycled * (p - j_rest)
        desroziers = a * state.desroziers + cycled * jnp.sum(d_oa * d_ob)
        observations = a * state.observations + cycled * p
        low, high = self.bounds
        if self.background:
            # Until the explained part is positive (few, noisy windows), stay.
            estimate = background_term / jnp.where(explained > 0, explained, 1.0)
            estimate = jnp.clip(
                estimate, s_b2 / self.max_factor, s_b2 * self.max_factor
            )
            s_b2 = jnp.where(explained > 0, jnp.clip(estimate, low, high), s_b2)
        if self.observation_error:
            estimate = desroziers / jnp.maximum(observations, 1.0)
            estimate = jnp.clip(
                estimate, s_o2 / self.max_factor, s_o2 * self.max_factor
            )
            s_o2 = jnp.where(observations > 0, jnp.clip(estimate, low, high), s_o2)
        return AdaptationState(
            background_term,
            explained,
            desroziers,
            observations,
            s_b2,
            s_o2,
            state.windows + 1,
        )
