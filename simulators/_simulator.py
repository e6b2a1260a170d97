import contextlib
import dataclasses
from collections.abc import Callable

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._linear import _RAISING, solves_without_raising
from ._model import AbstractModel, is_concrete
from ._schemes.base import AbstractScheme
from ._solve import NewtonKrylov


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
    - `checkpoints`: binomial (treeverse) checkpointing of `rollout`'s time loop
      (equinox's checkpointed while loop, as diffrax's `RecursiveCheckpointAdjoint`):
      the gradient stores `checkpoints` states however many steps the rollout has,
      and recomputes the others (O(n log n) steps for n). For long windows on large
      grids, where one state per step does not fit. Reverse mode only: no
      forward-mode derivatives (JVPs, Hessian-vector products) through such a
      rollout. `None` (default): a plain `lax.scan`.
    - `check_finite`: `rollout` raises on a non-finite trajectory (the default).
      `False` returns it as is, and a failed Newton-Krylov stage solve gives NaN
      instead of raising, for optimisers whose line search backs off from an
      infinite cost (e.g. the inner 4D-Var of `assim.BilevelVar`, whose first trial
      steps can be far too long for the implicit solves).
    """

    model: AbstractModel
    scheme: AbstractScheme
    dt: Float[Array, ""] = eqx.field(converter=jnp.asarray)
    correction: Callable | None = None
    checkpoint: bool = eqx.field(static=True, default=False)
    check_finite: bool = eqx.field(static=True, default=True)
    checkpoints: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.checkpoints is not None and self.checkpoints < 1:
            raise ValueError(
                f"checkpoints must be None or >= 1, got {self.checkpoints}"
            )
        if self.dt.ndim:
            raise ValueError(f"dt must be a scalar, got shape {self.dt.shape}")
        if is_concrete(self.dt) and not np.asarray(self.dt) > 0:
            raise ValueError(f"time step dt must be positive, got {float(self.dt)}")

    @property
    def newton_krylov(self) -> NewtonKrylov | None:
        """The scheme's Newton-Krylov stage solver (fully implicit schemes), or
        `None`."""
        return self.scheme.newton_krylov

    def step_with_info(self, u: Array) -> tuple[Array, dict[str, Array]]:
        """One step; returns `(u_next, info)` (e.g. Newton iteration counts)."""
        u = self.model.check_state(u, finite=self.check_finite)
        return self._step(self._scheme(), u)

    def _scheme(self) -> AbstractScheme:
        """The scheme, whose Newton-Krylov stages give NaN instead of raising when
        the simulator does not check finiteness."""
        if self.check_finite or self.newton_krylov is None:
            return self.scheme
        solver = dataclasses.replace(self.newton_krylov, throw=False)
        return self.scheme.with_newton_krylov(solver)

    def _step(self, scheme: AbstractScheme, u: Array) -> tuple[Array, dict]:
        """One step of `scheme`, traced, when the simulator does not check
        finiteness, with linear solves that give NaN instead of raising (no host
        callback in the program; the caller checks). The context is entered
        wherever the step is traced (a rematerialised step too)."""
        checked = self.check_finite
        with contextlib.nullcontext() if checked else solves_without_raising():
            return scheme.step(self.model, u, self.dt, self.correction)

    def step(self, u: Float[Array, "*grid"]) -> Float[Array, "*grid"]:
        """Advance the state `u` by one time step `dt`."""
        return self.step_with_info(u)[0]

    def rollout(
        self,
        u0: Float[Array, "*grid"],
        n_steps: int,
        *,
        every: int = 1,
        with_info: bool = False,
    ):
        """Run `n_steps` steps from `u0`.

        **Arguments:**

        - `u0`: the initial state.
        - `n_steps`: the number of steps.
        - `every`: keep every `every`-th state only (e.g. the observation times of a
          window); `n_steps` must be a multiple of it. Memory for the output and, in
          the plain loop, for the gradient's stored states follows.
        - `with_info`: also return the per-step solver information.

        **Returns:** the trajectory, shape `(n_steps // every + 1, *grid)` with `u0`
        first; with `with_info=True`, `(trajectory, info)` where each info entry has
        one value per step. A trajectory that became non-finite raises an error.

        Called outside `jit`, it compiles once per simulator structure and shapes and
        runs that program on later calls (other parameter values, another `dt`);
        inside a caller's `jit` it is part of the caller's program.
        """
        if int(n_steps) != n_steps or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative integer, got {n_steps}")
        if int(every) != every or every < 1 or n_steps % every:
            raise ValueError(
                f"every must be a positive divisor of n_steps {n_steps}, got {every}"
            )
        n_steps, every = int(n_steps), int(every)
        # Whether solves raise is read when the stages are traced: part of the key.
        raising = _RAISING.get()
        return _compiled_rollout(self, u0, n_steps, every, bool(with_info), raising)

    def _rollout(self, u0, n_steps: int, every: int, with_info: bool):
        u0 = self.model.check_state(u0, finite=self.check_finite)

        scheme = self._scheme()

        def step(u):
            return self._step(scheme, u)

        if self.checkpoint:
            step = jax.checkpoint(step)
        if self.checkpoints is not None:
            if with_info:
                raise ValueError(
                    "rollout(with_info=True) is not available with binomial "
                    "checkpoints (the per-step information is not stored)"
                )
            final, states = self._checkpointed(step, u0, n_steps, every)
            info = None
        else:

            def interval(u, _):
                u, info = jax.lax.scan(lambda v, _: step(v), u, None, length=every)
                return u, (u, info)

            final, (states, info) = jax.lax.scan(
                interval, u0, None, length=n_steps // every
            )
            info = jax.tree.map(lambda a: a.reshape(n_steps, *a.shape[2:]), info)
        if self.check_finite:
            states = eqx.error_if(
                states,
                ~jnp.all(jnp.isfinite(final)),
                "rollout became non-finite: the model blew up from this initial "
                "state or parameter (a background or trial step far outside the "
                "model's range), or the time step is too long for the scheme",
            )
        trajectory = jnp.concatenate([u0[None], states])
        return (trajectory, info) if with_info else trajectory

    def _checkpointed(self, step, u0, n_steps: int, every: int):
        """The time loop as a binomially checkpointed while loop; the kept states
        are written to a buffer (write-only inside the loop, as diffrax saves)."""
        kept = jnp.zeros((n_steps // every, *u0.shape), u0.dtype)

        def body(carry):
            i, u, kept = carry
            u = step(u)[0]
            i = i + 1
            index = jnp.maximum(i // every - 1, 0)
            kept = kept.at[index].set(u, pred=(i % every) == 0)
            return i, u, kept

        _, final, kept = eqxi.while_loop(
            lambda carry: carry[0] < n_steps,
            body,
            (jnp.asarray(0), u0, kept),
            max_steps=n_steps,
            buffers=lambda carry: carry[2],
            kind="checkpointed",
            checkpoints=self.checkpoints,
        )
        return final, kept


@eqx.filter_jit
def _compiled_rollout(simulator: Simulator, u0, n_steps, every, with_info, _raising):
    return simulator._rollout(u0, n_steps, every, with_info)
