"""Variational cost functions (3D-Var, strong-constraint 4D-Var, joint estimation)."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Float, PyTree

from simulators import Simulator

from ._covariance import AbstractCovariance
from ._observations import ObservationSet


class Control(eqx.Module):
    """The control vector: the whitened initial-state increment `v`
    (`x_0 = x_b + S v`) and the transformed unknown parameters `theta`."""

    v: Float[Array, "..."]
    theta: PyTree[Array] | None = None


class Var4D(eqx.Module):
    """Strong-constraint 4D-Var with optional joint parameter estimation:

    `J(v, theta) = |v|^2 / 2 + |(theta - theta_b) / sigma_theta|^2 / 2
    + sum_t sum_{sensors} ((M_{0->t}(x_b + S v; theta) - y_t) / sigma_o)^2 / 2`

    with `B = S S^T` (control-variable transform; Courtier, Thépaut & Hollingsworth,
    Q. J. R. Meteorol. Soc. 120, 1994). With one observation time at the initial time
    it is 3D-Var. The gradient comes from the simulator's adjoint (implicit function
    theorem through each implicit solve).

    **Arguments:**

    - `simulator`: the model `M`, stepped `observation_interval` steps between
      consecutive observation times (the first observation is at the initial time).
    - `background`: `x_b`, the grid's shape.
    - `background_covariance`: `B`, through its square root.
    - `observation_interval`: model steps between observation times.
    - `set_parameters`: `(simulator, theta) -> simulator` placing the estimated
      parameters (e.g. `kappa = exp(theta)`); `None` estimates the state alone.
    - `parameter_background`, `parameter_std`: Gaussian prior of `theta`.
    """

    simulator: Simulator
    background: Float[Array, "..."]
    background_covariance: AbstractCovariance
    observation_interval: int = eqx.field(static=True, default=1)
    set_parameters: Callable | None = eqx.field(static=True, default=None)
    parameter_background: PyTree[Array] | None = None
    parameter_std: PyTree[Array] | None = None

    def __check_init__(self):
        if self.observation_interval < 1:
            raise ValueError(
                f"observation_interval must be >= 1, got {self.observation_interval}"
            )
        if (self.set_parameters is None) != (self.parameter_background is None):
            raise ValueError(
                "set_parameters and parameter_background go together (joint estimation)"
            )

    def initial_control(self) -> Control:
        """The background: `v = 0`, `theta = theta_b`."""
        return Control(jnp.zeros_like(self.background), self.parameter_background)

    def analysis(self, control: Control) -> tuple[Array, Simulator]:
        """`(x_0, simulator)` for a control vector."""
        x0 = self.background + self.background_covariance.sqrt(control.v)
        simulator = self.simulator
        if self.set_parameters is not None:
            simulator = self.set_parameters(simulator, control.theta)
        return x0, simulator

    def trajectory(self, control: Control, n_obs: int) -> Array:
        """Model states at the `n_obs` observation times, `(n_obs, *grid)`."""
        x0, simulator = self.analysis(control)
        full = simulator.rollout(x0, (n_obs - 1) * self.observation_interval)
        return full[:: self.observation_interval]

    def observation_term(self, states: Array, obs: ObservationSet) -> Array:
        misfit = jnp.where(obs.mask, (states - obs.values) / obs.error_std, 0.0)
        return 0.5 * jnp.sum(misfit**2)

    def __call__(self, control: Control, obs: ObservationSet) -> Float[Array, ""]:
        """The cost `J` of `control` against the window `obs`."""
        states = self.trajectory(control, obs.values.shape[0])
        cost = 0.5 * jnp.sum(control.v**2) + self.observation_term(states, obs)
        if self.set_parameters is not None:
            prior = jax.tree.map(
                lambda t, tb, s: 0.5 * jnp.sum(((t - tb) / s) ** 2),
                control.theta,
                self.parameter_background,
                self.parameter_std,
            )
            cost = cost + sum(jax.tree.leaves(prior))
        return cost


def minimise(
    cost: Var4D,
    obs: ObservationSet,
    *,
    solver: optx.AbstractMinimiser | None = None,
    max_steps: int = 200,
) -> tuple[Control, optx.Solution]:
    """Minimise a variational cost with L-BFGS (optimistix) from the background.

    **Returns:** `(control, solution)`; `solution.result` and `solution.stats` say
    whether and how it converged (`throw=False`: a run out of steps still returns its
    best iterate, and the caller reports the result code).
    """
    solver = solver or optx.LBFGS(rtol=1e-6, atol=1e-6)
    sol = optx.minimise(
        cost,
        solver,
        cost.initial_control(),
        args=obs,
        max_steps=max_steps,
        throw=False,
    )
    return sol.value, sol
