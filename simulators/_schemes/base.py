import abc
from collections.abc import Callable

import equinox as eqx
from jaxtyping import Array

from .._model import AbstractModel
from .._solve import NewtonKrylov


class AbstractScheme(eqx.Module):
    """A one-step time-stepping scheme, written once against `AbstractModel`.

    `step(model, u, dt, correction)` advances `u` by `dt` and returns
    `(u_next, info)`, where `info` is a dict of scalar arrays (e.g. Newton iteration
    counts). `correction`, when given, is added to the model's tendency: inside the
    implicit solve for fully implicit schemes, to the explicit part for IMEX schemes.
    """

    @property
    @abc.abstractmethod
    def order(self) -> int:
        """Order of accuracy in time."""

    @abc.abstractmethod
    def step(
        self,
        model: AbstractModel,
        u: Array,
        dt: float | Array,
        correction: Callable | None = None,
    ) -> tuple[Array, dict[str, Array]]:
        """Advance `u` by one step of size `dt`."""

    @property
    def newton_krylov(self) -> NewtonKrylov | None:
        """The Newton-Krylov solver of the scheme's implicit stages, or `None` when
        the scheme has none (explicit, IMEX with a structured linear solve). A
        capability the scheme states: fully implicit stages are differentiable in
        reverse over reverse only, and can be made to return NaN on failure."""
        return None

    def with_newton_krylov(self, solver: NewtonKrylov) -> "AbstractScheme":
        """The scheme with its stage solver replaced (schemes without one: `self`)."""
        del solver
        return self
