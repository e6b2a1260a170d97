"""Matrix-free Newton-Krylov solves of implicit stages, differentiated implicitly."""

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
from jaxtyping import Array, Int

from ._linear import Counted, Inexact, KrylovCounter, ScaleInvariant
from ._model import AbstractModel, _tolerance, corrected_tendency, is_concrete


def _krylov(kind: str, rtol: float, atol: float, max_steps: int, restart: int):
    if kind == "gmres":
        return lx.GMRES(rtol=rtol, atol=atol, restart=restart, max_steps=max_steps)
    return lx.BiCGStab(rtol=rtol, atol=atol, max_steps=max_steps)


class NewtonKrylov(eqx.Module):
    """Matrix-free Newton-Krylov solver for an implicit stage `v - eta f(v) = rhs`.

    Right-preconditioned: with `P` the model's structured `preconditioner` (an
    approximation of `(I - eta J_f)^{-1}`), it solves
    `F(z) = P z - eta f(P z) - rhs = 0`
    for `z` with `optimistix.Newton` whose linear solves are lineax Krylov solves on the
    Jacobian-vector product, and returns `v = P z`. No matrix is formed.

    The gradient comes from the implicit function theorem: one matrix-free Krylov
    transpose solve per stage, whatever the number of Newton or Krylov iterations;
    derivatives of any order and mode but forward over reverse (`_implicit_root`).
    `adjoint="unrolled"` instead differentiates through the Newton iterations
    (checkpointed); it exists to verify the implicit gradient and costs memory that
    grows with the iterations.

    A solve that does not converge raises an error (`throw=True`): a non-converged
    solve would make the implicit gradient wrong.

    **Arguments:**

    - `rtol`, `atol`: Newton tolerances (Cauchy termination); `None` picks 1e-10 for
      float64 and 1e-5 for float32. Both are floored at the stage's round-off
      (`_RoundOff`: a stiff stage, a state in large units), where they would
      otherwise ask for more than the arithmetic holds.
    - `max_steps`: maximum Newton iterations.
    - `krylov`: `"gmres"` or `"bicgstab"`. BiCGStab tests convergence at every
      iteration (two Jacobian products each) but needs `jax_enable_x64` (any state
      dtype): without it lineax tests breakdown by `rho, alpha, omega < 1e-16`,
      which a negative value of these (valid for a non-symmetric stage) meets: the
      solve fails wherever one turns negative, so it is refused there.
    - `krylov_tol`: relative tolerance of the inner Krylov solves (inexact Newton,
      Dembo, Eisenstat & Steihaug 1982): 1e-2 gains two digits per Newton step at a
      fraction of the cost of an exact solve.
    - `adjoint_tol`: tolerance of the tangent / transpose solves of the implicit
      adjoint, relative to the largest entry of their right-hand side (which can have
      any magnitude), which sets the derivatives' accuracy; `None` is the Newton
      tolerance (consistent with the forward's accuracy: in float64 the adjoint
      dot-product test still holds to 1e-10).
    - `krylov_max_steps`, `restart`: Krylov iteration cap and GMRES restart length.
      lineax checks convergence once per restart cycle, so a solve costs whole
      cycles: 5 (the default) costs fewer iterations than 10 where the preconditioned
      stage needs ~10-15 (Burgers, the bundled advection-diffusion: 35-45% fewer
      iterations, forward and gradient 15-30% faster; docs/results.md).
    - `adjoint`: `"implicit"` (default) or `"unrolled"`.
    - `throw`: `False` returns NaN for a stage whose solve fails instead of raising,
      and its derivatives' solves do not raise either: for optimisers whose line
      search backs off from an infinite cost (`Simulator(check_finite=False)` sets
      it).
    - `counter`: a `KrylovCounter` that tallies the Krylov iterations of the forward,
      tangent and transpose solves (a host callback per solve; `None`: none).
    """

    rtol: float | None = None
    atol: float | None = None
    max_steps: int = eqx.field(static=True, default=50)
    krylov: Literal["gmres", "bicgstab"] = eqx.field(static=True, default="gmres")
    krylov_tol: float = 1e-2
    adjoint_tol: float | None = None
    krylov_max_steps: int = eqx.field(static=True, default=300)
    restart: int = eqx.field(static=True, default=5)
    adjoint: Literal["implicit", "unrolled"] = eqx.field(
        static=True, default="implicit"
    )
    throw: bool = eqx.field(static=True, default=True)
    counter: KrylovCounter | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        for name in ("rtol", "atol", "krylov_tol", "adjoint_tol"):
            value = getattr(self, name)
            # (a traced tolerance, e.g. a simulator passed to `jax.jit`, is not
            # checked: it was when the solver was built)
            if value is not None and is_concrete(value) and not value > 0:
                raise ValueError(f"NewtonKrylov.{name} must be positive, got {value}")
        if self.krylov not in ("gmres", "bicgstab"):
            raise ValueError(f"krylov must be 'gmres' or 'bicgstab', got {self.krylov}")
        if self.adjoint not in ("implicit", "unrolled"):
            raise ValueError(
                f"adjoint must be 'implicit' or 'unrolled', got {self.adjoint}"
            )

    def solve(
        self,
        model: AbstractModel,
        correction: Callable | None,
        rhs: Array,
        eta: float | Array,
    ) -> tuple[Array, Int[Array, ""]]:
        """Solve `v - eta (f(v) + c(v)) = rhs` for `v`.

        **Arguments:**

        - `model`: supplies `tendency` and `preconditioner`.
        - `correction`: optional callable added to the tendency (learned model error).
        - `rhs`: right-hand side, the grid's shape.
        - `eta`: the implicit coefficient (e.g. `theta * dt`).

        **Returns:** `(v, newton_steps)`.
        """
        if self.krylov == "bicgstab" and not jax.config.jax_enable_x64:
            raise ValueError(
                "NewtonKrylov(krylov='bicgstab') needs jax_enable_x64 (the CLIs' "
                "float64=true): without it lineax's BiCGStab takes a negative inner "
                "product, a valid step on a non-symmetric stage, for a breakdown; "
                "use krylov='gmres'"
            )
        default = _tolerance(rhs.dtype)
        rtol = default if self.rtol is None else self.rtol
        atol = default if self.atol is None else self.atol
        # The derivative solves need no more accuracy than the stage itself has:
        # an adjoint solved 10x tighter than the forward Newton costs a third more
        # Krylov iterations for digits the forward solution does not hold.
        adj_tol = min(rtol, atol) if self.adjoint_tol is None else self.adjoint_tol
        steps, restart = self.krylov_max_steps, self.restart

        def newton(round_off):
            # The inner absolute tolerance stays below the Newton one, so that a
            # small residual still gets a Newton step.
            newton_atol = round_off.step_atol
            inner = _krylov(
                self.krylov, self.krylov_tol, 0.1 * newton_atol, steps, restart
            )
            return optx.Newton(
                round_off.floor_relative(rtol),
                newton_atol,
                linear_solver=Inexact(self._counted(inner, "forward")),
            )

        round_off = _round_off(model, correction, rhs, eta, atol)
        args = (model, correction, rhs, eta, round_off)
        if self.adjoint == "implicit":
            derivative = _krylov(self.krylov, adj_tol, adj_tol, steps, restart)
            solvers = {
                kind: ScaleInvariant(self._counted(derivative, kind))
                for kind in ("tangent", "transpose")
            }
            z, n_steps = _implicit_root(
                newton, solvers, self.max_steps, args, self.throw
            )
        else:
            sol = optx.root_find(
                _stage_residual,
                newton(args[-1]),
                rhs,
                args=args,
                max_steps=self.max_steps,
                adjoint=optx.RecursiveCheckpointAdjoint(),
                throw=self.throw,
            )
            z, n_steps = _nan_if_failed(sol), sol.stats["num_steps"]
        return model.preconditioner(z, eta), n_steps

    def _counted(self, solver, kind: str):
        if self.counter is None:
            return solver
        return Counted(solver, self.counter, kind)


def _nan_if_failed(sol: optx.Solution) -> Array:
    failed = sol.result != optx.RESULTS.successful
    return jnp.where(failed, jnp.nan, sol.value)


def _implicit_root(newton, linear_solvers, max_steps: int, args, throw: bool = True):
    """`(z, Newton steps)` with `_stage_residual(z, args) = 0`, differentiated by the
    implicit function theorem, to any order and in both modes.

    Forward mode (`custom_jvp`): one tangent solve `F_z dz = -F_args dargs`. Reverse
    mode comes from transposing it: one transpose solve. This is what
    `optimistix.ImplicitAdjoint` does, but inside a `lax.scan` (the time loop) JAX's
    partial evaluation inlines a `custom_jvp` whose inputs are unknown and so drops
    its rule when a reverse-mode derivative is itself differentiated in reverse (the
    training of an unrolled network, whose layers hold the cost's gradient): it then
    reaches the Newton while loop, which has no transpose. The primal is therefore
    also a `custom_vjp` (one transpose solve, itself differentiable: lineax solves
    have derivative rules) that partial evaluation keeps. Forward over reverse still
    reaches that `custom_vjp` and is refused by JAX.

    The Newton solve is rematerialised (`jax.checkpoint`): without it JAX (0.10)
    hands the `custom_vjp`'s backward pass misaligned residuals inside a scan.

    `newton(round_off)`: the optimistix root finder, built from the stage's
    round-off (the last of `args`, a traced value: it travels with the arguments
    rather than being closed over by the custom rules). `linear_solvers`:
    `{"tangent": ..., "transpose": ...}`, the lineax solvers of the derivative
    solves. `throw=False`: a failed solve gives NaN, and the derivative solves do
    not raise.
    """
    dynamic, static = eqx.partition(args, eqx.is_array)

    def residual(z, dyn):
        return _stage_residual(z, eqx.combine(dyn, static))

    @jax.checkpoint
    def solve_stage(dyn):
        _, _, rhs, _, round_off = eqx.combine(dyn, static)
        sol = optx.root_find(
            residual, newton(round_off), rhs, dyn, max_steps=max_steps, throw=throw
        )
        return _nan_if_failed(sol), sol.stats["num_steps"]

    def no_tangent(n_steps):
        return np.zeros(jnp.shape(n_steps), jax.dtypes.float0)

    @jax.custom_vjp
    def root_vjp(dyn):
        return solve_stage(dyn)

    def root_fwd(dyn):
        z, n_steps = root_vjp(dyn)
        return (z, n_steps), (z, dyn)

    def stage_solve(z, dyn, vector, *, transpose: bool):
        """Solve with the stage Jacobian `F_z` (or its transpose) at `z`. With
        `throw=False` and a failed (NaN) `z`: zero, and no solve sees a non-finite
        input, in either direction (lineax's transpose of a solve raises on one
        whatever `throw` says). The primal is NaN then: a cost built on it is
        infinite and a line search backs off."""

        def lineax_solve(z, vector):
            operator = lx.JacobianLinearOperator(residual, z, dyn)
            operator = operator.T if transpose else operator
            solver = linear_solvers["transpose"]
            return lx.linear_solve(operator, vector, solver, throw=throw).value

        def solve(z, vector):
            if transpose:
                return lineax_solve(z, vector)
            # The tangent solve as `lax.custom_linear_solve`, whose transpose (the
            # adjoint solve of reverse mode) is the transposed lineax solve below,
            # with `throw` as configured: lineax's own transpose rule always
            # raises on failure, through a host callback, and JAX never caches a
            # compiled program that holds one.
            structure = jax.eval_shape(lambda: vector)

            def matvec(v):
                return jax.jvp(lambda zz: residual(zz, dyn), (z,), (v,))[1]

            def forward(mv, b):
                operator = lx.FunctionLinearOperator(mv, structure)
                solver = linear_solvers["tangent"]
                return lx.linear_solve(operator, b, solver, throw=throw).value

            def backward(vm, b):
                operator = lx.FunctionLinearOperator(vm, structure)
                solver = linear_solvers["transpose"]
                return lx.linear_solve(operator, b, solver, throw=throw).value

            return jax.lax.custom_linear_solve(
                matvec, vector, forward, transpose_solve=backward
            )

        if throw:
            return solve(z, vector)
        failed = ~jnp.all(jnp.isfinite(z))

        def clean(tree):
            return jax.tree.map(lambda a: jnp.where(failed, 0.0, a), tree)

        return clean(solve(jnp.where(failed, 0.0, z), clean(vector)))

    def root_bwd(res, cotangents):
        z, dyn = res
        ct_z, _ = cotangents
        lam = stage_solve(z, dyn, ct_z, transpose=True)
        _, vjp = jax.vjp(lambda d: residual(z, d), dyn)
        (ct_dyn,) = vjp(-lam)
        return (ct_dyn,)

    root_vjp.defvjp(root_fwd, root_bwd)

    @jax.custom_jvp
    def root(dyn):
        return root_vjp(dyn)

    def root_jvp(primals, tangents):
        ((dyn,), (t_dyn,)) = primals, tangents
        z, n_steps = root(dyn)
        # Symbolic zeros: only the inputs with tangents are differentiated (instantiated
        # zeros for the model's constants double the cost of a tangent-linear rollout).
        nonzero = jax.tree.map(lambda t: not _is_zero(t), t_dyn, is_leaf=_is_zero)
        diff, fixed = eqx.partition(dyn, nonzero)
        t_diff = eqx.filter(t_dyn, nonzero, is_leaf=_is_zero)
        _, t_residual = jax.jvp(
            lambda d: residual(z, eqx.combine(d, fixed)), (diff,), (t_diff,)
        )
        t_z = -stage_solve(z, dyn, t_residual, transpose=False)
        return (z, n_steps), (t_z, no_tangent(n_steps))

    root.defjvp(root_jvp, symbolic_zeros=True)

    return root(dynamic)


def _is_zero(tangent) -> bool:
    return isinstance(tangent, jax.custom_derivatives.SymbolicZero)


class _RoundOff(eqx.Module):
    """The size of a stage's round-off, below which Newton's tests are not asked
    to go.

    optimistix's Newton tests the step against `atol + rtol |z|` component-wise and
    the residual against `atol` alone (Cauchy termination: its rtol is ignored in
    residual space). Both can sit below what the arithmetic reaches, and Newton
    then stagnates to its iteration cap: the round-off of `v - eta f(v)` is about
    `eps (1 + eta |J_f|) |v|` (a stiff stencil's terms cancel), above float32's
    1e-5 at `eta kappa / dx^2` = 6.6 (the bundled model at 128^2), for a state in
    kelvin, or for a state grown far beyond the right-hand side (a large forcing
    times a long step), and above float64's 1e-10 once the state's size times the
    stiffness passes ~4.5e4 (kelvin at 512^2); and the steps' round-off, about
    `eps (1 + eta |J_f|) max|z|` on every component, exceeds `atol` where `z`
    crosses zero.

    `relative` is ten times `eps (1 + eta |J_f|)`, `|J_f|` (of the tendency plus
    the learned correction, whose stiffness the model's preconditioner does not
    know of either) probed once per solve by one Jacobian-vector product with a
    fixed pseudo-random vector. Newton's `rtol` is floored at `relative`, its
    `atol` at `relative` times the state's size (the right-hand side's largest
    entry, at least 1), and its residual test at `relative` times the larger of
    that size and the iterate's: the residual is divided by a constant (per
    iterate) that moves this floor onto Newton's `atol`, which leaves its steps
    and root unchanged, and so the gradient. Where the round-off is below the
    tolerances nothing changes. No derivative flows through it. (The derivative
    solves test a residual relative to their right-hand side, `ScaleInvariant`,
    and reached it in every case tried.)
    """

    relative: Array
    atol: float | Array
    size: Array

    @property
    def step_atol(self):
        """Newton's `atol`, that of its step test (and of its residual test once
        the residual is divided by `residual_scale`)."""
        return jnp.maximum(self.atol, self.relative * self.size)

    def floor_relative(self, tol):
        return jnp.maximum(tol, self.relative)

    def residual_scale(self, v: Array) -> Array:
        """`|F| / scale < step_atol` is `|F| < max(atol, relative max(size, |v|))`."""
        size = jnp.maximum(self.size, jnp.max(jnp.abs(v)))
        scale = jnp.maximum(self.atol, self.relative * size) / self.step_atol
        # (a failed, non-finite iterate: 1, so that a zero cotangent stays zero)
        return jax.lax.stop_gradient(jnp.where(jnp.isfinite(scale), scale, 1))


def _round_off(model, correction, rhs, eta, atol) -> _RoundOff:
    # No tangents traced (of the arrays only: a learned correction holds functions).
    arrays, static = eqx.partition((model, correction, rhs, eta), eqx.is_inexact_array)
    model, correction, rhs, eta = eqx.combine(jax.lax.stop_gradient(arrays), static)
    # A fixed broadband pattern in [-1, 1) from the grid index (a hash, not a PRNG:
    # threefry in every stage solve costs a third more compilation).
    index = jnp.arange(rhs.size, dtype=rhs.dtype).reshape(rhs.shape)
    hashed = jnp.sin(index * 12.9898) * 43758.5453
    probe = 2 * (hashed - jnp.floor(hashed)) - 1
    _, stiff = jax.jvp(corrected_tendency(model, correction), (rhs,), (probe,))
    relative = 10 * jnp.finfo(rhs.dtype).eps * (1 + jnp.max(jnp.abs(eta * stiff)))
    # (a non-finite probe, e.g. a blown-up state: no floor; the solve fails anyway)
    relative = jnp.where(jnp.isfinite(relative), relative, 0)
    size = jnp.maximum(1, jnp.max(jnp.abs(rhs)))
    return _RoundOff(relative, atol, jnp.where(jnp.isfinite(size), size, 1))


def _stage_residual(z, args):
    model, correction, rhs, eta, round_off = args
    v = model.preconditioner(z, eta)
    f = corrected_tendency(model, correction)(v)
    return (v - eta * f - rhs) / round_off.residual_scale(v)
