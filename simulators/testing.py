"""Gradient checks a user runs on their own model, one call each, as operational
systems check theirs: a tangent-linear Taylor test, a Taylor test of the gradient,
an adjoint dot-product test, and implicit-function-theorem gradients against
differentiating through the Newton iterations. Each returns what it measured
(remainders and their observed orders, the relative error) and whether it passed;
run them in float64 (`jax.config.update("jax_enable_x64", True)`).

```python
import simulators as sim
from simulators import testing

simulator = sim.Simulator(MyModel(...), sim.backward_euler(), 0.01)
u0 = ...  # a typical state
print(testing.check_simulator(simulator, u0))
```
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._simulator import Simulator

# h = 1e-2 / 2^k, k = 0..3: small enough to be asymptotic for smooth models, large
# enough that float64 round-off (~1e-16 / h^2 relative) stays far below the
# second-order remainder.
DEFAULT_STEPS = tuple(1e-2 * 0.5 ** np.arange(4))


def _dot(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return sum(jnp.vdot(p, q) for p, q in pairs)


def _norm(a):
    return jnp.sqrt(sum(jnp.sum(jnp.abs(leaf) ** 2) for leaf in jax.tree.leaves(a)))


def random_like(tree, key):
    """A standard normal pytree of `tree`'s structure (its inexact array leaves)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    draws = [
        jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, draws)


def observed_orders(steps, remainders) -> np.ndarray:
    """Successive convergence rates `log(r_i / r_{i+1}) / log(h_i / h_{i+1})`."""
    steps, remainders = np.asarray(steps), np.asarray(remainders)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(remainders[:-1] / remainders[1:]) / np.log(steps[:-1] / steps[1:])


@dataclasses.dataclass(frozen=True)
class TaylorResult:
    """A Taylor test's measurements.

    - `steps`: the step sizes `h`.
    - `first_order`: `|f(x + h d) - f(x)|`, which decays like `h`.
    - `second_order`: the remainder after the linear term, which decays like
      `h^2` when the derivative is right (like `h` when it is wrong).
    - `orders`: the observed orders of `second_order`.
    - `passed`: every observed order above `min_order`.
    """

    steps: np.ndarray
    first_order: np.ndarray
    second_order: np.ndarray
    orders: np.ndarray
    passed: bool

    def __str__(self):
        orders = ", ".join(f"{o:.2f}" for o in self.orders)
        verdict = "passed" if self.passed else "FAILED"
        return f"Taylor test {verdict}: second-order remainder orders {orders}"


def _taylor(values, steps, min_order) -> TaylorResult:
    steps = np.asarray(steps, np.float64)
    first = np.array([float(v[0]) for v in values])
    second = np.array([float(v[1]) for v in values])
    orders = observed_orders(steps, second)
    # A remainder at round-off (a linear function) is exact, not a failure.
    exact = np.all(second <= 1e-13 * np.maximum(first, 1e-300))
    passed = bool(exact or np.all(orders > min_order))
    return TaylorResult(steps, first, second, orders, passed)


def gradient_taylor_test(
    loss, x, direction=None, *, key=None, steps=DEFAULT_STEPS, min_order=1.8
) -> TaylorResult:
    """Taylor test of the gradient of a scalar `loss` at the pytree `x`:
    `|L(x + h d) - L(x) - h <grad L(x), d>|` must decay like `h^2`.

    **Arguments:**

    - `loss`: `x -> scalar`, e.g. a misfit of a rollout (`rollout_loss`).
    - `x`: where to test (a state, parameters, a pytree of both).
    - `direction`: `d` (default: standard normal, from `key`).
    - `steps`, `min_order`: the step sizes and the order each successive pair
      must show.
    """
    if direction is None:
        direction = random_like(x, jax.random.PRNGKey(0) if key is None else key)
    value, grad = jax.value_and_grad(loss)(x)
    slope = _dot(grad, direction)
    values = []
    for h in steps:
        moved = loss(jax.tree.map(lambda a, d, h=h: a + h * d, x, direction))
        values.append((jnp.abs(moved - value), jnp.abs(moved - value - h * slope)))
    return _taylor(values, steps, min_order)


def tangent_linear_test(
    fn, x, direction=None, *, key=None, steps=DEFAULT_STEPS, min_order=1.8
) -> TaylorResult:
    """Taylor test of the tangent-linear model of `fn` (e.g. `u0 -> rollout`):
    `|f(x + h d) - f(x) - h f'(x) d|` (forward mode, `jax.jvp`) must decay like
    `h^2`. Arguments as `gradient_taylor_test`."""
    if direction is None:
        direction = random_like(x, jax.random.PRNGKey(0) if key is None else key)
    value, tangent = jax.jvp(fn, (x,), (direction,))
    values = []
    for h in steps:
        moved = fn(jax.tree.map(lambda a, d, h=h: a + h * d, x, direction))
        diff = jax.tree.map(jnp.subtract, moved, value)
        rest = jax.tree.map(lambda m, t, h=h: m - h * t, diff, tangent)
        values.append((_norm(diff), _norm(rest)))
    return _taylor(values, steps, min_order)


@dataclasses.dataclass(frozen=True)
class AdjointResult:
    """An adjoint dot-product test: `<J v, w>` (tangent-linear) against
    `<v, J^T w>` (adjoint), their relative difference and whether it is below the
    tolerance."""

    tangent_side: float
    adjoint_side: float
    relative_error: float
    passed: bool

    def __str__(self):
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"adjoint test {verdict}: <Jv, w> = {self.tangent_side:.16g}, "
            f"<v, J^T w> = {self.adjoint_side:.16g}, relative error "
            f"{self.relative_error:.2e}"
        )


def adjoint_test(fn, x, *, key=None, rtol: float = 1e-10) -> AdjointResult:
    """The adjoint dot-product test of `fn` at `x`: `<J v, w> = <v, J^T w>` for
    random `v` and `w`, with `J v` from forward mode (`jax.jvp`) and `J^T w` from
    reverse mode (`jax.vjp`). A model's hand-written or implicit adjoint (a
    transpose solve) must agree with its tangent to round-off: about 1e-14 in
    float64 for exact solves, the Krylov tolerance for iterative ones.

    **Arguments:**

    - `fn`: `x -> y` (pytrees), e.g. `lambda u0: simulator.rollout(u0, 3)`.
    - `x`: where to linearise.
    - `key`: for `v` and `w`.
    - `rtol`: the relative error allowed.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    key_v, key_w = jax.random.split(key)
    v = random_like(x, key_v)
    y, tangent = jax.jvp(fn, (x,), (v,))
    w = random_like(y, key_w)
    _, pullback = jax.vjp(fn, x)
    (adjoint,) = pullback(w)
    lhs, rhs = float(_dot(tangent, w)), float(_dot(v, adjoint))
    error = abs(lhs - rhs) / max(abs(lhs), abs(rhs), np.finfo(np.float64).tiny)
    return AdjointResult(lhs, rhs, error, bool(error <= rtol))


@dataclasses.dataclass(frozen=True)
class GradientComparison:
    """Two gradients of one loss: their relative difference (2-norm) and whether
    it is below the tolerance."""

    relative_error: float
    passed: bool

    def __str__(self):
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"implicit vs unrolled gradient {verdict}: relative error "
            f"{self.relative_error:.2e}"
        )


def rollout_loss(simulator: Simulator, n_steps: int = 3, target=None):
    """`u0 -> mean((rollout(u0)[1:] - target)^2)`: a smooth loss of the whole
    rollout (`target`: default zero)."""

    def loss(u0):
        states = simulator.rollout(u0, n_steps)[1:]
        goal = 0.0 if target is None else target
        return jnp.mean((states - goal) ** 2)

    return loss


def implicit_vs_unrolled(
    simulator: Simulator, u0, *, n_steps: int = 3, rtol: float = 1e-7
) -> GradientComparison:
    """The gradient of `rollout_loss` with respect to the initial state and the
    model's parameters by the implicit function theorem (the simulator's own
    transpose solves) against differentiating through the Newton iterations
    (`NewtonKrylov(adjoint="unrolled")`): they agree to the solver's tolerance
    when the implicit adjoint is right. Needs a scheme with a `NewtonKrylov`
    solver (`backward_euler`, `crank_nicolson`, `ImplicitMidpoint`)."""
    from ._solve import NewtonKrylov

    solver = getattr(simulator.scheme, "solver", None)
    if not isinstance(solver, NewtonKrylov):
        raise ValueError(
            f"{type(simulator.scheme).__name__} has no Newton-Krylov solver: the "
            "implicit-vs-unrolled check needs an implicit scheme that solves "
            "with simulators.NewtonKrylov"
        )
    unrolled = eqx.tree_at(
        lambda s: s.scheme.solver,
        simulator,
        dataclasses.replace(solver, adjoint="unrolled"),
    )

    def gradient(s):
        dynamic, static = eqx.partition(s, eqx.is_inexact_array)

        def loss(u, d):
            return rollout_loss(eqx.combine(d, static), n_steps)(u)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(u0, dynamic)

    # The array leaves only: the two gradients' static fields (the solvers'
    # adjoint settings) differ.
    implicit, reference = (
        jax.tree.leaves(eqx.filter(gradient(s), eqx.is_array))
        for s in (simulator, unrolled)
    )
    diff = [a - b for a, b in zip(implicit, reference, strict=True)]
    error = float(_norm(diff) / jnp.maximum(_norm(reference), 1e-300))
    return GradientComparison(error, bool(error <= rtol))


def check_simulator(
    simulator: Simulator, u0, *, n_steps: int = 3, key=None
) -> dict[str, object]:
    """Every check on a simulator at the state `u0`: the tangent-linear Taylor test
    and the adjoint dot-product test of `u0 -> rollout(u0, n_steps)`, the Taylor
    test of `rollout_loss`'s gradient, and (implicit schemes with a Newton-Krylov
    solver) implicit against unrolled gradients. Returns `{name: result}`; each
    result prints its verdict and has `passed`."""
    key = jax.random.PRNGKey(0) if key is None else key
    keys = jax.random.split(key, 3)
    rollout = jax.jit(lambda u: simulator.rollout(u, n_steps))
    loss = jax.jit(rollout_loss(simulator, n_steps))
    found = {
        "tangent_linear": tangent_linear_test(rollout, u0, key=keys[0]),
        "adjoint": adjoint_test(rollout, u0, key=keys[1]),
        "gradient": gradient_taylor_test(loss, u0, key=keys[2]),
    }
    from ._solve import NewtonKrylov

    if isinstance(getattr(simulator.scheme, "solver", None), NewtonKrylov):
        found["implicit_vs_unrolled"] = implicit_vs_unrolled(
            simulator, u0, n_steps=n_steps
        )
    return found
