"""lineax solvers that wrap another: the building blocks of the stage solves, and of
solvers that change how a wrapped solver's result is read (e.g. truncated CG)."""

import jax
import jax.numpy as jnp
import lineax as lx


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
