"""Variational assimilation: covariances, 4D-Var cost gradients, twin experiments."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest
from helpers import assert_taylor_orders, minimise

import simulators as sim
from assim import (
    Control,
    DiagonalCovariance,
    DiffusionCovariance,
    LinearInterpolation,
    ObservationSet,
    SpectralCovariance,
    Variational,
    WindowProblem,
)


@pytest.mark.parametrize("boundary", ["periodic", "dirichlet"])
def test_diffusion_covariance_is_symmetric_with_unit_mean_variance(boundary):
    grid = sim.Grid((9, 10), (1.0, 1.0), boundary)
    cov = DiffusionCovariance(grid, 0.5, 0.1)
    n = 90
    basis = jnp.eye(n).reshape(n, *grid.shape)
    sqrt = jax.vmap(cov.sqrt)(basis).reshape(n, n).T
    dense = sqrt @ sqrt.T  # test-only: 90 x 90
    np.testing.assert_allclose(dense, dense.T, atol=1e-14)
    np.testing.assert_allclose(np.mean(np.diag(dense)), 0.25, rtol=1e-12)
    assert np.all(np.linalg.eigvalsh(dense) > 0)
    # Correlation decays with distance: neighbours correlate, far points hardly.
    corr = dense[45] / np.sqrt(dense[45, 45] * np.diag(dense))
    assert corr[46] > 0.3 and abs(corr[0]) < 0.2


def _covariances():
    grid = sim.Grid((9, 10), (1.0, 1.0))
    rng = np.random.default_rng(3)
    k0, k1 = np.meshgrid(np.fft.fftfreq(9), np.fft.rfftfreq(10), indexing="ij")
    spectrum = 1 / (1 + 10 * (k0**2 + k1**2))  # even in k: a real, symmetric filter
    spectrum[0, 0] = 0.0  # the mean: outside B's range
    return {
        "diagonal": DiagonalCovariance(rng.uniform(0.5, 2.0, (9, 10))),
        "diffusion-periodic": DiffusionCovariance(grid, 0.5, 0.1),
        "diffusion-dirichlet": DiffusionCovariance(
            sim.Grid((9, 10), (1.0, 1.0), "dirichlet"), 0.5, 0.1
        ),
        "spectral": SpectralCovariance(grid, spectrum),
    }


@pytest.mark.parametrize("name", sorted(_covariances()))
def test_whiten_inverts_the_square_root(name):
    """`whiten(S v) = v` and `S whiten(x) = x` on B's range (the spectral covariance
    with a zero-variance mean: its pseudo-inverse drops the mean)."""
    cov = _covariances()[name]
    rng = np.random.default_rng(4)
    v = jnp.asarray(rng.normal(size=(9, 10)))
    x = jnp.asarray(rng.normal(size=(9, 10)))
    if name == "spectral":
        v, x = v - jnp.mean(v), x - jnp.mean(x)
        np.testing.assert_allclose(cov.whiten(jnp.ones((9, 10))), 0.0, atol=1e-12)
    np.testing.assert_allclose(cov.whiten(cov.sqrt(v)), v, atol=1e-10)
    np.testing.assert_allclose(cov.sqrt(cov.whiten(x)), x, atol=1e-10)
    assert cov.whiten(x).dtype == x.dtype


def _twin(n_obs=4, interval=2, seed=0, std=0.05):
    grid = sim.Grid((24,), (1.0,))
    x = np.asarray(grid.coordinates(0))
    truth_model = sim.AdvectionDiffusion(grid, 0.004, [0.5])
    truth = sim.Simulator(truth_model, sim.crank_nicolson(), 0.02)
    x_true = jnp.asarray(np.sin(2 * np.pi * x) + 0.5 * np.cos(4 * np.pi * x))
    states = truth.rollout(x_true, (n_obs - 1) * interval)[::interval]
    rng = np.random.default_rng(seed)
    mask = rng.random(states.shape) < 0.4
    values = np.where(mask, states + std * rng.normal(size=states.shape), 0.0)
    obs = ObservationSet(
        values=jnp.asarray(values),
        mask=jnp.asarray(mask),
        error_std=jnp.full(states.shape, std),
        times=jnp.arange(n_obs) * interval * 0.02,
        truth=states,
    )
    background = x_true + 0.3 * jnp.asarray(np.cos(2 * np.pi * x + 1.0))
    return truth, obs, background, x_true


def test_cost_gradient_taylor(getkey):
    truth, obs, background, _ = _twin()
    problem = WindowProblem(
        truth,
        DiffusionCovariance(truth.model.grid, 0.3, 0.1),
        observation_interval=2,
        set_parameters=lambda s, t: eqx.tree_at(lambda s: s.model.kappa, s, jnp.exp(t)),
        parameter_background=jnp.log(0.006),
        parameter_std=1.0,
    )
    control = Control(
        jax.random.normal(getkey(), background.shape), jnp.asarray(np.log(0.005))
    )
    direction = Control(jax.random.normal(getkey(), background.shape), jnp.asarray(0.3))
    assert_taylor_orders(
        jax.jit(lambda c: problem.cost(c, obs, background)), control, direction
    )


def test_var4d_state_estimation_beats_background():
    truth, obs, background, x_true = _twin()
    problem = WindowProblem(truth, DiffusionCovariance(truth.model.grid, 0.3, 0.1), 2)
    control, info = minimise(problem, obs, background)
    assert info.converged, info.result
    assert np.all(np.diff(info.cost) <= 1e-12 * info.cost[0])  # monotone
    assert info.grad_norm[-1] < 1e-3 * info.grad_norm[0]
    analysis = problem.analysis(control, background).initial_state
    err_a = float(jnp.sqrt(jnp.mean((analysis - x_true) ** 2)))
    err_b = float(jnp.sqrt(jnp.mean((background - x_true) ** 2)))
    # 40% of the points observed at 4 times with noise 0.05: the analysis error is a
    # fraction of the background's (measured 0.035 vs 0.21).
    assert err_a < 0.25 * err_b, (err_a, err_b)
    start = problem.initial_control(obs, background)
    assert problem.cost(control, obs, background) < problem.cost(start, obs, background)


def test_joint_state_and_diffusivity_estimation():
    # A longer window (t = 0.5) than the state test, so that diffusion has decayed the
    # k = 4 pi mode by ~25%, and low noise (0.01), so that kappa is identifiable.
    truth, obs, background, x_true = _twin(n_obs=6, interval=5, std=0.01)
    wrong = eqx.tree_at(lambda s: s.model.kappa, truth, jnp.asarray(0.01))
    problem = WindowProblem(
        wrong,
        DiagonalCovariance(0.3),
        observation_interval=5,
        set_parameters=lambda s, t: eqx.tree_at(lambda s: s.model.kappa, s, jnp.exp(t)),
        parameter_background=jnp.log(0.01),
        parameter_std=2.0,
    )
    control, info = minimise(problem, obs, background, max_steps=400)
    assert info.converged, info.result
    kappa = float(jnp.exp(control.theta))
    # True 0.004, background 0.01 (150% off): recovered within 20% (measured 0.0037).
    assert abs(kappa - 0.004) / 0.004 < 0.2, kappa


def test_var3d_is_one_observation_time():
    truth, obs, background, x_true = _twin(n_obs=1)
    problem = WindowProblem(truth, DiffusionCovariance(truth.model.grid, 0.3, 0.1))
    control, _ = minimise(problem, obs, background)
    analysis = problem.analysis(control, background).initial_state
    assert float(jnp.sqrt(jnp.mean((analysis - x_true) ** 2))) < float(
        jnp.sqrt(jnp.mean((background - x_true) ** 2))
    )


def test_gauss_newton_matches_lbfgs_on_a_linear_problem():
    # Linear model and H: the cost is quadratic, Gauss-Newton's first outer loop is
    # exact up to the CG tolerance, and both solvers find the same minimum. (How
    # many more outer loops it takes to stop depends on rounding: at the minimum
    # the line search can reject round-off-sized steps on rounding noise.)
    truth, obs, background, _ = _twin()
    problem = WindowProblem(truth, DiffusionCovariance(truth.model.grid, 0.3, 0.1), 2)
    c_lbfgs, _ = minimise(problem, obs, background, rtol=1e-9, atol=1e-9, max_steps=400)
    c_gn, info = minimise(
        problem,
        obs,
        background,
        method="gauss-newton",
        inner_steps=60,
        inner_rtol=1e-10,
    )
    assert info.converged, info.result
    np.testing.assert_allclose(info.cost[1], info.cost[info.steps], rtol=1e-10)
    assert info.cost[1] < 0.1 * info.cost[0]
    np.testing.assert_allclose(c_gn.v, c_lbfgs.v, atol=1e-5)
    assert info.grad_norm[-1] < 1e-6 * info.grad_norm[0]


def test_gauss_newton_on_nonlinear_burgers():
    grid = sim.Grid((32,), (1.0,))
    x = np.asarray(grid.coordinates(0))
    truth = sim.Simulator(sim.Burgers(grid, 0.01), sim.backward_euler(), 0.01)
    x_true = jnp.asarray(np.sin(2 * np.pi * x) + 0.3)
    states = truth.rollout(x_true, 20)[::5]
    mask = np.zeros(states.shape, bool)
    mask[:, ::3] = True
    obs = ObservationSet(
        values=jnp.where(mask, states, 0.0),
        mask=jnp.asarray(mask),
        error_std=jnp.full(states.shape, 0.02),
        times=jnp.arange(5) * 0.05,
    )
    background = x_true + 0.2 * jnp.asarray(np.cos(2 * np.pi * x))
    problem = WindowProblem(truth, DiffusionCovariance(grid, 0.2, 0.08), 5)
    control, info = minimise(
        problem, obs, background, method="gauss-newton", max_steps=10
    )
    assert info.converged, info.result
    # Quadratic convergence near the minimum: few outer loops, cost reduced a lot.
    assert info.steps <= 6 and info.cost[-1] < 0.02 * info.cost[0], info.cost
    analysis = problem.analysis(control, background).initial_state
    err_a = float(jnp.sqrt(jnp.mean((analysis - x_true) ** 2)))
    err_b = float(jnp.sqrt(jnp.mean((background - x_true) ** 2)))
    assert err_a < 0.2 * err_b, (err_a, err_b)


def _forced_twin():
    """Truth with a forcing the model does not know: the model error."""
    grid = sim.Grid((24,), (1.0,))
    x = np.asarray(grid.coordinates(0))
    forcing = jnp.asarray(0.8 * np.sin(4 * np.pi * x))
    model = sim.AdvectionDiffusion(grid, 0.004, [0.5])
    truth = sim.Simulator(
        sim.AdvectionDiffusion(grid, 0.004, [0.5], forcing), sim.crank_nicolson(), 0.02
    )
    x_true = jnp.asarray(np.sin(2 * np.pi * x))
    states = truth.rollout(x_true, 30)[::5]
    rng = np.random.default_rng(1)
    mask = rng.random(states.shape) < 0.5
    obs = ObservationSet(
        values=jnp.asarray(
            np.where(mask, states + 0.01 * rng.normal(size=states.shape), 0.0)
        ),
        mask=jnp.asarray(mask),
        error_std=jnp.full(states.shape, 0.01),
        times=jnp.arange(states.shape[0]) * 0.1,
    )
    wrong = sim.Simulator(model, sim.crank_nicolson(), 0.02)
    return wrong, obs, x_true, states


def test_weak_constraint_cost_gradient_taylor(getkey):
    model, obs, x_true, _ = _forced_twin()
    grid = model.model.grid
    problem = WindowProblem(
        model,
        DiagonalCovariance(0.1),
        5,
        model_error_covariance=DiffusionCovariance(grid, 0.5, 0.1),
    )
    c0 = problem.initial_control(obs, x_true)
    assert c0.w.shape == (obs.n_times - 1, *grid.shape)
    control = jax.tree.map(lambda a: jax.random.normal(getkey(), a.shape), c0)
    direction = jax.tree.map(lambda a: jax.random.normal(getkey(), a.shape), c0)
    assert_taylor_orders(
        jax.jit(lambda c: problem.cost(c, obs, x_true)), control, direction
    )


def test_weak_constraint_absorbs_model_error():
    model, obs, x_true, states = _forced_twin()
    grid = model.model.grid
    background = x_true + 0.2 * jnp.cos(2 * np.pi * grid.mesh()[0])
    B = DiffusionCovariance(grid, 0.2, 0.1)
    strong = WindowProblem(model, B, 5)
    weak = WindowProblem(
        model, B, 5, model_error_covariance=DiffusionCovariance(grid, 1.0, 0.1)
    )
    errors = {}
    for name, problem in [("strong", strong), ("weak", weak)]:
        control, info = minimise(
            problem, obs, background, method="gauss-newton", inner_steps=40
        )
        assert info.converged, (name, info.result)
        analysis = problem.analysis(control, background)
        trajectory = problem.trajectory(analysis, obs.n_times)
        errors[name] = float(jnp.sqrt(jnp.mean((trajectory - states) ** 2)))
    # The unknown forcing makes the strong constraint misfit the whole window
    # (measured ~0.05); the weak constraint follows the truth to near the noise.
    assert errors["weak"] < 0.3 * errors["strong"], errors
    assert errors["weak"] < 0.02, errors


def test_off_grid_sensors_4dvar():
    truth, obs, background, x_true = _twin()
    grid = truth.model.grid
    rng = np.random.default_rng(3)
    positions = rng.uniform(0, 1, size=(obs.n_times, 9, 1))  # moving sensors
    op = LinearInterpolation(grid, positions)
    states = truth.rollout(x_true, (obs.n_times - 1) * 2)[::2]
    values = op(states) + 0.01 * rng.normal(size=(obs.n_times, 9))
    off_grid = ObservationSet(
        values=values,
        mask=jnp.ones(values.shape, bool),
        error_std=jnp.full(values.shape, 0.01),
        times=obs.times,
        operator=op,
    )
    problem = WindowProblem(truth, DiffusionCovariance(grid, 0.3, 0.1), 2)
    control, info = minimise(problem, off_grid, background, method="gauss-newton")
    assert info.converged, info.result
    analysis = problem.analysis(control, background).initial_state
    err_a = float(jnp.sqrt(jnp.mean((analysis - x_true) ** 2)))
    err_b = float(jnp.sqrt(jnp.mean((background - x_true) ** 2)))
    assert err_a < 0.3 * err_b, (err_a, err_b)


def test_bad_problem_setup():
    truth, obs, background, _ = _twin()
    B = DiagonalCovariance(0.3)
    problem = WindowProblem(truth, B)
    with pytest.raises(ValueError, match="background has shape"):
        Variational(optx.LBFGS(rtol=1e-6, atol=1e-6))(problem, obs, background[:5])
    with pytest.raises(ValueError, match="parameter_std"):
        WindowProblem(
            truth,
            B,
            set_parameters=lambda s, t: s,
            parameter_background=jnp.zeros(()),
        )
    with pytest.raises(TypeError, match="optimistix minimiser or least-squares"):
        Variational(lx.CG(rtol=1e-6, atol=1e-6))
    with pytest.raises(ValueError, match="max_steps"):
        Variational(optx.LBFGS(rtol=1e-6, atol=1e-6), max_steps=0)
    with pytest.raises(TypeError, match="AbstractCostTerm"):
        WindowProblem(truth, B, terms=[lambda x: x])
    with pytest.raises(ValueError, match="mask has shape"):
        ObservationSet(obs.values, obs.mask[:1], obs.error_std, obs.times)


def test_spectral_covariance_matches_sample_covariance():
    # Samples of a stationary process on a periodic grid: the spectral B equals the
    # translation-averaged sample covariance, and S S^T = B.
    grid = sim.Grid((12,), (12.0,))
    rng = np.random.default_rng(0)
    white = rng.normal(size=(4000, 12))
    samples = white + 0.8 * np.roll(white, 1, axis=1) - 0.3 * np.roll(white, 2, axis=1)
    cov = SpectralCovariance.from_samples(grid, samples)
    basis = jnp.eye(12)
    sqrt = jax.vmap(cov.sqrt)(basis).T
    dense = sqrt @ sqrt.T
    np.testing.assert_allclose(dense, dense.T, atol=1e-12)
    sample = np.cov(samples.T, bias=True)
    averaged = np.mean([np.roll(np.roll(sample, -i, 0), -i, 1) for i in range(12)], 0)
    # The translation average of the sample covariance is circulant: row 0 rolled.
    np.testing.assert_allclose(dense, _circulant(averaged[0]), atol=1e-10)
    # Lag correlations of the process: 1 + .64 + .09 = 1.73 variance, lag-1 0.56.
    assert abs(dense[0, 0] - 1.73) < 0.1 and abs(dense[0, 1] - 0.56) < 0.1
    with pytest.raises(ValueError, match="periodic"):
        SpectralCovariance(sim.Grid((5,), (1.0,), "dirichlet"), np.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        SpectralCovariance(grid, -np.ones(7))


def _circulant(row):
    return np.stack([np.roll(row, i) for i in range(row.size)])


def test_checkpointed_rollouts_give_the_same_4dvar():
    """Binomial checkpoints change what the gradient stores, not the analysis; the
    tangent-linear Gauss-Newton is refused with a clear error."""
    truth, obs, background, _ = _twin()
    B = DiffusionCovariance(truth.model.grid, 0.3, 0.1)
    plain = WindowProblem(truth, B, 2)
    binomial = WindowProblem(dataclasses.replace(truth, checkpoints=2), B, 2)
    assert binomial.simulator.checkpoints == 2
    control, info = minimise(plain, obs, background, max_steps=30)
    control_ck, info_ck = minimise(binomial, obs, background, max_steps=30)
    np.testing.assert_allclose(info_ck.cost, info.cost, rtol=1e-9)
    np.testing.assert_allclose(control_ck.v, control.v, rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="Gauss-Newton needs the tangent-linear"):
        minimise(binomial, obs, background, method="gauss-newton")


def test_lbfgs_backs_off_from_a_trial_step_that_blows_up():
    """A wide B makes L-BFGS's first trial steps far too long for chaotic Lorenz-96:
    the rollout blows up. The line search backs off from them (cost `inf`) and
    the solve converges, instead of stopping at a non-finite rollout (which it did
    before: the problem's simulator checks finiteness)."""
    l96 = sim.Simulator(sim.Lorenz96(40, 8.0), sim.RK4(), 0.01)
    rng = np.random.default_rng(0)
    u = l96.rollout(jnp.asarray(rng.normal(size=40)), 500)[-1]
    states = l96.rollout(u, 45, every=5)
    window = ObservationSet(
        states + jnp.asarray(rng.normal(size=states.shape)),
        jnp.ones(states.shape, bool),
        jnp.ones(states.shape),
        jnp.arange(10) * 0.05,
    )
    problem = WindowProblem(l96, DiagonalCovariance(30.0), 5)
    background = jnp.full(40, float(jnp.mean(states)))
    start = problem.initial_control(window, background)
    step = jax.grad(lambda c: problem.cost(c, window, background))(start)
    trial = Control(start.v - step.v)  # a steepest-descent trial step
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(
            problem.trajectory(problem.analysis(trial, background), 10)
        )
    control, info = minimise(problem, window, background, max_steps=200)
    assert info.converged, info.result
    analysis = problem.analysis(control, background)
    error = jnp.sqrt(jnp.mean((problem.trajectory(analysis, 10) - states) ** 2))
    assert float(error) < 0.15 * float(jnp.sqrt(jnp.mean((background - states) ** 2)))


def test_window_program_holds_no_host_callback():
    """The main job's window (incremental 4D-Var through Newton-Krylov implicit
    stages, the diffusivity field estimated, B's scale adapted) compiles to a
    program with no host callback: JAX's persistent cache never stores one that
    has any, so a raising check inside it (equinox `error_if`, lineax's transpose
    of a solve) would make every `assim-run` compile its windows again."""
    from hydra import compose, initialize_config_module

    from assim import WindowStream, analyse_window, bundled_dataset, open_observations
    from assim._config import build_problem, instantiate_trusted

    with initialize_config_module("assim.configs", version_base=None):
        cfg = compose("run")
    problem, _ = build_problem(cfg.simulator, cfg.problem, 5)
    ds = open_observations(bundled_dataset(), grid=problem.simulator.model.grid)
    window = next(iter(WindowStream(ds, 10, prefetch=0)))
    analyser = instantiate_trusted(cfg.method.analyser)
    adaptation = instantiate_trusted(cfg.method.adaptation)
    lowered = jax.jit(
        lambda w, b, s: analyse_window(analyser, problem, w, b, adaptation, s)
    ).lower(window, jnp.zeros(ds["obs"].shape[1:]), adaptation.init())
    assert "callback" not in lowered.as_text()
