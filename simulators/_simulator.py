from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._model import AbstractModel, is_concrete
from ._schemes.base import AbstractScheme


class Simulator(eqx.Module):
    """A model paired with a scheme, a time step and an optional correction.

    This is the object that assimilation differentiates: its model's array fields are
    the physical parameters, `correction` (an `eqx.Module` or any callable on the
    state) is added to the tendency inside the step, so a hybrid physics + ML model is
    one pytree.

    **Arguments:**

    - `model`: an `AbstractModel`.
    - `scheme`: an `AbstractScheme`.
    - `dt`: time step (positive).
    - `correction`: optional model-error correction `c(u)`.
    - `checkpoint`: rematerialise each step in the backward pass of `rollout`
      (`jax.checkpoint`), so the gradient stores one state per step and no stage
      values. Off by default: the implicit solves already store nothing of their
      iterations (implicit adjoint), and recomputing a Newton solve in the backward
      pass costs a second forward. Turn it on for long rollouts of many-stage
      schemes where the stage values would not fit in memory.
    - `check_finite`: `rollout` raises on a non-finite trajectory (the default).
      `False` returns it as is, for optimisers whose line search backs off from an
      infinite cost (e.g. the inner 4D-Var of `assim.BilevelVar`).
    """

    model: AbstractModel
    scheme: AbstractScheme
    dt: Float[Array, ""] = eqx.field(converter=jnp.asarray)
    correction: Callable | None = None
    checkpoint: bool = eqx.field(static=True, default=False)
    check_finite: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if self.dt.ndim:
            raise ValueError(f"dt must be a scalar, got shape {self.dt.shape}")
        if is_concrete(self.dt) and not np.asarray(self.dt) > 0:
            raise ValueError(f"time step dt must be positive, got {float(self.dt)}")

    def step_with_info(self, u: Array) -> tuple[Array, dict[str, Array]]:
        """One step; returns `(u_next, info)` (e.g. Newton iteration counts)."""
        u = self.model.check_state(u)
        return self.scheme.step(self.model, u, self.dt, self.correction)

    def step(self, u: Float[Array, "*grid"]) -> Float[Array, "*grid"]:
        """Advance the state `u` by one time step `dt`."""
        return self.step_with_info(u)[0]

    def rollout(
        self, u0: Float[Array, "*grid"], n_steps: int, *, with_info: bool = False
    ):
        """Run `n_steps` steps from `u0`.

        **Returns:** the trajectory, shape `(n_steps + 1, *grid)` with `u0` first;
        with `with_info=True`, `(trajectory, info)` where each info entry has one
        value per step. A trajectory that became non-finite raises an error.
        """
        if int(n_steps) != n_steps or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative integer, got {n_steps}")
        u0 = self.model.check_state(u0)

        def body(u, _):
            u_next, info = self.scheme.step(self.model, u, self.dt, self.correction)
            return u_next, (u_next, info)

        if self.checkpoint:
            body = jax.checkpoint(body)
        final, (states, info) = jax.lax.scan(body, u0, None, length=int(n_steps))
        if self.check_finite:
            states = eqx.error_if(
                states,
                ~jnp.all(jnp.isfinite(final)),
                "rollout became non-finite (unstable time step or scheme?)",
            )
        trajectory = jnp.concatenate([u0[None], states])
        return (trajectory, info) if with_info else trajectory
