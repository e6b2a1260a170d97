"""Models against independent references, stability, and the structured solves."""

import contextlib

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
from helpers import TIGHT, smooth_state
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import solve_ivp

import simulators as sim


def _ks_etdrk4_reference(u0, length, dt, n_steps):
    """Numpy ETD-RK4 (Cox & Matthews 2002; Kassam & Trefethen 2005, contour-integral
    coefficients) for KS with the same 2/3-rule dealiasing."""
    n = u0.size
    k = 2 * np.pi * np.fft.rfftfreq(n, d=length / n)
    lin = k**2 - k**4
    mask = np.abs(k) < (2 / 3) * np.pi * n / length
    g = -0.5j * k * mask
    e, e2 = np.exp(dt * lin), np.exp(dt * lin / 2)
    r = np.exp(1j * np.pi * (np.arange(1, 33) - 0.5) / 32)
    lr = dt * lin[:, None] + r[None, :]
    q = dt * np.real(np.mean((np.exp(lr / 2) - 1) / lr, axis=1))
    f1 = dt * np.real(np.mean((-4 - lr + np.exp(lr) * (4 - 3 * lr + lr**2)) / lr**3, 1))
    f2 = dt * np.real(np.mean((2 + lr + np.exp(lr) * (-2 + lr)) / lr**3, axis=1))
    f3 = dt * np.real(np.mean((-4 - 3 * lr - lr**2 + np.exp(lr) * (4 - lr)) / lr**3, 1))

    def nl(v):
        return g * np.fft.rfft(np.fft.irfft(v, n) ** 2)

    v = np.fft.rfft(u0)
    for _ in range(n_steps):
        nv = nl(v)
        a = e2 * v + q * nv
        na = nl(a)
        b = e2 * v + q * na
        nb = nl(b)
        c = e2 * a + q * (2 * nb - nv)
        nc = nl(c)
        v = e * v + nv * f1 + 2 * (na + nb) * f2 + nc * f3
    return np.fft.irfft(v, n)


def test_kuramoto_sivashinsky_matches_etdrk4_reference():
    model = sim.KuramotoSivashinsky()
    (x,) = model.grid.mesh()
    u0 = jnp.cos(x / 16) * (1 + jnp.sin(x / 16))
    final_time, dt = 10.0, 0.05
    simulator = sim.Simulator(model, sim.IMEXRungeKutta("ars443"), dt)
    ours = jax.jit(lambda u: simulator.rollout(u, round(final_time / dt))[-1])(u0)
    reference = _ks_etdrk4_reference(np.asarray(u0), 32 * np.pi, 0.005, 2000)
    # Same semi-discretisation; ARS(4,4,3) at dt = 0.05 vs ETDRK4 at dt = 0.005 differ
    # by the third-order time error ~1e-5 of a state of size ~1 (measured 2e-6).
    error = float(jnp.max(jnp.abs(ours - reference)))
    assert error < 1e-4, error
    assert float(jnp.max(jnp.abs(ours - u0))) > 0.1  # the state really moved


L96_SCHEMES = [
    ("rk4", sim.RK4(), 1e-3),
    ("implicit-midpoint", sim.ImplicitMidpoint(TIGHT), 0.25),
    ("crank-nicolson", sim.crank_nicolson(TIGHT), 0.15),
    (
        "diffrax-kvaerno5",
        sim.DiffraxScheme(
            diffrax.Kvaerno5(root_finder=optx.Newton(rtol=1e-12, atol=1e-12)),
            order_=5,
        ),
        1e-3,
    ),
]


@pytest.mark.parametrize(
    "name,scheme,bound", L96_SCHEMES, ids=[s[0] for s in L96_SCHEMES]
)
def test_lorenz96_matches_solve_ivp(name, scheme, bound):
    model = sim.Lorenz96(40, forcing=8.0)
    u0 = 8.0 + jnp.sin(jnp.arange(40.0))
    final_time = 1.0

    def rhs(t, u):
        return (np.roll(u, -1) - np.roll(u, 2)) * np.roll(u, 1) - u + 8.0

    reference = solve_ivp(
        rhs, (0, final_time), np.asarray(u0), method="DOP853", rtol=1e-13, atol=1e-13
    ).y[:, -1]
    rollout = eqx.filter_jit(lambda s, u, n: s.rollout(u, n)[-1])
    errors = []
    for n in (100, 200):
        ours = rollout(sim.Simulator(model, scheme, final_time / n), u0, n)
        errors.append(float(np.max(np.abs(np.asarray(ours) - reference))))
    # Agreement with an independent integrator at the scheme's own order (halving dt
    # divides the error by ~2^p; 0.3 slack for the pre-asymptotic regime), and an
    # absolute error at dt = 0.005 within the scheme's measured bound (state ~10;
    # L96's fast time scales make second-order errors ~1e-1 over t = 1).
    order = np.log2(errors[0] / errors[1])
    assert order > min(scheme.order, 4) - 0.3, errors
    assert errors[1] < bound, errors


@pytest.mark.parametrize("scheme", [sim.backward_euler(), sim.crank_nicolson()])
def test_implicit_diffusion_stable_far_above_explicit_limit(scheme):
    grid = sim.Grid((64,), (1.0,), "dirichlet")
    (x,) = grid.mesh()
    kappa = 0.01 * (1.5 + jnp.sin(2 * np.pi * x))  # a field: Newton-Krylov path
    explicit_limit = grid.spacing[0] ** 2 / (2 * float(kappa.max()))
    simulator = sim.Simulator(
        sim.AdvectionDiffusion(grid, kappa, [0.0]), scheme, 100 * explicit_limit
    )
    rng = np.random.default_rng(0)
    u0 = jnp.asarray(rng.normal(size=64))  # all modes, the stiffest included
    trajectory = jax.jit(lambda u: simulator.rollout(u, 20))(u0)
    norms = jnp.sqrt(jnp.sum(trajectory**2, axis=1))
    # A-stable schemes on a symmetric negative-definite operator: the energy norm
    # never grows. The explicit limit is real: RK4 at this step blows up.
    assert bool(jnp.all(jnp.diff(norms) <= 1e-12)), norms
    assert float(norms[-1]) < 0.5 * float(norms[0])
    explicit = sim.Simulator(simulator.model, sim.RK4(), simulator.dt)
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(explicit.rollout(u0, 60))


@pytest.mark.parametrize("boundary", ["periodic", "dirichlet"])
def test_structured_inverse_matches_matrix_free(boundary):
    """FFT / DST solves equal the matrix-free Krylov solve of the same operator."""
    grid = sim.Grid((9, 12), (1.0, 1.5), boundary)
    constant = sim.AdvectionDiffusion(grid, 0.3, [0.0, 0.0])
    field = sim.AdvectionDiffusion(grid, jnp.full(grid.shape, 0.3), [0.0, 0.0])
    rhs = smooth_state(grid)
    a = constant.linear_inverse(rhs, 0.7)
    b = field.linear_inverse(rhs, 0.7)
    assert float(jnp.max(jnp.abs(a - b))) < 1e-9
    residual = a - 0.7 * constant.linear(a) - rhs
    assert float(jnp.max(jnp.abs(residual))) < 1e-12


def test_navier_stokes_decays_without_forcing():
    """Unforced 2D NS: enstrophy decays and a Taylor-Green vortex decays exactly."""
    model = sim.NavierStokes2D(32, nu=0.05, alpha=0.0, amplitude=0.0)
    y, x = model.grid.mesh()
    w0 = 2 * jnp.cos(x) * jnp.cos(y)  # steady shape: nonlinear term vanishes
    simulator = sim.Simulator(model, sim.IMEXRungeKutta("ars443"), 0.1)
    final = jax.jit(lambda w: simulator.rollout(w, 10)[-1])(w0)
    exact = w0 * np.exp(-2 * 0.05 * 1.0)
    assert float(jnp.max(jnp.abs(final - exact))) < 1e-6


def test_navier_stokes_advection_is_the_dealiased_advective_form():
    """The Basdevant form of the advection equals `u . grad w` of the vorticity's
    2/3-rule truncation, dealiased (to rounding, on a field that is not band-limited);
    without the truncation aliasing would show (3% here); float32 stays float32."""
    model = sim.NavierStokes2D(24, nu=1e-3, alpha=0.1, amplitude=0.7, wavenumber=2)
    grid, mask = model.grid, model.grid.dealias_mask()
    ky, kx = grid.wavenumbers()
    w = jnp.asarray(np.random.default_rng(0).normal(size=grid.shape))

    def advective(w_hat):
        u, v = model._velocity(w_hat)
        grad_x, grad_y = grid.ifft(1j * kx * w_hat), grid.ifft(1j * ky * w_hat)
        forcing_hat = grid.fft(model.forcing())
        return forcing_hat - grid.fft(u * grad_x + v * grad_y) * mask

    found = model.nonlinear_spectral(grid.fft(w))
    expected = advective(grid.fft(w) * mask)
    scale = float(jnp.max(jnp.abs(expected)))
    assert float(jnp.max(jnp.abs(found - expected))) < 1e-12 * scale
    aliased = advective(grid.fft(w))
    assert float(jnp.max(jnp.abs(aliased - expected))) > 1e-2 * scale
    single = model.nonlinear_spectral(grid.fft(w.astype(jnp.float32)))
    assert single.dtype == jnp.complex64
    assert float(jnp.max(jnp.abs(single - found))) < 1e-5 * scale


def test_correction_is_inside_the_implicit_step():
    """A linear correction c(u) = -a u equals adding -a to the model's damping."""
    a = 0.7

    class Damping(eqx.Module):
        rate: jax.Array

        def __call__(self, u):
            return -self.rate * u

    grid = sim.Grid((16,), (1.0,))
    u0 = smooth_state(grid)
    model = sim.Burgers(grid, 0.05)
    hybrid = sim.Simulator(model, sim.backward_euler(TIGHT), 0.1, Damping(jnp.array(a)))
    plain = sim.Simulator(model, sim.backward_euler(TIGHT), 0.1)
    u1 = hybrid.step(u0)
    # Backward Euler: u1 - dt (f(u1) - a u1) = u0
    residual = u1 - 0.1 * (model.tendency(u1) - a * u1) - u0
    assert float(jnp.max(jnp.abs(residual))) < 1e-10
    assert float(jnp.max(jnp.abs(u1 - plain.step(u0)))) > 1e-3
    grad = jax.grad(
        lambda c: jnp.sum(
            hybrid.__class__(model, hybrid.scheme, 0.1, c).rollout(u0, 2)[-1] ** 2
        )
    )(Damping(jnp.array(a)))
    assert float(grad.rate) != 0.0


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(3, 12),
    boundary=st.sampled_from(["periodic", "dirichlet"]),
    eta=st.floats(1e-3, 1e3),
    kappa=st.floats(1e-3, 10.0),
)
def test_structured_inverse_is_exact(n, boundary, eta, kappa):
    """(I - eta kappa Lap)^{-1} by FFT/DST inverts the finite-difference operator for
    any size, boundary, step and diffusivity (stiff ones included)."""
    grid = sim.Grid((n, n + 1), (1.0, 2.0), boundary)
    model = sim.AdvectionDiffusion(grid, kappa, [0.0, 0.0])
    rhs = smooth_state(grid, seed=n)

    @jax.jit  # one program per example instead of one per operation
    def residual(model, rhs, eta):
        x = model.linear_inverse(rhs, eta)
        return jnp.max(jnp.abs(x - eta * model.linear(x) - rhs))

    assert float(residual(model, rhs, eta)) < 1e-10 * (1 + eta * kappa * n**2)


@pytest.mark.parametrize("boundary", ["periodic", "dirichlet"])
@pytest.mark.parametrize("ndim", [1, 2])
def test_kappa_field_inverse(boundary, ndim):
    """(I - eta L)^{-1} for a kappa field (tridiagonal in 1D Dirichlet, conjugate
    gradients otherwise) solves the stage equation; conjugate gradients are right
    because the diffusion is symmetric negative semidefinite (`symmetric_linear`):
    `<a, L b> = <L a, b>` and `<a, L a> <= 0` on random fields."""
    grid = sim.Grid((11,) * ndim, (1.0,) * ndim, boundary)
    kappa = 0.2 * (1.5 + jnp.sin(2 * np.pi * grid.mesh()[-1]))
    model = sim.AdvectionDiffusion(grid, kappa, [0.0] * ndim)
    rhs = smooth_state(grid)
    x = model.linear_inverse(rhs, 3.0)
    assert float(jnp.max(jnp.abs(x - 3.0 * model.linear(x) - rhs))) < 1e-10
    assert model.symmetric_linear
    a, b = jax.random.normal(jax.random.key(ndim), (2, *grid.shape))
    la, lb = model.linear(a), model.linear(b)
    scale = float(jnp.sqrt(jnp.vdot(la, la) * jnp.vdot(b, b)))
    assert abs(float(jnp.vdot(a, lb) - jnp.vdot(la, b))) < 1e-13 * scale
    assert float(jnp.vdot(a, la)) < 0


def test_kappa_field_inverse_of_a_blown_up_state_is_nan():
    """A non-finite right-hand side (a line-search trial that blew up) gives NaN for
    the optimiser to back off from, not a GMRES stagnation error; batched with
    finite ones, they are solved as before, at any scale."""
    grid = sim.Grid((10, 10), (1.0, 1.0))
    kappa = 0.2 * (1.5 + jnp.sin(2 * np.pi * grid.mesh()[-1]))
    model = sim.AdvectionDiffusion(grid, kappa, [0.0, 0.0])
    rhs = smooth_state(grid)
    spike = jnp.zeros_like(rhs).at[2, 2].set(1e6)
    batch = jnp.stack([rhs, rhs.at[3, 4].set(jnp.inf), spike])
    x = jax.jit(jax.vmap(lambda b: model.linear_inverse(b, 3.0)))(batch)
    assert bool(jnp.all(jnp.isnan(x[1])))
    assert float(jnp.max(jnp.abs(x[0] - 3.0 * model.linear(x[0]) - rhs))) < 1e-10
    # Tolerances relative to the right-hand side: a large localised one converges
    # as well (with lineax's fixed atol, GMRES stagnated on it).
    residual = x[2] - 3.0 * model.linear(x[2]) - spike
    assert float(jnp.max(jnp.abs(residual))) < 1e-10 * 1e6


@pytest.mark.parametrize("boundary,ndim", [("periodic", 2), ("dirichlet", 1)])
def test_kappa_field_inverse_derivatives_of_a_blown_up_trial_are_nan(boundary, ndim):
    """A trial rollout that blows up late sends non-finite cotangents (and a blown-up
    direction non-finite tangents) into the solves of its still-finite steps: they
    give NaN (the cost is infinite and the line search backs off), not lineax's
    non-finite-input error. Finite ones are differentiated as before, kappa
    included (against the dense inverse)."""
    grid = sim.Grid((9,) * ndim, (1.0,) * ndim, boundary)
    kappa = 0.2 * (1.5 + jnp.sin(2 * np.pi * grid.mesh()[-1]))
    model = sim.AdvectionDiffusion(grid, kappa, [0.0] * ndim)
    rhs, weight = smooth_state(grid), smooth_state(grid, seed=3)

    def solve(b, k, scale):
        x = eqx.tree_at(lambda m: m.kappa, model, k).linear_inverse(b, 3.0)
        return jnp.sum(x * weight * scale)  # scale inf: a blown-up later step

    gradient = jax.jit(jax.grad(solve, argnums=(0, 1)))
    g_rhs, g_kappa = gradient(rhs, kappa, jnp.inf)
    assert bool(jnp.all(jnp.isnan(g_rhs)) and jnp.all(jnp.isnan(g_kappa)))
    tangent = jax.jit(lambda t: jax.jvp(lambda b: solve(b, kappa, 1.0), (rhs,), (t,)))
    assert bool(jnp.isnan(tangent(rhs.at[(0,) * ndim].set(jnp.nan))[1]))
    # Finite: the dense inverse's gradients.
    n = rhs.size
    dense = jax.vmap(lambda e: e - 3.0 * model.linear(e.reshape(rhs.shape)).ravel())
    A = dense(jnp.eye(n)).T
    g_rhs, g_kappa = gradient(rhs, kappa, 1.0)
    np.testing.assert_allclose(
        g_rhs.ravel(), jnp.linalg.solve(A.T, weight.ravel()), rtol=1e-9
    )
    fd = solve(rhs, kappa * 1.000001, 1.0) - solve(rhs, kappa * 0.999999, 1.0)
    np.testing.assert_allclose(jnp.vdot(g_kappa, kappa * 1e-6), fd / 2, rtol=1e-5)


@pytest.mark.parametrize(
    "scheme", [sim.backward_euler(), sim.crank_nicolson(), sim.IMEXRungeKutta()]
)
@pytest.mark.parametrize("boundary", ["periodic", "dirichlet"])
def test_float32_default_tolerances_are_reachable(scheme, boundary):
    """Single precision (JAX's default) with the default tolerances: every solve
    converges (none raises) on a kappa-field model, values and gradients."""
    with jax.enable_x64(False):
        grid = sim.Grid((12, 16), (1.0, 1.0), boundary)
        kappa = 0.05 * (1.5 + jnp.sin(2 * np.pi * grid.mesh()[1]))
        model = sim.AdvectionDiffusion(grid, kappa, [0.3, 0.2])
        simulator = sim.Simulator(model, scheme, 0.05)
        u0 = smooth_state(grid)
        grad = jax.jit(jax.grad(lambda u: jnp.sum(simulator.rollout(u, 3) ** 2)))(u0)
        assert grad.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize(
    "dtype,units,stiffness,learned,tol",
    [
        ("float32", 300.0, 0.4, 0.0, 2e-6),
        ("float32", 1.0, 6.6, 0.0, 1e-5),
        ("float32", 1.0, 100.0, 0.0, 1e-5),
        ("float64", 300.0, 400.0, 0.0, 1e-12),
        ("float32", 1.0, 100.0, 0.99, 1e-5),
    ],
)
def test_newton_converges_in_large_units_and_stiff_stages(
    dtype, units, stiffness, learned, tol
):
    """Backward Euler on a kappa field with a state in large units (300: kelvin), a
    stiff stage (`eta kappa / dx^2` = 6.6, as 128^2 at the bundled model's dt; 100,
    as 512^2) and a source that changes sign: Newton's tests are floored at the
    stage's round-off (`eps (1 + eta |J_f|)` times the state's size), so Newton
    converges in a few iterations a step to the exact solution (a dense solve: the
    model is linear), where its tolerances sat below round-off and it stagnated to
    its iteration cap (each case fails without its floor: float32 at 6.6 and in
    kelvin on the residual test, at 100 on the step test where the state crosses
    zero, float64 in kelvin at 400 on the residual test). Measured errors: 2-6e-7
    (float32), 8e-14 (float64). `learned`: that share of the diffusivity in a
    learned correction added to the tendency instead of the model, whose stiffness
    the floor counts too (the case fails where it probes the model alone)."""
    grid = sim.Grid((16, 16), (1.0, 1.0))
    y, x = grid.mesh()
    kappa = 0.02 * jnp.exp(0.4 * jnp.sin(2 * np.pi * x) * jnp.cos(2 * np.pi * y))
    source = 3 * jnp.cos(2 * np.pi * (x + y)) + 2 * jnp.cos(2 * np.pi * (3 * y + 2 * x))
    dt = stiffness * grid.spacing[0] ** 2 / 0.02
    u0 = units + jnp.sin(2 * np.pi * x) * jnp.cos(4 * np.pi * y)
    n_steps = 8

    def model(dtype, share=1.0):
        cast = (a.astype(dtype) for a in (kappa, source))
        return sim.AdvectionDiffusion(grid, share * next(cast), [0.1, 0.2], next(cast))

    with jax.enable_x64(dtype == "float64"):
        correction = None
        if learned:  # a diffusion: the model's tendency without advection or source
            kappa_learned = learned * kappa.astype(dtype)
            correction = sim.AdvectionDiffusion(grid, kappa_learned, [0.0, 0.0]).linear
        scheme = sim.backward_euler()
        simulator = sim.Simulator(model(dtype, 1 - learned), scheme, dt, correction)
        states, info = jax.jit(
            lambda: simulator.rollout(u0.astype(dtype), n_steps, with_info=True)
        )()
    assert states.dtype == dtype
    assert int(jnp.max(info["newton_steps"])) <= 4, info["newton_steps"]
    # The exact backward Euler steps: (I - dt A) u_{n+1} = u_n + dt s.
    exact = model(jnp.float64)
    size = grid.shape[0] * grid.shape[1]
    source_term = exact.tendency(jnp.zeros(grid.shape))
    a = jax.jacfwd(lambda u: exact.tendency(u) - source_term)(jnp.zeros(grid.shape))
    step = np.eye(size) - dt * np.asarray(a).reshape(size, size)
    u = np.asarray(u0, np.float64).ravel()
    reference = []
    for _ in range(n_steps):
        u = np.linalg.solve(step, u + dt * np.asarray(source_term).ravel())
        reference.append(u.reshape(grid.shape))
    reference = np.stack(reference)
    error = np.max(np.abs(np.asarray(states[1:], np.float64) - reference))
    assert error / np.max(np.abs(reference)) < tol


def test_eager_rollouts_compile_once():
    """`Simulator.rollout` called outside `jit` compiles its program once per
    simulator structure and shapes: a second call, or one with another diffusivity
    or time step, compiles nothing; one inside `solves_without_raising` (read when
    the stages are traced) is another program, compiled once too."""
    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    grid = sim.Grid((16, 16), (1.0, 1.0))
    kappa = 0.02 + 0.01 * smooth_state(grid)

    def simulator(scale, dt):  # a kappa field: IMEX stages by CG (lineax solves)
        model = sim.AdvectionDiffusion(grid, scale * kappa, [0.1, 0.2])
        return sim.Simulator(model, sim.IMEXRungeKutta("ars222"), dt)

    u0 = smooth_state(grid, seed=1)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        counts = []
        for scale, dt, raising in [
            (1.0, 0.02, True),
            (1.0, 0.02, True),
            (1.5, 0.03, True),
            (1.0, 0.02, False),
            (1.5, 0.02, False),
        ]:
            compiles.clear()
            with contextlib.nullcontext() if raising else sim.solves_without_raising():
                trajectory = simulator(scale, dt).rollout(u0, 3)
            assert trajectory.shape == (4, 16, 16)
            counts.append(len(compiles))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert counts[0] > 0 and counts[3] > 0, counts
    assert counts[1] == counts[2] == counts[4] == 0, counts
