"""Error scales adapted while cycling (`InnovationAdaptation`): recovered on a
linear-Gaussian twin whose statistics are known."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

import simulators as sim
from assim import (
    DiffusionCovariance,
    InnovationAdaptation,
    ObservationSet,
    Variational,
    WindowProblem,
    analyse_window,
    incremental,
)


@pytest.mark.parametrize("observation_error", [False, True])
def test_adaptation_recovers_known_error_scales(observation_error):
    """Backgrounds drawn from N(x_t, s^2 B0) with s = 0.4, observations of half the
    grid with error std 0.25; B is configured as B0 (2.5 times too wide in std)
    and, with `observation_error`, R with std 0.5 (twice too wide). After 150
    windows of a linear analysis (one time, so the model is not run; one exact
    Gauss-Newton step), the adapted scales are within 20% of the true ones:
    0.4, and 0.5 on R when it is estimated."""
    l96 = sim.Simulator(sim.Lorenz96(64, 8.0), sim.RK4(), 0.01)
    grid = l96.model.grid
    B0 = DiffusionCovariance(grid, 1.0, 3.0)
    s_true, sigma_true = 0.4, 0.25
    sigma_configured = 0.5 if observation_error else sigma_true
    problem = WindowProblem(l96, B0)
    analyser = Variational(incremental(inner_steps=200, inner_rtol=1e-10), 1)
    adaptation = InnovationAdaptation(
        observation_error=observation_error, forgetting=0.98
    )
    state = adaptation.init()
    analyse = eqx.filter_jit(analyse_window)
    rng = np.random.default_rng(0)
    mask = np.zeros((1, 64), bool)
    mask[0, ::2] = True
    for k in range(150):
        truth = 3.0 * rng.normal(size=64)
        background = truth + s_true * np.asarray(
            B0.sqrt(jnp.asarray(rng.normal(size=64)))
        )
        values = truth + sigma_true * rng.normal(size=64)
        window = ObservationSet(
            jnp.asarray(np.where(mask, values, 0.0)),
            jnp.asarray(mask),
            jnp.full((1, 64), sigma_configured),
            jnp.asarray([float(k)]),
        )
        out = analyse(
            analyser, problem, window, jnp.asarray(background), adaptation, state
        )
        state = out["adaptation"]
    s_b = float(jnp.sqrt(state.background_variance))
    s_o = float(jnp.sqrt(state.observation_variance))
    assert abs(s_b - s_true) < 0.2 * s_true, s_b
    expected_s_o = sigma_true / sigma_configured
    assert abs(s_o - expected_s_o) < 0.2 * expected_s_o, s_o
    if not observation_error:
        assert s_o == 1.0


def test_first_window_is_analysed_as_configured():
    """The first background is not a forecast: the first window keeps B0 and does
    not enter the sums."""
    adaptation = InnovationAdaptation()
    state = adaptation.init()
    window = ObservationSet(
        jnp.ones((1, 4)), jnp.ones((1, 4), bool), jnp.ones((1, 4)), jnp.zeros(1)
    )
    terms = {"background": jnp.asarray(10.0), "observations": jnp.asarray(0.5)}
    trajectory = jnp.zeros((1, 4))
    after = adaptation.update(state, window, terms, trajectory, trajectory)
    assert float(after.background_variance) == 1.0
    assert float(after.background_term) == 0.0 and int(after.windows) == 1
    # The second window's statistics move the scale, at most by max_factor.
    again = adaptation.update(after, window, terms, trajectory, trajectory)
    assert float(again.background_variance) == adaptation.max_factor


def test_bad_settings():
    for kwargs, match in [
        ({"forgetting": 1.0}, "forgetting"),
        ({"max_factor": 1.0}, "max_factor"),
        ({"bounds": (1.0, 0.5)}, "bounds"),
    ]:
        with pytest.raises(ValueError, match=match):
            InnovationAdaptation(**kwargs)
