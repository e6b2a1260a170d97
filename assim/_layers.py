"""Unrolled Gauss-Newton and unrolled ADMM: the data-assimilation solver and the
splitting method for non-smooth priors as trainable layers on the window problem."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, Float, PyTree

from ._analyser import Info, fixed_steps_info
from ._networks import ProximalPrior
from ._observations import ObservationSet
from ._priors import AbstractPrior
from ._problem import SPD_TAGS, Analysis, Control, WindowProblem
from ._proximal import Anchor
from ._unrolled import AbstractWindowNet
from ._variational import TruncatedCG


def gauss_newton_step(
    problem: WindowProblem,
    control: Control,
    window: ObservationSet,
    background: Array,
    damping,
    *,
    cg_steps: int,
    cg_rtol: float,
) -> Control:
    """The damped Gauss-Newton (Levenberg-Marquardt) step of the window cost in the
    state controls `(v, w)` (the parameters held), `(I + G^T G + mu I) d =
    -grad J`, solved matrix-free by lineax CG truncated after `cg_steps`
    iterations (or at `cg_rtol`). Differentiable: lineax differentiates the solve
    implicitly (exact where CG has converged)."""
    grad = eqx.filter_grad(problem.cost)(control, window, background)
    hessian = problem.gauss_newton(control, window, background)

    def damped(c):
        return jax.tree.map(lambda h, x: h + damping * x, hessian.mv(c), c)

    operator = lx.FunctionLinearOperator(damped, hessian.in_structure(), SPD_TAGS)
    rhs = Control(-grad.v, None, None if grad.w is None else -grad.w)
    solver = TruncatedCG(lx.CG(rtol=cg_rtol, atol=0.0, max_steps=cg_steps))
    return lx.linear_solve(operator, rhs, solver, throw=False).value


def _plus(control: Control, alpha, step: Control) -> Control:
    w = None if control.w is None else control.w + alpha * step.w
    return Control(control.v + alpha * step.v, control.theta, w)


class UnrolledGaussNewton(AbstractWindowNet):
    """Unrolled incremental 4D-Var: each of the `K` layers is one damped
    Gauss-Newton step on the window problem's cost,

    `c_{k+1} = c_k + alpha_k d_k`, `(I + G^T G + mu_k I) d_k = -grad J(c_k)`,

    in the whitened state controls (`v`, and `w` of a weak-constraint problem),
    with `cg_steps` CG iterations per layer and a learned step `alpha_k` and
    damping `mu_k` per layer (a Levenberg-Marquardt schedule: large damping where
    the linearisation is poor, e.g. a misspecified model). Physical parameters and a
    model-error correction are learned as for `UnrolledVar`. Untrained (`alpha = 1`,
    `mu` small) it is classical incremental 4D-Var with a fixed number of outer
    loops.

    **Arguments:**

    - `n_layers`: `K`.
    - `step`, `damping`: initial `alpha` and `mu` (positive).
    - `cg_steps`, `cg_rtol`: each layer's CG iterations and tolerance.
    - `theta`, `correction`, `scale`: as `UnrolledVar`'s.
    """

    log_step: Float[Array, " K"]
    log_damping: Float[Array, " K"]
    theta: PyTree[Array] | None
    correction: eqx.Module | None
    scale: float = eqx.field(static=True)
    cg_steps: int = eqx.field(static=True)
    cg_rtol: float = eqx.field(static=True)

    def __init__(
        self,
        n_layers: int,
        *,
        step: float = 1.0,
        damping: float = 1e-3,
        cg_steps: int = 10,
        cg_rtol: float = 1e-6,
        theta: PyTree[Array] | None = None,
        correction: eqx.Module | None = None,
        scale: float = 1.0,
    ):
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if not (step > 0 and damping > 0):
            raise ValueError("step and damping must be positive")
        if cg_steps < 1:
            raise ValueError(f"cg_steps must be >= 1, got {cg_steps}")
        dtype = jnp.zeros(()).dtype
        self.log_step = jnp.full((n_layers,), np.log(step), dtype)
        self.log_damping = jnp.full((n_layers,), np.log(damping), dtype)
        self.theta = theta
        self.correction = correction
        self.scale = float(scale)
        self.cg_steps = int(cg_steps)
        self.cg_rtol = float(cg_rtol)

    @property
    def n_layers(self) -> int:
        return self.log_step.shape[0]

    def trainable(self):
        return self._learned_spec(
            lambda m: (m.log_step, m.log_damping, m.theta, m.correction)
        )

    def __call__(
        self, problem: WindowProblem, window: ObservationSet, background: Array
    ) -> tuple[Analysis, Info]:
        theta = self.parameters(problem)
        problem = self.model_problem(problem)
        control = problem.initial_control(window, background)

        def layer(c, k):
            d = gauss_newton_step(
                problem,
                c,
                window,
                background,
                jnp.exp(self.log_damping[k]),
                cg_steps=self.cg_steps,
                cg_rtol=self.cg_rtol,
            )
            return _plus(c, jnp.exp(self.log_step[k]), d), None

        control, _ = jax.lax.scan(layer, control, jnp.arange(self.n_layers))
        analysis = problem.analysis(control, background)
        return Analysis(analysis.initial_state, theta, analysis.w), fixed_steps_info(
            self.n_layers
        )


class UnrolledADMM(AbstractWindowNet):
    """Unrolled ADMM on the split `x_0 = z` of the window cost and a prior: each of
    the `K` layers is

    `x <- x + d` (one damped Gauss-Newton step on `J + rho_k |x_0 - z + u|^2 / 2`),
    `z <- P_k(x_0 + u)`, `u <- u + x_0 - z`,

    with a learned penalty `rho_k` per layer, and `P_k` the proximal operator
    `prox_{(s_k / rho_k) g}` of a classical prior (`TotalVariation`, `L1Prior`)
    with a learned weight `s_k`, or a learned proximal network (`ProximalPrior`,
    weighted by `s_k`). The analysis is the last `x`.

    **Arguments:**

    - `n_layers`: `K`.
    - `prior`: an `AbstractPrior` or a `ProximalPrior`.
    - `penalty`: initial `rho` (positive); `prior_weight`: initial `s`.
    - `damping`, `cg_steps`, `cg_rtol`: the `x`-update's Gauss-Newton step.
    - `theta`, `correction`, `scale`: as `UnrolledVar`'s.
    """

    log_penalty: Float[Array, " K"]
    log_prior_weight: Float[Array, " K"]
    prior: AbstractPrior | ProximalPrior
    theta: PyTree[Array] | None
    correction: eqx.Module | None
    scale: float = eqx.field(static=True)
    damping: float = eqx.field(static=True)
    cg_steps: int = eqx.field(static=True)
    cg_rtol: float = eqx.field(static=True)

    def __init__(
        self,
        n_layers: int,
        prior: AbstractPrior | ProximalPrior,
        *,
        penalty: float = 1.0,
        prior_weight: float = 1.0,
        damping: float = 1e-3,
        cg_steps: int = 10,
        cg_rtol: float = 1e-6,
        theta: PyTree[Array] | None = None,
        correction: eqx.Module | None = None,
        scale: float = 1.0,
    ):
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if not (penalty > 0 and prior_weight > 0):
            raise ValueError("penalty and prior_weight must be positive")
        if not isinstance(prior, (AbstractPrior, ProximalPrior)):
            raise TypeError(
                "UnrolledADMM's prior is an AbstractPrior or a ProximalPrior, got "
                f"{type(prior).__name__}"
            )
        dtype = jnp.zeros(()).dtype
        self.log_penalty = jnp.full((n_layers,), np.log(penalty), dtype)
        self.log_prior_weight = jnp.full((n_layers,), np.log(prior_weight), dtype)
        self.prior = prior
        self.theta = theta
        self.correction = correction
        self.scale = float(scale)
        self.damping = float(damping)
        self.cg_steps = int(cg_steps)
        self.cg_rtol = float(cg_rtol)

    @property
    def n_layers(self) -> int:
        return self.log_penalty.shape[0]

    def trainable(self):
        return self._learned_spec(
            lambda m: (
                m.log_penalty,
                m.log_prior_weight,
                m.prior,
                m.theta,
                m.correction,
            )
        )

    def _prox(self, x, k, rho):
        weight = jnp.exp(self.log_prior_weight[k])
        if isinstance(self.prior, ProximalPrior):
            return self.prior(x, weight)
        return self.prior.prox(x, weight / rho)

    def __call__(self, problem, window, background):
        theta = self.parameters(problem)
        problem = self.model_problem(problem)
        control = problem.initial_control(window, background)

        def layer(carry, k):
            c, z, u = carry
            rho = jnp.exp(self.log_penalty[k])
            anchored = problem.with_terms(Anchor(z - u, 1 / jnp.sqrt(rho)))
            d = gauss_newton_step(
                anchored,
                c,
                window,
                background,
                self.damping,
                cg_steps=self.cg_steps,
                cg_rtol=self.cg_rtol,
            )
            c = _plus(c, 1.0, d)
            x0 = problem.analysis(c, background).initial_state
            z = self._prox(x0 + u, k, rho)
            return (c, z, u + x0 - z), None

        carry = (control, background, jnp.zeros_like(background))
        (control, _, _), _ = jax.lax.scan(layer, carry, jnp.arange(self.n_layers))
        analysis = problem.analysis(control, background)
        return Analysis(analysis.initial_state, theta, analysis.w), fixed_steps_info(
            self.n_layers
        )
