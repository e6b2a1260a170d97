"""The window problem: one definition of the cost, its gradient and its Gauss-Newton
operator, which every analyser evaluates (small Lorenz-96 windows, float64)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import l96_twin_windows, minimise

import simulators as sim
from assim import (
    Analysis,
    Control,
    DiagonalCovariance,
    DiffusionCovariance,
    Parameter,
    StateBounds,
    Supervised,
    Term,
    TrainSettings,
    UnrolledVar,
    WeightedLoss,
    WindowProblem,
    train,
    windows_batch,
)

T, INTERVAL = 3, 5


@pytest.fixture(scope="module")
def l96_windows():
    return l96_twin_windows(4, T, INTERVAL, spinup=500)


def _problem(l96, B, weak: bool):
    forcing = Parameter("forcing", 8.0, DiagonalCovariance(0.1), ())
    Q = DiagonalCovariance(0.5) if weak else None
    return WindowProblem(
        l96,
        B,
        INTERVAL,
        set_parameters=forcing,
        model_error_covariance=Q,
        terms=[StateBounds(lower=-20.0, upper=20.0, tolerance=0.5)],
    )


def _net(l96, key, **options):
    return UnrolledVar(
        l96.model.grid, 3, n_times=T, step=0.05, scale=3.6, key=key, **options
    )


@pytest.mark.parametrize("weak", [False, True], ids=["strong", "weak"])
def test_unrolled_network_descends_the_problems_cost(l96_windows, getkey, weak):
    """An unrolled network's layer cost at `lambda = 1` is the problem's cost at the
    same state (strong and weak constraint, with a parameter and an extra term), and
    its B-preconditioned direction is the problem's gradient mapped back through
    `B^{1/2}`: the cost is defined once."""
    l96, B, windows = l96_windows
    obs, xb = windows[1], jnp.asarray(windows[1].truth[0]) + 1.0
    problem = _problem(l96, B, weak)
    theta = jnp.asarray(0.3)
    net = _net(l96, getkey(), theta=theta, regularisation=1.0)
    rng = np.random.default_rng(1)
    x = xb + jnp.asarray(rng.normal(size=40))
    w = jnp.asarray(rng.normal(size=(T - 1, 40))) if weak else None
    control = problem.control(Analysis(x, theta, w), xb)
    model = net.model_problem(problem)
    # The network's problem holds the learned forcing fixed: its cost is the
    # problem's without the parameter prior term.
    prior = 0.5 * (theta / problem.parameter_std) ** 2
    expected = problem.cost(control, obs, xb) - prior
    layer = net.layer_cost(problem, 0, Analysis(x, None, w), obs, xb)
    np.testing.assert_allclose(layer, expected, rtol=1e-12)
    np.testing.assert_allclose(model.cost(control, obs, xb), expected, rtol=1e-12)
    grad = jax.grad(lambda c: problem.cost(c, obs, xb))(control)
    step = model.preconditioned_gradient(Analysis(x, None, w), obs)
    np.testing.assert_allclose(
        B.sqrt(grad.v), (x - xb) + step.initial_state, rtol=1e-10, atol=1e-10
    )
    if weak:
        np.testing.assert_allclose(grad.w, step.w, rtol=1e-10, atol=1e-10)
    # The first layer (no momentum, prior or LSTM) takes exactly that step.
    one = eqx.tree_at(lambda n: n.log_step, net, net.log_step[:1])
    analysis, _ = one(problem, obs, xb)
    alpha = float(jnp.exp(net.log_step[0]))
    start = model.preconditioned_gradient(
        Analysis(xb, None, None if w is None else jnp.zeros_like(w)), obs
    )
    np.testing.assert_allclose(
        analysis.initial_state, xb - alpha * start.initial_state, rtol=1e-10
    )


def test_gauss_newton_operator_is_the_residual_jacobian_product(l96_windows):
    """`I + G^T G` over the state controls `(v, w)`, with `G` the Jacobian of the
    non-background residuals, against a dense `G` (weak constraint)."""
    l96, B, windows = l96_windows
    obs, xb = windows[0], jnp.asarray(windows[0].truth[0]) + 1.0
    problem = _problem(l96, B, weak=True)
    rng = np.random.default_rng(2)
    control = Control(
        jnp.asarray(rng.normal(size=40)),
        jnp.asarray(0.1),
        jnp.asarray(rng.normal(size=(T - 1, 40))),
    )
    H = problem.gauss_newton(control, obs, xb).as_matrix()
    flat, unravel = jax.flatten_util.ravel_pytree((control.v, control.w))

    def residual(z):
        v, w = unravel(z)
        r = problem.residuals(Control(v, control.theta, w), obs, xb)
        del r["background"], r["parameters"]  # constant in (v, w)
        return jax.flatten_util.ravel_pytree(r)[0]

    G = jax.jacfwd(residual)(flat)
    np.testing.assert_allclose(H, np.eye(flat.size) + G.T @ G, rtol=1e-9, atol=1e-9)


def test_state_bounds_steer_the_analysis(l96_windows):
    """An upper bound added to the problem as a cost term lowers the analysis where
    it exceeded the bound, through the same Gauss-Newton solve (and its residual is
    zero inside the bounds)."""
    l96, B, windows = l96_windows
    obs, xb = windows[2], jnp.asarray(windows[2].truth[0]) + 1.0
    plain = WindowProblem(l96, B, INTERVAL)
    free, _ = minimise(plain, obs, xb, method="gauss-newton", max_steps=5)
    x_free = plain.analysis(free, xb).initial_state
    bound = float(np.quantile(np.asarray(x_free), 0.8))
    bounded = WindowProblem(
        l96, B, INTERVAL, terms=[StateBounds(upper=bound, tolerance=0.05)]
    )
    steered, _ = minimise(bounded, obs, xb, method="gauss-newton", max_steps=5)
    x_bounded = bounded.analysis(steered, xb).initial_state
    excess = lambda x: float(jnp.sum(jnp.maximum(x - bound, 0.0)))  # noqa: E731
    assert excess(x_free) > 0.5
    assert excess(x_bounded) < 0.2 * excess(x_free), (excess(x_bounded), excess(x_free))
    inside = StateBounds(lower=-1.0, upper=1.0).residual(jnp.zeros((2, 3)), None)
    assert not np.any(np.asarray(inside))
    with pytest.raises(ValueError, match="lower"):
        StateBounds(lower=1.0, upper=0.0)


def test_parameter_places_a_bounded_value():
    """`Parameter`: whitened control -> `background * exp(3 tanh(S theta / 3))`
    placed in the model; a name the model lacks is refused."""
    l96 = sim.Simulator(sim.Lorenz96(), sim.RK4(), 0.01)
    forcing = Parameter("forcing", 8.0, DiagonalCovariance(0.5), ())
    placed = forcing(l96, jnp.asarray(2.0))
    np.testing.assert_allclose(placed.model.forcing, 8.0 * np.exp(3 * np.tanh(1 / 3)))
    np.testing.assert_allclose(forcing.value(jnp.asarray(100.0)), 8.0 * np.exp(3.0))
    with pytest.raises(ValueError, match="has no parameter 'kappa'"):
        Parameter("kappa", 1.0, DiagonalCovariance(0.5), ())(l96, jnp.asarray(0.0))
    problem = WindowProblem(l96, DiagonalCovariance(1.0), set_parameters=forcing)
    assert problem.parameter_background.shape == () and problem.estimates_parameters


def test_prior_parameters_run_a_field_median_as_a_constant():
    """`with_prior_parameters`: a diffusivity field at its prior median becomes the
    constant (a scalar `kappa`: FFT solves, not GMRES), the same model: its window
    trajectory is the uniform field's to the Krylov solves' tolerance. A scalar
    parameter is placed as `with_parameters` places it."""
    grid = sim.Grid((16, 16), (1.0, 1.0))
    x = jnp.asarray(np.sin(2 * np.pi * np.asarray(grid.mesh()[1])))
    model = sim.AdvectionDiffusion(grid, 0.01 * jnp.ones(grid.shape), [0.3, 0.2])
    simulator = sim.Simulator(model, sim.backward_euler(), 0.05)
    kappa = Parameter("kappa", 0.02, DiffusionCovariance(grid, 1.0, 0.1), grid.shape)
    problem = WindowProblem(simulator, DiagonalCovariance(1.0), 2, set_parameters=kappa)
    field, constant = (
        problem.with_parameters(kappa.zeros()),
        problem.with_prior_parameters(),
    )
    assert field.simulator.model.kappa.shape == grid.shape
    assert (
        constant.simulator.model.kappa.shape == () and not constant.estimates_parameters
    )
    np.testing.assert_allclose(constant.simulator.model.kappa, 0.02)
    a, b = (p.trajectory(Analysis(x), 3) for p in (field, constant))
    np.testing.assert_allclose(a, b, atol=1e-5)
    forcing = Parameter("forcing", 8.0, DiagonalCovariance(0.5), ())
    l96 = WindowProblem(
        sim.Simulator(sim.Lorenz96(), sim.RK4(), 0.01),
        DiagonalCovariance(1.0),
        set_parameters=forcing,
    )
    np.testing.assert_allclose(l96.with_prior_parameters().simulator.model.forcing, 8.0)


def test_refinement_re_estimates_a_guess_s_parameters(l96_windows):
    """`Refined(estimate_parameters=True)`: a guess holding a wrong forcing (10 for
    the truth's 8, as a network whose learned parameter is off) is refined jointly:
    joint 4D-Var started from the guess's state and from the guess's forcing where
    that fits the window better than the prior's median (an uninformed prior, 14),
    from the prior's where it fits better (8: while cycling, the previous window's
    estimate); its joint cost ends lower than the held refinement's; held, the
    guess's forcing is kept."""
    from assim import AbstractAnalyser, Info, Refined, Variational, incremental

    l96, B, windows = l96_windows
    window = windows[0]
    background = window.truth[0] + 0.3
    refine = Variational(incremental(inner_steps=40), max_steps=4)
    for median, starts_from_guess in ((14.0, True), (8.0, False)):
        forcing = Parameter("forcing", median, DiagonalCovariance(0.2), ())
        problem = WindowProblem(l96, B, INTERVAL, set_parameters=forcing)
        wrong = jnp.asarray(np.arctanh(np.log(10 / median) / 3) * 3 / 0.2)
        np.testing.assert_allclose(forcing.value(wrong), 10.0, rtol=1e-12)

        class Held(AbstractAnalyser):  # a guess whose model holds its own forcing
            def __call__(self, problem, window, background, wrong=wrong):
                return Analysis(background, wrong), Info(jnp.asarray(0), jnp.asarray(4))

            def model_problem(self, problem, wrong=wrong):
                return problem.with_parameters(wrong)

        held = Refined(Held(), refine)
        joint = Refined(Held(), refine, estimate_parameters=True)
        assert not held.model_problem(problem).estimates_parameters
        assert joint.model_problem(problem).estimates_parameters
        (a_held, _), (a_joint, _) = (
            eqx.filter_jit(r)(problem, window, background) for r in (held, joint)
        )
        assert a_held.theta == wrong
        # Jointly: 4D-Var of state and forcing from the guess's state and the
        # better-fitting forcing.
        theta = wrong if starts_from_guess else problem.parameter_background
        start = problem.control(Analysis(background, theta), background)
        direct, _ = eqx.filter_jit(refine)(problem, window, background, start=start)
        np.testing.assert_allclose(a_joint.theta, direct.theta, rtol=1e-8)
        np.testing.assert_allclose(
            a_joint.initial_state, direct.initial_state, atol=1e-8
        )

        def cost(analysis, problem=problem):
            control = problem.control(analysis, background)
            return problem.cost(control, window, background)

        assert cost(a_joint) < cost(a_held)


def test_refinement_starts_from_the_better_of_guess_and_background(l96_windows):
    """`Refined` starts where the refinement's cost is lowest of the guess and the
    background: a guess that fits the window worse than the background (3 off
    everywhere) or that blew up (NaN) gives cold 4D-Var's analysis; one that fits
    better (converged 4D-Var's, slightly perturbed) gives 4D-Var's from the guess;
    the two differ (one Gauss-Newton iteration does not converge)."""
    from assim import AbstractAnalyser, Info, Refined, Variational, incremental

    l96, B, windows = l96_windows
    window = windows[1]
    noise = jax.random.normal(jax.random.key(3), window.truth[0].shape)
    background = window.truth[0] + 0.8 * noise
    problem = WindowProblem(l96, B, INTERVAL).without_raising()  # as cycling's
    refine = Variational(incremental(inner_steps=5), max_steps=1)

    class Fixed(AbstractAnalyser):
        state: jax.Array

        def __call__(self, problem, window, background):
            return Analysis(self.state), Info(jnp.asarray(0), jnp.asarray(4))

    def refined(state):
        analysis, _ = eqx.filter_jit(Refined(Fixed(state), refine))(
            problem, window, background
        )
        return analysis.initial_state

    cold, _ = eqx.filter_jit(refine)(problem, window, background)
    converged = Variational(incremental(inner_steps=20), max_steps=5)
    near = eqx.filter_jit(converged)(problem, window, background)[0].initial_state
    near = near + 0.05 * noise
    start = problem.control(Analysis(near), background)
    warm, _ = eqx.filter_jit(refine)(problem, window, background, start=start)
    assert np.max(np.abs(cold.initial_state - warm.initial_state)) > 1e-2
    for state, expected in (
        (background + 3.0, cold),
        (jnp.full_like(background, jnp.nan), cold),
        (near, warm),
    ):
        np.testing.assert_allclose(
            refined(state), expected.initial_state, rtol=0, atol=1e-10
        )


def test_unrolled_network_trains_on_a_weak_constraint_problem(l96_windows, getkey):
    """With model error in the problem, the network's layers also estimate the
    forcings `w`; training through them lowers the supervised loss, along a
    different path from the same training on the strong problem."""
    l96, B, windows = l96_windows
    data = windows_batch(windows, (40,), [w.truth[0] + 1.0 for w in windows])
    net = _net(l96, getkey(), momentum=True)
    weak = WindowProblem(
        l96, B, INTERVAL, model_error_covariance=DiagonalCovariance(0.5)
    )
    analysis, _ = net(weak, windows[0], data.background[0])
    assert analysis.w.shape == (T - 1, 40) and np.any(np.asarray(analysis.w) != 0)
    settings = TrainSettings(
        steps=8,
        batch_size=4,
        learning_rate=0.2,
        warmup_steps=1,
        validate_every=0,
        checkpoint_every=0,
        loss=WeightedLoss({"supervised": Term(Supervised())}),
    )
    trained, records = train(net, weak, data, settings)
    losses = [r["loss"] for r in records]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    _, strong = train(net, WindowProblem(l96, B, INTERVAL), data, settings)
    strong = [r["loss"] for r in strong]
    assert np.max(np.abs(np.subtract(losses, strong))) > 1e-4 * losses[0]
