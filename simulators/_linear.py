"""lineax solvers that wrap another: the building blocks of the stage solves, and of
solvers that change how a wrapped solver's result is read (e.g. truncated CG)."""

import contextlib
import contextvars
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np


class DelegatingLinearSolver(lx.AbstractLinearSolver):
    """A lineax solver that hands everything to `inner`; subclasses change `compute`."""

    inner: lx.AbstractLinearSolver

    def init(self, operator, options):
        return self.inner.init(operator, options)

    def compute(self, state, vector, options):
        return self.inner.compute(state, vector, options)

    def transpose(self, state, options):
        return self.inner.transpose(state, options)

    def conj(self, state, options):
        return self.inner.conj(state, options)

    def assume_full_rank(self):
        return self.inner.assume_full_rank()


class ScaleInvariant(DelegatingLinearSolver):
    """Solves `A x = b` as `|b|_max A (x / |b|_max) = b`, so that the inner solver's
    tolerances are relative to the size of `b`.

    lineax's Krylov solvers test convergence component-wise against
    `atol + rtol |b_i|`; in tangent and adjoint solves `b` can be of any magnitude, and
    a fixed `atol` is then either meaningless (small `b`) or below round-off (large
    `b`, where GMRES stagnates). The solve is linear, so the rescaling is exact.
    """

    def compute(self, state, vector, options):
        leaves = jax.tree.leaves(vector)
        scale = jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)) for leaf in leaves]))
        scale = jnp.where(scale > 0, scale, 1.0)
        unit = jax.tree.map(lambda leaf: leaf / scale, vector)
        value, result, stats = self.inner.compute(state, unit, options)
        return jax.tree.map(lambda leaf: leaf * scale, value), result, stats


class Inexact(DelegatingLinearSolver):
    """A Krylov solve inside inexact Newton: one that stagnates still returns its
    last iterate as a Newton step, not a failure.

    The Newton iteration's own tests (its residual against its tolerance) decide
    whether the stage converged; the inner solve only has to give a direction. Its
    tolerance is relative to the current residual, and once that residual is at
    round-off the Krylov residual cannot fall any further: lineax then reports a
    stagnation, which optimistix's Newton would make its own failure. A solve that
    reaches its iteration cap still fails (`krylov_max_steps` is a budget the user
    sets).
    """

    def compute(self, state, vector, options):
        value, result, stats = self.inner.compute(state, vector, options)
        stagnated = result == lx.RESULTS.stagnation
        return value, lx.RESULTS.where(stagnated, lx.RESULTS.successful, result), stats


class KrylovCounter:
    """Host-side tally of the Krylov solves of the implicit stages, by kind.

    optimistix's Newton drops lineax's statistics, and a reverse-mode derivative
    cannot return any: so a solver given a counter (`NewtonKrylov(counter=...)`)
    reports each solve's iteration count to it from inside the compiled program
    (`jax.debug.callback`). The kinds are `"forward"` (the inexact Newton solves),
    `"tangent"` (forward-mode derivative solves) and `"transpose"` (the adjoint solves
    of reverse mode). A solver without a counter has no callback in its program (and
    so stays in JAX's persistent compilation cache); with one it is a separate
    program (the counter is a static field, compared by identity).

    `iterations` counts Krylov iterations (matrix-vector products with the stage
    Jacobian): lineax's GMRES checks convergence once per restart cycle, so a GMRES
    solve costs `cycles x restart` of them. BiCGStab reports its own iterations.

    ```python
    counter = simulators.KrylovCounter()
    solver = simulators.NewtonKrylov(counter=counter)
    ...  # run, differentiate
    counter.totals()  # {"forward": {"solves": 60, "iterations": 1200}, ...}
    ```
    """

    def __init__(self):
        self._solves: dict[str, int] = {}
        self._iterations: dict[str, int] = {}

    def record(self, kind: str, cycles, per_cycle: int) -> None:
        cycles = np.asarray(cycles)
        self._solves[kind] = self._solves.get(kind, 0) + int(cycles.size)
        total = int(cycles.sum()) * per_cycle
        self._iterations[kind] = self._iterations.get(kind, 0) + total

    def reset(self) -> None:
        self._solves.clear()
        self._iterations.clear()

    def totals(self) -> dict[str, dict[str, int]]:
        """`{kind: {"solves": n, "iterations": m}}` since creation or `reset`."""
        return {
            kind: {"solves": n, "iterations": self._iterations[kind]}
            for kind, n in sorted(self._solves.items())
        }

    def iterations_per_solve(self) -> dict[str, float]:
        return {
            kind: self._iterations[kind] / max(n, 1)
            for kind, n in sorted(self._solves.items())
        }


class Counted(DelegatingLinearSolver):
    """Reports every solve's iteration count to a `KrylovCounter` under `kind`."""

    counter: KrylovCounter = eqx.field(static=True)
    kind: str = eqx.field(static=True)

    def compute(self, state, vector, options):
        value, result, stats = self.inner.compute(state, vector, options)
        per_cycle = getattr(_innermost(self.inner), "restart", 1)
        per_cycle = min(per_cycle, sum(x.size for x in jax.tree.leaves(vector)))
        jax.debug.callback(
            functools.partial(self.counter.record, self.kind, per_cycle=per_cycle),
            stats["num_steps"],
        )
        return value, result, stats


def _innermost(solver):
    while isinstance(solver, DelegatingLinearSolver):
        solver = solver.inner
    return solver


_RAISING = contextvars.ContextVar("simulators_raising_solves", default=True)


@contextlib.contextmanager
def solves_without_raising():
    """Inside this context, `nan_tolerant_solve`s traced (and their derivative
    solves) return NaN where the solver fails instead of raising: no raising check,
    which is a host callback, in the program (JAX's persistent compilation cache
    stores no program holding one). `Simulator(check_finite=False)` traces its
    rollouts so; the caller then checks finiteness. It acts when a solve is traced:
    a `jax.jit` function already traced outside it is not traced again inside."""
    token = _RAISING.set(False)
    try:
        yield
    finally:
        _RAISING.reset(token)


def nan_tolerant_solve(operator, rhs, solver, preconditioner=None):
    """`A^{-1} rhs` for the lineax `operator` `A` by the lineax `solver`,
    differentiable to any order (`jax.lax.custom_linear_solve`: a tangent is one
    solve with `A`, a cotangent one with `A^T`, and `A`'s parameters are
    differentiated implicitly). A non-finite right-hand side, in the primal or in
    any derivative solve, gives a NaN solution instead of an error, so that a line
    search backs off from a trial step the model cannot integrate: lineax raises on
    a non-finite input, and a trial rollout that blows up late sends NaN cotangents
    back into the solves of its still-finite early steps. A finite right-hand side
    the solver cannot solve still raises, except inside `solves_without_raising`
    (read when the solve is traced), where it gives NaN too.

    `preconditioner`: a lineax operator approximating `A^{-1}` (transposed for
    the transpose solves)."""

    throw = _RAISING.get()

    def solve_with(operator, b, precondition):
        finite = jnp.all(jnp.isfinite(b))
        options = {} if precondition is None else {"preconditioner": precondition}
        solution = lx.linear_solve(
            operator, jnp.where(finite, b, 0.0), solver, options=options, throw=throw
        )
        if not throw:
            finite = finite & (solution.result == lx.RESULTS.successful)
        return jnp.where(finite, solution.value, jnp.nan)

    def forward(_, b):
        return solve_with(operator, b, preconditioner)

    def backward(_, b):
        transposed = None if preconditioner is None else preconditioner.T
        return solve_with(operator.T, b, transposed)

    return jax.lax.custom_linear_solve(
        operator.mv, rhs, forward, transpose_solve=backward
    )
