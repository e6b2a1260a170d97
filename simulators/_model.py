"""The model interface that every time-stepping scheme is written against."""

import abc
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float

from ._grid import Grid
from ._linear import ScaleInvariant, nan_tolerant_solve


def is_concrete(x) -> bool:
    """True when `x` holds values now (not a tracer inside `jit`, `grad` or `vmap`)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x))


class AbstractModel(eqx.Module):
    """A semi-discretised PDE `du/dt = f(u) = L u + N(u)` on a grid.

    Models are equations; schemes combine their operators. A model provides

    - `linear(u)`: the stiff linear part `L u` (diffusion, hyperdiffusion, drag),
      treated implicitly by IMEX schemes;
    - `nonlinear(u)`: everything else `N(u)` (advection, forcing), treated explicitly
      by IMEX schemes;
    - `linear_inverse(rhs, eta)`: `(I - eta L)^{-1} rhs`, a structured solve (FFT or
      DST diagonalisation) where the operator allows;
    - `preconditioner(rhs, eta)`: a cheap structured approximation of
      `(I - eta J_f)^{-1}` used by the matrix-free Newton-Krylov solves of fully
      implicit schemes. It defaults to `linear_inverse`.

    The physical parameters are the model's array fields: a pytree that `jax.grad`
    differentiates like any other.
    """

    grid: eqx.AbstractVar[Grid]

    # `L` symmetric negative semidefinite (a diffusion) and `preconditioner`
    # symmetric positive definite: `I - eta L` is then SPD for `eta > 0`, and the
    # default `linear_inverse` runs preconditioned conjugate gradients, which test
    # convergence at every iteration, instead of GMRES (a full restart cycle).
    symmetric_linear: ClassVar[bool] = False

    @abc.abstractmethod
    def linear(self, u: Array) -> Array:
        """The stiff linear part `L u`."""

    @abc.abstractmethod
    def nonlinear(self, u: Array) -> Array:
        """The explicit part `N(u)`."""

    def tendency(self, u: Array) -> Array:
        """The full right-hand side `f(u) = L u + N(u)`."""
        return self.linear(u) + self.nonlinear(u)

    def linear_inverse(self, rhs: Array, eta: float | Array) -> Array:
        """`(I - eta L)^{-1} rhs`.

        The default is a matrix-free Krylov solve (lineax) preconditioned by
        `preconditioner`, differentiated implicitly (a solve per tangent, a
        transpose solve per cotangent): conjugate gradients where the model declares
        `symmetric_linear`, GMRES otherwise. Models with a diagonalisable `L`
        override it with an exact structured solve. A non-finite
        `rhs` (a state that already blew up, e.g. a
        line-search trial), or a non-finite tangent or cotangent in a derivative
        solve, gives a NaN solution, not an error, so that an optimiser can back off
        (`nan_tolerant_solve`); a finite `rhs` that GMRES cannot solve still raises.
        """
        # The preconditioner changes the iterates, not the solution: no tangents.
        frozen, frozen_eta = jax.lax.stop_gradient((self, eta))
        tol = _tolerance(rhs.dtype) * 0.1  # 1e-6 in float32: reachable
        # Tolerances relative to the size of rhs: a fixed atol is below round-off
        # for a large rhs (e.g. an L-BFGS trial step), where GMRES stagnates.
        if self.symmetric_linear:
            tags = frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})
            krylov = lx.CG(rtol=tol, atol=tol, max_steps=2000)
        else:
            tags = frozenset()
            krylov = lx.GMRES(rtol=tol, atol=tol, restart=20, max_steps=2000)
        structure = jax.eval_shape(lambda: rhs)
        operator = lx.FunctionLinearOperator(
            lambda v: v - eta * self.linear(v), structure, tags
        )
        preconditioner = lx.FunctionLinearOperator(
            lambda v: frozen.preconditioner(v, frozen_eta), structure, tags
        )
        return nan_tolerant_solve(operator, rhs, ScaleInvariant(krylov), preconditioner)

    def preconditioner(self, rhs: Array, eta: float | Array) -> Array:
        """A cheap structured approximation of `(I - eta J_f)^{-1} rhs`.

        Used to precondition the Krylov solves (right preconditioning in the Newton
        solves of fully implicit schemes). It must be linear in `rhs`; models whose
        `linear_inverse` is an exact structured solve return it here. The default is
        the identity.
        """
        del eta
        return rhs

    def check_state(self, u, finite: bool = True) -> Float[Array, "..."]:
        """Validate a state: array, floating dtype, the grid's shape, finite values.

        Shape and dtype errors raise `ValueError` at trace time; non-finite values
        raise through `eqx.error_if` (inside `jit` as well), unless `finite=False`.
        """
        if not (hasattr(u, "shape") and hasattr(u, "dtype")):
            raise TypeError(f"state must be an array, got {type(u).__name__}")
        u = jnp.asarray(u)
        if u.shape != self.grid.shape:
            raise ValueError(
                f"state has shape {u.shape} but the grid of {type(self).__name__} "
                f"has shape {self.grid.shape}"
            )
        if not jnp.issubdtype(u.dtype, jnp.floating):
            raise TypeError(f"state must have a floating dtype, got {u.dtype}")
        if not finite:  # the caller checks (no host callback in the program)
            return u
        return eqx.error_if(
            u, ~jnp.all(jnp.isfinite(u)), "state contains non-finite values (NaN/inf)"
        )


class AbstractSpectralModel(AbstractModel):
    """A periodic model whose stiff part `L` is diagonal in Fourier space.

    Concrete models give `linear_symbol()` (the eigenvalues of `L` in `grid.fft`
    space) and `nonlinear_spectral(u_hat)`; `linear`, `nonlinear`, the exact
    `linear_inverse` and the preconditioner follow, and IMEX schemes step the Fourier
    coefficients directly.
    """

    @abc.abstractmethod
    def linear_symbol(self) -> Array:
        """Eigenvalues of `L` in `grid.fft` space."""

    @abc.abstractmethod
    def nonlinear_spectral(self, u_hat: Array) -> Array:
        """`N` on Fourier coefficients."""

    def linear(self, u):
        return self.grid.ifft(self.linear_symbol() * self.grid.fft(u))

    def nonlinear(self, u):
        return self.grid.ifft(self.nonlinear_spectral(self.grid.fft(u)))

    def linear_inverse(self, rhs, eta):
        return self.grid.ifft(self.grid.fft(rhs) / (1 - eta * self.linear_symbol()))

    def preconditioner(self, rhs, eta):
        return self.linear_inverse(rhs, eta)


def _tolerance(dtype) -> float:
    """Default solve tolerance for a dtype: loose enough to be reachable."""
    return 1e-11 if jnp.dtype(dtype) == jnp.float64 else 1e-5


def corrected_tendency(model: AbstractModel, correction: Callable | None):
    """`u -> f(u) + c(u)`: the tendency with a learned correction, if any."""
    if correction is None:
        return model.tendency
    return lambda u: model.tendency(u) + correction(u)
