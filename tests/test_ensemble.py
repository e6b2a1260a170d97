"""Ensemble filters against the Kalman filter on a linear-Gaussian problem, LETKF
against ETKF, Desroziers statistics against a known R, the hybrid covariance's
square root, and an ensemble cycled on Lorenz-96."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import l96_twin_windows

import assim
import simulators as sim
from assim import (
    ETKF,
    LETKF,
    DiagonalCovariance,
    EnKF,
    Ensemble,
    HybridCovariance,
    ObservationSet,
    Scores,
    WindowProblem,
    cycle,
)
from assim._operators import grid_points

N_GRID = 8
INTERVAL = 2


def _linear_problem():
    """Advection-diffusion with a constant diffusivity (a linear model), backward
    Euler, on 8 periodic points; every second point observed with error std 0.5."""
    grid = sim.Grid((N_GRID,), (1.0,))
    model = sim.AdvectionDiffusion(grid, 0.01 * jnp.ones(N_GRID), [0.3])
    simulator = sim.Simulator(model, sim.backward_euler(), 0.1)
    return WindowProblem(simulator, DiagonalCovariance(1.0), INTERVAL)


def _transition(problem) -> np.ndarray:
    """The model's matrix over one observation interval (linear model)."""
    step = lambda x: problem.simulator.rollout(x, INTERVAL)[-1]  # noqa: E731
    return np.asarray(jax.jacfwd(step)(jnp.zeros(N_GRID)))


def _exact_ensemble(mean, covariance, key) -> Ensemble:
    """`n + 1` members whose sample mean and covariance are exactly `mean` and
    `covariance`: the ensemble of an infinite one, for a linear model."""
    n = mean.size
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(
        np.concatenate([np.ones((n + 1, 1)), rng.normal(size=(n + 1, n))], 1)
    )[0][:, 1:]  # n orthonormal columns orthogonal to the ones vector
    root = np.linalg.cholesky(covariance)
    members = mean + np.sqrt(n) * basis @ root.T
    return Ensemble(jnp.asarray(members), key)


def _windows(truth, rng, std, mask, n_windows, length):
    windows = []
    for k in range(n_windows):
        states = truth[k * length : (k + 1) * length]
        values = states + std * rng.normal(size=states.shape)
        windows.append(
            ObservationSet(
                jnp.asarray(np.where(mask, values, 0.0)),
                jnp.asarray(np.broadcast_to(mask, states.shape)),
                jnp.full(states.shape, std),
                jnp.arange(k * length, (k + 1) * length) * 1.0,
                jnp.asarray(states),
            )
        )
    return windows


def _kalman_filter(M, H, R, mean, P, windows):
    """The Kalman filter's analysis means and variances at every time, and the
    forecast after the last."""
    means, variances = [], []
    for window in windows:
        for t in range(window.n_times):
            y = np.asarray(window.values[t])[H]
            Hm = np.eye(N_GRID)[H]
            K = P @ Hm.T @ np.linalg.inv(Hm @ P @ Hm.T + R)
            mean = mean + K @ (y - Hm @ mean)
            P = (np.eye(N_GRID) - K @ Hm) @ P
            means.append(mean)
            variances.append(np.diag(P))
            mean, P = M @ mean, M @ P @ M.T
    return np.array(means), np.array(variances), mean, P


def test_etkf_with_an_exact_ensemble_is_the_kalman_filter():
    """On a linear-Gaussian problem an ensemble whose mean and covariance are exact
    (the infinite-member limit) stays exact under the ETKF: its analysis means
    and spreads, and its forecast covariance, equal the Kalman filter's (1e-8)."""
    problem = _linear_problem()
    M = _transition(problem)
    rng = np.random.default_rng(1)
    mean0 = rng.normal(size=N_GRID)
    A = rng.normal(size=(N_GRID, N_GRID))
    P0 = 0.1 * A @ A.T + 0.5 * np.eye(N_GRID)
    truth = [mean0 + np.linalg.cholesky(P0) @ rng.normal(size=N_GRID)]
    for _ in range(11):
        truth.append(M @ truth[-1])
    observed = np.arange(N_GRID) % 2 == 0
    windows = _windows(np.array(truth), rng, 0.5, observed, 4, 3)
    ensemble = _exact_ensemble(mean0, P0, jax.random.PRNGKey(0))
    results = list(cycle(ETKF(), problem, windows, ensemble))
    means = np.concatenate([r.analysis for r in results])
    spreads = np.concatenate([r.spread for r in results])
    R = 0.25 * np.eye(observed.sum())
    kf_means, kf_vars, kf_mean, kf_P = _kalman_filter(
        M, observed, R, mean0, P0, windows
    )
    np.testing.assert_allclose(means, kf_means, atol=1e-8)
    np.testing.assert_allclose(spreads, np.sqrt(kf_vars), atol=1e-8)
    # The forecast ensemble after the last window carries the KF's covariance.
    forecast = _forecast_after(problem, windows, ensemble)
    X = np.asarray(forecast.anomalies)
    np.testing.assert_allclose(forecast.mean, kf_mean, atol=1e-8)
    np.testing.assert_allclose(X.T @ X / N_GRID, kf_P, atol=1e-8)


def _forecast_after(problem, windows, ensemble):
    """The ensemble forecast after the last window (the cycle's own handover)."""
    run = eqx.filter_jit(ETKF().filter_window)
    for window in windows:
        ensemble = run(problem, window, ensemble)["forecast"]
    return ensemble


def test_stochastic_enkf_mean_approaches_the_kalman_filter():
    """The perturbed-observation EnKF with many members: its analysis mean is the
    Kalman filter's within sampling error (one analysis, 4000 members)."""
    problem = _linear_problem()
    rng = np.random.default_rng(2)
    mean0 = rng.normal(size=N_GRID)
    P0 = np.eye(N_GRID)
    observed = np.ones(N_GRID, bool)
    windows = _windows(mean0[None] + 1.0, rng, 0.5, observed, 1, 1)
    members = mean0 + rng.normal(size=(4000, N_GRID))
    ensemble = Ensemble(jnp.asarray(members), jax.random.PRNGKey(3))
    (result,) = cycle(EnKF(), problem, windows, ensemble)
    kf_means, _, _, _ = _kalman_filter(
        np.eye(N_GRID), observed, 0.25 * np.eye(N_GRID), members.mean(0), P0, windows
    )
    np.testing.assert_allclose(result.analysis[0], kf_means[0], atol=0.03)


def test_letkf_with_infinite_radius_is_the_etkf():
    l96, B, windows = l96_twin_windows(3, 2, 5, spinup=300)
    problem = WindowProblem(l96, B, 5)
    ensemble = Ensemble.sample(
        windows[0].truth[0], DiagonalCovariance(1.0), 12, jax.random.PRNGKey(0)
    )
    etkf = list(cycle(ETKF(inflation=1.05), problem, windows, ensemble))
    for stride in (1, None):  # every point analysed; the default interpolation
        letkf = LETKF(radius=1e9, inflation=1.05, weight_stride=stride)
        for a, b in zip(etkf, cycle(letkf, problem, windows, ensemble), strict=True):
            np.testing.assert_allclose(a.analysis, b.analysis, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(a.spread, b.spread, rtol=1e-9, atol=1e-9)
    # A finite radius is a different analysis.
    local = list(cycle(LETKF(radius=2.0, inflation=1.05), problem, windows, ensemble))
    assert np.abs(local[-1].analysis - etkf[-1].analysis).max() > 1e-3


def test_letkf_weight_interpolation_is_exact_where_it_analyses():
    """Weight interpolation (`weight_stride`): the analysed grid points get the
    exact LETKF analysis (1e-12), the points between it within a tenth of the
    increment, on Lorenz-96 (periodic) and on a 2D Dirichlet grid (whose last row
    and column are analysed too); the default stride is the radius."""
    rng = np.random.default_rng(4)
    for grid, radius, stride in (
        (sim.Grid((40,), (40.0,)), 4.0, 2),
        (sim.Grid((9, 8), (1.0, 1.0), "dirichlet"), 0.4, 3),
    ):
        P = int(np.prod(grid.shape))
        field = np.cumsum(rng.normal(size=(12, *grid.shape)), axis=-1)  # smooth
        members = jnp.asarray(field / np.sqrt(np.arange(1, grid.shape[-1] + 1)))
        mean = members.mean(0)
        Y = (members - mean).reshape(12, P) / 0.7  # H = I, error std 0.7
        d = jnp.asarray(rng.normal(size=P))
        locations = grid_points(grid)

        def analyse(filter, members=members, Y=Y, d=d, grid=grid, at=locations):
            return filter.update(members, Y, d, None, None, grid, at)

        exact, chi2 = analyse(LETKF(radius=radius, weight_stride=1))
        coarse, chi2_coarse = analyse(LETKF(radius=radius, weight_stride=stride))
        exact, coarse = np.asarray(exact), np.asarray(coarse)
        indices = []
        for n in grid.shape:
            index = list(range(0, n, stride))
            if grid.boundary == "dirichlet" and index[-1] != n - 1:
                index.append(n - 1)
            indices.append(index)
        kept = np.zeros(grid.shape, bool)
        kept[np.ix_(*indices)] = True
        np.testing.assert_allclose(coarse[:, kept], exact[:, kept], atol=1e-12)
        increment = np.abs(exact - np.asarray(members)).max()
        assert 0 < np.abs(coarse - exact).max() < 0.1 * increment
        assert np.abs(coarse[:, ~kept] - exact[:, ~kept]).max() > 1e-8
        np.testing.assert_allclose(chi2_coarse, chi2, rtol=1e-12)
    assert LETKF(radius=4.0).strides_on(sim.Grid((40,), (40.0,))) == (4,)
    ks = sim.Grid((128,), (32 * np.pi,))
    assert LETKF(relative_radius=0.1).strides_on(ks) == (12,)
    with pytest.raises(ValueError, match="weight_stride"):
        LETKF(weight_stride=0)


def test_enkf_draws_do_not_depend_on_the_window_length():
    """The stochastic EnKF's perturbations come from one key per time, split in
    turn: four windows of 2 times and two of 4 give the same analyses."""
    l96, B, windows = l96_twin_windows(4, 2, 5, spinup=300)
    problem = WindowProblem(l96, B, 5)
    ensemble = Ensemble.sample(
        windows[0].truth[0], DiagonalCovariance(1.0), 10, jax.random.PRNGKey(5)
    )
    joined = [
        jax.tree.map(lambda a, b: jnp.concatenate([a, b]), *windows[k : k + 2])
        for k in (0, 2)
    ]
    short = np.concatenate(
        [r.analysis for r in cycle(EnKF(inflation=1.05), problem, windows, ensemble)]
    )
    long = np.concatenate(
        [r.analysis for r in cycle(EnKF(inflation=1.05), problem, joined, ensemble)]
    )
    np.testing.assert_allclose(short, long, rtol=1e-10, atol=1e-10)


def test_gaspari_cohn_taper_and_localisation_matrix():
    z = jnp.linspace(0, 2.5, 251)
    c = np.asarray(assim.gaspari_cohn(z))
    assert c[0] == 1.0 and np.all(c[z >= 2] == 0) and np.all(np.diff(c) <= 1e-12)
    # Never negative, in float32 too (rounding made it -1e-6 just below 2: a NaN
    # in the LETKF's square root, on every float32 run).
    fine = jnp.linspace(0, 2.5, 100001, dtype=jnp.float32)
    assert float(jnp.min(assim.gaspari_cohn(fine))) >= 0.0
    # DAPPER's radius convention: exp(-1/2) at the radius.
    from assim._ensemble import taper

    assert abs(float(taper(jnp.asarray(3.0), 3.0)) - np.exp(-0.5)) < 0.02
    grid = sim.Grid((40,), (40.0,))
    L = assim.gaspari_cohn_correlation(grid, 4.0)
    dense = np.asarray(jax.vmap(L.apply)(jnp.eye(40)))
    np.testing.assert_allclose(np.diag(dense), 1.0, atol=1e-6)
    np.testing.assert_allclose(dense[0, 20], 0.0, atol=1e-6)  # beyond the support
    with pytest.raises(ValueError, match="periodic"):
        assim.gaspari_cohn_correlation(sim.Grid((8,), (1.0,), "dirichlet"), 1.0)


def test_desroziers_statistics_recover_a_known_observation_error():
    """A Kalman-optimal analysis (the exact ETKF on a linear twin) makes
    `E[d_oa d_ob] = R`: the Scores' estimate of the observation-error std is the
    true 0.5 within sampling error (800 observations: about 5%)."""
    problem = _linear_problem()
    M = _transition(problem)
    rng = np.random.default_rng(4)
    mean0, P0 = np.zeros(N_GRID), np.eye(N_GRID)
    truth = [np.linalg.cholesky(P0) @ rng.normal(size=N_GRID)]
    for _ in range(199):
        truth.append(M @ truth[-1])
    observed = np.ones(N_GRID, bool)
    windows = _windows(np.array(truth), rng, 0.5, observed, 20, 10)
    ensemble = _exact_ensemble(mean0, P0, jax.random.PRNGKey(0))
    scores = Scores(problem.simulator.model.grid, burn_in=100)
    for result in cycle(ETKF(), problem, windows, ensemble):
        scores.add(result)
    found = scores.metrics()["desroziers"]
    assert found["observations"] == 800
    assert found["observation_error_std_assumed"] == pytest.approx(0.5)
    assert found["observation_error_std_estimated"] == pytest.approx(0.5, rel=0.1)
    assert found["observation_error_variance_ratio"] == pytest.approx(1.0, rel=0.2)


def test_hybrid_covariance_square_root_is_consistent(getkey):
    """`S` and `S^T` are adjoint, `B = S S^T` is the weighted sum of the static and
    the localised ensemble covariances (dense check on 16 points), and `whiten`
    gives a control that `sqrt` maps back to the increment."""
    grid = sim.Grid((16,), (16.0,))
    rng = np.random.default_rng(5)
    anomalies = jnp.asarray(rng.normal(size=(6, 16)))
    anomalies = anomalies - anomalies.mean(0)
    static = DiagonalCovariance(0.7)
    L = assim.gaspari_cohn_correlation(grid, 3.0)
    for localisation in (None, L):
        B = HybridCovariance(static, anomalies, 0.6, localisation)
        x = jax.random.normal(getkey(), (16,))
        v = jax.tree.map(
            lambda z: jax.random.normal(getkey(), z.shape), B.zeros_control(x)
        )
        lhs = jnp.vdot(B.sqrt(v), x)
        rhs = sum(
            jnp.vdot(a, b)
            for a, b in zip(
                jax.tree.leaves(v), jax.tree.leaves(B.sqrt_transpose(x)), strict=True
            )
        )
        assert abs(lhs - rhs) < 1e-10 * abs(lhs)
        dense = np.asarray(jax.vmap(B.apply)(jnp.eye(16)))
        P = np.asarray(anomalies.T @ anomalies) / 5
        if localisation is not None:
            P = P * np.asarray(jax.vmap(L.apply)(jnp.eye(16)))
        np.testing.assert_allclose(dense, 0.4 * 0.49 * np.eye(16) + 0.6 * P, atol=1e-8)
        np.testing.assert_allclose(B.sqrt(B.whiten(x)), x, atol=1e-6)
    with pytest.raises(ValueError, match="weight"):
        HybridCovariance(static, anomalies, 1.5)


def test_hybrid_envar_cycles_and_beats_its_first_background():
    """Hybrid 4D-Var on Lorenz-96 windows of 2 times: the analyses are finite,
    report the ensemble's spread, and are closer to the truth than the
    backgrounds; with weight 0 it is static-B 4D-Var from the ensemble mean."""
    l96, B, windows = l96_twin_windows(4, 2, 5, spinup=300)
    problem = WindowProblem(l96, B, 5)
    ensemble = Ensemble.sample(windows[0].truth[0] + 0.5, B, 16, jax.random.PRNGKey(1))
    variational = assim.Variational(assim.incremental(), 3)
    hybrid = assim.HybridEnVar(
        variational, ETKF(inflation=1.05), weight=0.8, localisation_radius=4.0
    )
    results = list(cycle(hybrid, problem, windows, ensemble))
    analysis = np.mean([r.diagnostics["rmse_truth_analysis"] for r in results])
    background = np.mean([r.diagnostics["rmse_truth_background"] for r in results])
    assert analysis < background, (analysis, background)
    assert all(r.spread.shape == (2, 40) for r in results)
    static = assim.HybridEnVar(variational, ETKF(), weight=0.0, static_variance="as_is")
    (first,) = cycle(static, problem, windows[:1], ensemble)
    (plain,) = cycle(variational, problem, windows[:1], ensemble.mean)
    np.testing.assert_allclose(first.analysis, plain.analysis, rtol=1e-5, atol=1e-5)


def test_ensembles_refuse_what_they_cannot_do():
    l96, B, windows = l96_twin_windows(2, 2, 5, spinup=100)
    problem = WindowProblem(l96, B, 5)
    ensemble = Ensemble.sample(windows[0].truth[0], B, 4, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="Ensemble as background"):
        list(cycle(ETKF(), problem, windows, windows[0].truth[0]))
    with pytest.raises(ValueError, match="Ensemble as background"):
        list(cycle(assim.NoUpdate(), problem, windows, ensemble))
    with pytest.raises(ValueError, match="cycled"):
        list(assim.assimilate(ETKF(), problem, windows, ensemble))
    with pytest.raises(ValueError, match="no shift"):
        list(cycle(ETKF(), problem, windows, ensemble, shift=1))
    with pytest.raises(ValueError, match="inflation"):
        ETKF(inflation=0.9)
    with pytest.raises(ValueError, match="at least 2"):
        Ensemble.sample(windows[0].truth[0], B, 1, jax.random.PRNGKey(0))


def test_ensemble_is_split_over_devices():
    """`Ensemble.shard` splits the members over a mesh's devices when they divide
    (one device here: unchanged; the sharded run is in parallel_check.py)."""
    ensemble = Ensemble(jnp.zeros((4, 3)), jax.random.PRNGKey(0))
    sharded = ensemble.shard()
    np.testing.assert_array_equal(sharded.members, ensemble.members)
