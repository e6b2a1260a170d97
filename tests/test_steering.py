"""Steering at inference: constraint terms added to the window cost of a classical
or a trained analyser, without retraining."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import simulators as sim
from assim import (
    ConservedTotal,
    DiffusionCovariance,
    KnownValues,
    ObservationSet,
    Parameter,
    ParameterBounds,
    Refined,
    StateBounds,
    Supervised,
    Term,
    TrainSettings,
    UnrolledVar,
    Variational,
    WeightedLoss,
    WindowProblem,
    incremental,
    train,
    windows_batch,
)

GRID = sim.Grid((32,), (1.0,))
SIMULATOR = sim.Simulator(
    sim.AdvectionDiffusion(GRID, 0.003, [0.5]), sim.crank_nicolson(), 0.02
)


def _window(seed):
    """A non-negative bump advected on a periodic grid (its total conserved), 30%
    of the points observed at 5 times with noise 0.2: the noisy analysis goes
    negative and misses the total."""
    rng = np.random.default_rng(seed)
    x = np.asarray(GRID.coordinates(0))
    centre = rng.uniform()
    truth = jnp.asarray(np.exp(-(((x - centre + 0.5) % 1 - 0.5) ** 2) / 0.01))
    states = SIMULATOR.rollout(truth, 8)[::2]
    mask = rng.random(states.shape) < 0.3
    values = np.where(mask, states + 0.2 * rng.normal(size=states.shape), 0.0)
    window = ObservationSet(
        jnp.asarray(values),
        jnp.asarray(mask),
        jnp.full(states.shape, 0.2),
        jnp.arange(5) * 0.04,
        states,
    )
    return window, truth


def _violations(x0, total):
    return abs(float(jnp.sum(x0)) - total), max(0.0, -float(jnp.min(x0)))


def _rmse(x0, truth):
    return float(jnp.sqrt(jnp.mean((x0 - truth) ** 2)))


# Bounds are kinks (max(-x, 0)): Gauss-Newton needs more outer loops than on the
# smooth cost, so the refinement runs up to 20.
REFINE = Variational(incremental(inner_steps=50), max_steps=20)
TOLERANCE = 1e-2


def _terms(total):
    return (
        ConservedTotal(total=total, tolerance=TOLERANCE),
        StateBounds(lower=0.0, tolerance=TOLERANCE),
    )


def test_steering_a_classical_analyser():
    """Mass and positivity added to 4D-Var: the total within the tolerance (0.01 of
    a total of ~5.6), the negative part below it, and a lower RMSE (the constraint
    is information the observations lacked: measured 0.071 against 0.103)."""
    window, truth = _window(0)
    problem = WindowProblem(SIMULATOR, DiffusionCovariance(GRID, 0.5, 0.1), 2)
    background = jnp.zeros(GRID.shape)
    total = float(jnp.sum(truth))
    plain, _ = eqx.filter_jit(REFINE)(problem, window, background)
    steered, info = eqx.filter_jit(REFINE)(
        problem.with_terms(*_terms(total)), window, background
    )
    mass, negative = _violations(steered.initial_state, total)
    mass_0, negative_0 = _violations(plain.initial_state, total)
    assert mass < TOLERANCE < mass_0, (mass, mass_0)
    assert negative < TOLERANCE < negative_0, (negative, negative_0)
    assert _rmse(steered.initial_state, truth) <= _rmse(plain.initial_state, truth)


def test_steering_a_trained_network():
    """A trained unrolled network never saw the constraints: `Refined` runs
    Gauss-Newton iterations on the augmented cost from its output, and the
    analysis honours them without retraining, with an RMSE no worse than the
    network's."""
    windows, truths = zip(*(_window(seed) for seed in range(1, 5)), strict=True)
    problem = WindowProblem(SIMULATOR, DiffusionCovariance(GRID, 0.5, 0.1), 2)
    net = UnrolledVar(GRID, 3, momentum=True, key=jax.random.PRNGKey(0))
    net = net.with_stable_steps(problem, windows[0], jnp.zeros(GRID.shape))
    settings = TrainSettings(
        steps=5,
        batch_size=2,
        validate_every=0,
        checkpoint_every=0,
        cycle_every=0,
        loss=WeightedLoss({"supervised": Term(Supervised())}),
    )
    net, _ = train(net, problem, windows_batch(windows, GRID.shape), settings)
    window, truth = _window(0)
    background = jnp.zeros(GRID.shape)
    total = float(jnp.sum(truth))
    raw, _ = eqx.filter_jit(net)(problem, window, background)
    steer = Refined(net, REFINE, _terms(total))
    steered, info = eqx.filter_jit(steer)(problem, window, background)
    assert int(info.steps) > net.n_layers  # the layers, then the refinement
    mass, negative = _violations(steered.initial_state, total)
    assert mass < TOLERANCE and negative < TOLERANCE, (mass, negative)
    assert _violations(raw.initial_state, total)[1] > TOLERANCE
    assert _rmse(steered.initial_state, truth) <= _rmse(raw.initial_state, truth)
    assert all(
        np.isfinite(_rmse(net(problem, w, background)[0].initial_state, t))
        for w, t in zip(windows, truths, strict=True)
    )


def test_terms_residuals():
    trajectory = jnp.stack([jnp.ones((4, 4)), 2 * jnp.ones((4, 4))])
    conserved = ConservedTotal(tolerance=0.5).residual(trajectory, None)
    np.testing.assert_allclose(conserved, [32.0])  # (32 - 16) / 0.5
    known = ConservedTotal(total=16.0, cell=0.5, tolerance=1.0)
    np.testing.assert_allclose(known.residual(trajectory, None), [-8.0, 0.0])
    points = KnownValues.at_points((4, 4), [[0, 1, 3.0], [2, 2, 1.0]], tolerance=0.1)
    r = points.residual(trajectory, None)
    assert r.shape == (2, 4, 4) and int(jnp.sum(r != 0)) == 3  # (2, 2) at t=0 is met
    np.testing.assert_allclose(r[0, 0, 1], -20.0)
    edge = KnownValues.on_boundary((4, 4), 1.0, initial_only=True)
    r = edge.residual(trajectory, None)
    assert r.shape == (1, 4, 4) and float(jnp.abs(r).sum()) == 0.0
    assert bool(edge.known[0, 2]) and not bool(edge.known[1, 1])
    with pytest.raises(ValueError, match="2 indices"):
        KnownValues.at_points((4, 4), [[1, 3.0]])
    with pytest.raises(ValueError, match="no value is known"):
        KnownValues(np.full((3,), np.nan))
    with pytest.raises(ValueError, match="tolerance must be positive"):
        ConservedTotal(tolerance=0.0)


def test_parameter_bounds_act_on_the_physical_value():
    parameter = Parameter("kappa", 0.01, DiffusionCovariance(GRID, 1.0, 0.1), (32,))
    bounds = ParameterBounds(parameter, upper=0.012, tolerance=1e-3)
    inside = bounds.residual(jnp.zeros((1, 32)), parameter.zeros())
    np.testing.assert_allclose(inside, 0.0)
    theta = parameter.covariance.whiten(jnp.full((32,), 0.5))  # log-value 0.5
    r = bounds.residual(jnp.zeros((1, 32)), theta)
    value = parameter.value(theta)
    np.testing.assert_allclose(r, (value - 0.012) / 1e-3, rtol=1e-10)
    assert float(jnp.min(r)) > 0
    assert bounds.residual(jnp.zeros((1, 32)), None).shape == ()
    with pytest.raises(ValueError, match="lower or an upper"):
        ParameterBounds(parameter)


def test_refined_guess_keeps_its_own_covariance():
    """`Refined(guess_covariance=B0)`: the guess analyses with `B0` (the B a network
    was trained with) while the refinement runs on the problem's (adapted) B."""
    from assim import AbstractAnalyser, Analysis, Info, ScaledCovariance

    window, truth = _window(0)
    B0 = DiffusionCovariance(GRID, 0.5, 0.1)

    class Spy(AbstractAnalyser):  # its analysis shows the B it was given: the
        # truth with B0, another state with another B (both fit the window better
        # than the background, so that the refinement starts from them)
        def __call__(self, problem, window, background):
            shift = problem.background_covariance.sqrt(B0.whiten(truth - background))
            return Analysis(background + shift), Info(jnp.asarray(0), jnp.asarray(4))

    problem = WindowProblem(SIMULATOR, ScaledCovariance(B0, jnp.asarray(0.3)), 2)
    background = jnp.zeros_like(truth)
    step = Variational(incremental(inner_steps=1), max_steps=1)  # start-dependent
    run = eqx.filter_jit(lambda a, p, w, b, **kw: a(p, w, b, **kw)[0])
    kept = Refined(Spy(), step, guess_covariance=B0)
    refined = run(kept, problem, window, background)
    start = problem.control(Analysis(truth), background)
    direct = run(step, problem, window, background, start=start)
    np.testing.assert_allclose(refined.initial_state, direct.initial_state, atol=1e-6)
    plain = run(Refined(Spy(), step), problem, window, background)  # the problem's B
    assert not np.allclose(plain.initial_state, direct.initial_state, atol=1e-3)
