"""Variational analysis with a non-smooth prior of the initial state (sparsity,
total variation): the window problem's cost `J` plus `g(x_0)`, minimised by
accelerated proximal gradient (FISTA) or by ADMM, as analysers."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._analyser import CONVERGED, MAX_STEPS, NON_FINITE, AbstractAnalyser, Info
from ._priors import AbstractPrior
from ._problem import AbstractCostTerm, Analysis
from ._variational import Variational, incremental


def _dot(a, b):
    return sum(
        jnp.vdot(x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=False)
    )


def _norm(a):
    return jnp.sqrt(_dot(a, a))


def _axpy(alpha, x, y):
    return jax.tree.map(lambda a, b: alpha * a + b, x, y)


def _outcome(done, value):
    return jnp.where(
        ~jnp.isfinite(value), NON_FINITE, jnp.where(done, CONVERGED, MAX_STEPS)
    )


class Anchor(AbstractCostTerm):
    """`|x_0 - target|^2 / (2 std^2)`: ties the window's initial state to `target`
    (ADMM's augmented-Lagrangian term, with `std = penalty^{-1/2}`)."""

    target: Array
    std: Array = eqx.field(converter=jnp.asarray)

    def residual(self, trajectory, theta):
        del theta
        return (trajectory[0] - self.target) / self.std


class ProximalGradient(AbstractAnalyser):
    """The window problem's cost plus a non-smooth prior of the initial state,
    `F(x_0, theta, w) = J + g(x_0)`, minimised by FISTA (Beck & Teboulle, SIAM J.
    Imaging Sci. 2, 2009) with backtracking on the step and adaptive restart of the
    momentum (O'Donoghue & Candès, Found. Comput. Math. 15, 2015):

    `p = prox_{g / L}(y - grad J(y) / L)`, `L` doubled until
    `J(p) <= J(y) + <grad J(y), p - y> + L |p - y|^2 / 2`,
    `y <- p + (t_k - 1) / t_{k+1} (p - x_k)`.

    The iterate is the initial state itself (with the parameters and model-error
    forcings, which the prior leaves alone), so `B` enters through its whitening
    (`|x_0 - x_b|^2_{B^-1}`): pair the prior with a diagonal or weakly correlated
    `B`, the prior taking the role of a smooth `B`'s correlations. Converged when
    the gradient mapping `L |p - y|` has fallen by `rtol` from the background's.
    One compiled while loop per window.

    **Arguments:**

    - `prior`: an `AbstractPrior` (`TotalVariation`, `L1Prior`).
    - `max_steps`: iteration cap.
    - `rtol`: see above.
    """

    prior: AbstractPrior
    max_steps: int = eqx.field(static=True, default=200)
    rtol: float = eqx.field(static=True, default=1e-5)

    def __check_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0 < self.rtol < 1:
            raise ValueError(f"rtol must be in (0, 1), got {self.rtol}")

    def __call__(self, problem, window, background):
        problem.check_background(background)
        problem = problem.tolerating_blow_up()

        def smooth(y):
            return problem.cost(problem.control(y, background), window, background)

        value_and_grad = jax.value_and_grad(smooth)

        def prox(y, step):
            return Analysis(self.prior.prox(y.initial_state, step), y.theta, y.w)

        def total(y, value):
            return value + self.prior(y.initial_state)

        y0 = problem.analysis(problem.initial_control(window, background), background)
        f0, g0 = value_and_grad(y0)
        # The first Lipschitz estimate: a secant along a short gradient step.
        size = _norm(y0.initial_state) / np.sqrt(background.size)
        trial = _axpy(-1e-3 * jnp.maximum(size, 1e-3) / _norm(g0), g0, y0)
        _, g1 = value_and_grad(trial)
        diff = _norm(jax.tree.map(jnp.subtract, trial, y0))
        L0 = _norm(jax.tree.map(jnp.subtract, g1, g0)) / diff
        L0 = jnp.where(jnp.isfinite(L0) & (L0 > 0), L0, 1.0)
        nan = jnp.full(self.max_steps + 1, jnp.nan, f0.dtype)
        costs = nan.at[0].set(total(y0, f0))
        gnorms = nan

        def backtrack(y, fy, gy, L):
            def trial(L):
                p = prox(_axpy(-1 / L, gy, y), 1 / L)
                fp = smooth(p)
                step = jax.tree.map(jnp.subtract, p, y)
                bound = fy + _dot(gy, step) + 0.5 * L * _dot(step, step)
                return p, fp, ~(fp <= bound)

            def cond(carry):
                return carry[3] & (carry[4] < 60)

            def body(carry):
                L = 2 * carry[0]
                p, fp, bad = trial(L)
                return L, p, fp, bad, carry[4] + 1

            p, fp, bad = trial(L)
            L, p, fp, _, _ = jax.lax.while_loop(cond, body, (L, p, fp, bad, 0))
            return L, p, fp

        def cond(carry):
            k, done = carry[0], carry[6]
            return (~done) & (k < self.max_steps) & jnp.isfinite(carry[7][k])

        def body(carry):
            k, x, y, t, L, g_first, _, costs, gnorms = carry
            fy, gy = value_and_grad(y)
            # Let the step grow again (the curvature varies along a nonlinear path).
            L, p, fp = backtrack(y, fy, gy, 0.9 * L)
            mapping = L * _norm(jax.tree.map(jnp.subtract, p, y))
            g_first = jnp.where(k == 0, mapping, g_first)
            value = total(p, fp)
            # Adaptive restart: momentum off when the objective went up.
            restart = value > costs[k]
            t = jnp.where(restart, 1.0, t)
            t_new = (1 + jnp.sqrt(1 + 4 * t**2)) / 2
            y = _axpy((t - 1) / t_new, jax.tree.map(jnp.subtract, p, x), p)
            done = mapping <= self.rtol * g_first
            costs = costs.at[k + 1].set(value)
            gnorms = gnorms.at[k].set(mapping)
            return k + 1, p, y, t_new, L, g_first, done, costs, gnorms

        one = jnp.ones((), f0.dtype)
        carry = (0, y0, y0, one, L0, one, jnp.asarray(False), costs, gnorms)
        k, x, _, _, _, _, done, costs, gnorms = jax.lax.while_loop(cond, body, carry)
        return x, Info(jnp.asarray(k), _outcome(done, costs[k]), costs, gnorms)


class ADMM(AbstractAnalyser):
    """The window problem's cost plus a non-smooth prior of the initial state,
    minimised by ADMM (Boyd et al., Found. Trends Mach. Learn. 3, 2011) on the
    split `x_0 = z`:

    `x <- argmin J(x) + rho |x_0 - z + u|^2 / 2` (a 4D-Var solve of the window
    problem with an `Anchor` term, by `inner`, warm-started),
    `z <- prox_{g / rho}(x_0 + u)`, `u <- u + x_0 - z`,

    until the primal and dual residuals `|x_0 - z|`, `rho |z - z_prev|` fall
    below `atol sqrt(n) + rtol max(|x_0|, |z|)` and `atol sqrt(n) + rtol |rho u|`.
    The data term is solved by the data-assimilation solver (Gauss-Newton) and the
    prior only through its proximal operator; the analysis is the last `x`.

    With `adaptive` (the default) the penalty is balanced after each iteration
    (residual balancing, Boyd et al. section 3.4.1, on residuals relative to their
    tolerances' scales with the factor `sqrt(ratio)` as in Wohlberg, arXiv:
    1704.06209): when one relative residual exceeds ten times the other, `rho`
    is multiplied by the square root of their ratio (within 1e-2 and 1e2) and the
    scaled dual `u` divided by it, so that a poorly chosen `penalty` costs a few
    iterations instead of hundreds (on the tests' TV problem: 62-128 iterations
    from penalties 1-100, against 92-675 with the penalty fixed).

    **Arguments:**

    - `prior`: an `AbstractPrior`.
    - `penalty`: `rho`, in units of the prior's cost per squared state unit.
    - `inner`: the `x`-update's solver (default: 3 Gauss-Newton iterations of 20
      CG iterations each).
    - `max_steps`, `rtol`, `atol`: iteration cap and tolerances.
    - `adaptive`: residual balancing of the penalty.
    """

    prior: AbstractPrior
    penalty: float = eqx.field(static=True, default=1.0)
    inner: Variational = eqx.field(
        default_factory=lambda: Variational(incremental(), max_steps=3)
    )
    max_steps: int = eqx.field(static=True, default=100)
    rtol: float = eqx.field(static=True, default=1e-4)
    atol: float = eqx.field(static=True, default=1e-6)
    adaptive: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if not self.penalty > 0:
            raise ValueError(f"ADMM: penalty must be positive, got {self.penalty}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")

    def __call__(self, problem, window, background):
        problem.check_background(background)
        rho = jnp.asarray(self.penalty, background.dtype)
        root_n = np.sqrt(background.size)

        def objective(c):
            x0 = problem.analysis(c, background).initial_state
            return problem.cost(c, window, background) + self.prior(x0)

        c0 = problem.initial_control(window, background)
        z0 = background
        u0 = jnp.zeros_like(background)
        nan = jnp.full(self.max_steps + 1, jnp.nan, background.dtype)
        costs, gnorms = nan.at[0].set(objective(c0)), nan

        def cond(carry):
            k, done, costs = carry[0], carry[4], carry[5]
            return (~done) & (k < self.max_steps) & jnp.isfinite(costs[k])

        def body(carry):
            k, c, z, u, _, costs, gnorms, rho = carry
            anchored = problem.with_terms(Anchor(z - u, 1 / jnp.sqrt(rho)))
            c, _ = self.inner.solve(anchored, window, background, start=c)
            x0 = problem.analysis(c, background).initial_state
            z_new = self.prior.prox(x0 + u, 1 / rho)
            u = u + x0 - z_new
            primal = jnp.linalg.norm(x0 - z_new)
            dual = rho * jnp.linalg.norm(z_new - z)
            scale = jnp.maximum(jnp.linalg.norm(x0), jnp.linalg.norm(z_new))
            done = (primal <= self.atol * root_n + self.rtol * scale) & (
                dual <= self.atol * root_n + self.rtol * rho * jnp.linalg.norm(u)
            )
            costs = costs.at[k + 1].set(objective(c))
            gnorms = gnorms.at[k].set(primal)
            if self.adaptive:  # u is scaled by 1 / rho: rescaled with it
                tiny = jnp.finfo(background.dtype).tiny
                ratio = (primal / jnp.maximum(scale, tiny)) / jnp.maximum(
                    dual / jnp.maximum(rho * jnp.linalg.norm(u), tiny), tiny
                )
                factor = jnp.clip(jnp.sqrt(ratio), 0.01, 100.0)
                factor = jnp.where((ratio > 10) | (ratio < 0.1), factor, 1.0)
                rho, u = rho * factor, u / factor
            return k + 1, c, z_new, u, done, costs, gnorms, rho

        carry = (0, c0, z0, u0, jnp.asarray(False), costs, gnorms, rho)
        k, c, _, _, done, costs, gnorms, _ = jax.lax.while_loop(cond, body, carry)
        info = Info(jnp.asarray(k), _outcome(done, costs[k]), costs, gnorms)
        return problem.analysis(c, background), info
