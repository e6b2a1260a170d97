"""Convergence orders in time and space against analytic solutions."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TIGHT, observed_orders

import simulators as sim

# (scheme, expected order, slack): the slack is the per-scheme tolerance on the
# observed order, as jax-cfd and dinosaur carry; ARS(4,4,3) shows mild order
# reduction on this stiff-ish problem at the coarsest step.
SCHEMES = [
    ("backward-euler", sim.backward_euler(TIGHT), 1, 0.1),
    ("crank-nicolson", sim.crank_nicolson(TIGHT), 2, 0.1),
    ("implicit-midpoint", sim.ImplicitMidpoint(TIGHT), 2, 0.1),
    ("imex-euler", sim.IMEXRungeKutta("euler"), 1, 0.15),
    ("imex-ars222", sim.IMEXRungeKutta("ars222"), 2, 0.15),
    ("imex-ars443", sim.IMEXRungeKutta("ars443"), 3, 0.25),
    ("rk4", sim.RK4(), 4, 0.2),
]


def _advection_diffusion_mode(n=32, kappa=0.05, velocity=1.0, k=1):
    """Semi-discrete exact solution of periodic advection-diffusion for one mode.

    For the centred / three-point discretisation, `exp(i k x)` is an eigenvector with
    eigenvalue `-kappa (4/dx^2) sin^2(k dx/2) - i v sin(k dx)/dx`, so
    `u(x, t) = Re(exp(i k x + lambda t))` solves the ODE system exactly and the error
    of a scheme is its time error alone.
    """
    grid = sim.Grid((n,), (2 * np.pi,))
    model = sim.AdvectionDiffusion(grid, kappa, [velocity])
    dx = grid.spacing[0]
    lam = (
        -kappa * 4 / dx**2 * np.sin(k * dx / 2) ** 2
        - 1j * velocity * np.sin(k * dx) / dx
    )
    x = np.asarray(grid.coordinates(0))

    def exact(t):
        return jnp.asarray(np.real(np.exp(1j * k * x + lam * t)))

    return model, exact


@pytest.mark.parametrize(
    "name,scheme,order,slack", SCHEMES, ids=[s[0] for s in SCHEMES]
)
def test_time_order(name, scheme, order, slack):
    model, exact = _advection_diffusion_mode()
    final_time = 1.0
    steps = [8, 16, 32] if order < 4 else [4, 8, 16]
    step = eqx.filter_jit(lambda s, u: s.step(u))
    errors = []
    for n in steps:
        simulator = sim.Simulator(model, scheme, final_time / n)
        u = exact(0.0)
        for _ in range(n):
            u = step(simulator, u)
        errors.append(float(jnp.max(jnp.abs(u - exact(final_time)))))
    rates = observed_orders([1 / n for n in steps], errors)
    assert np.all(np.abs(rates - order) < slack), (errors, rates)


def _space_errors(make, sizes):
    errors = []
    for n in sizes:
        simulator, u0, exact, n_steps = make(n)
        final = jax.jit(lambda s, u, k=n_steps: s.rollout(u, k)[-1])(simulator, u0)
        errors.append(float(jnp.max(jnp.abs(final - exact))))
    return np.array(errors)


def _diffusion_eigenmode_2d(n):
    """u = sin(pi x) sin(2 pi y) exp(-5 pi^2 kappa t) on the unit square, u = 0 on the
    boundary: second order in space for the five-point Laplacian."""
    kappa, final_time, dt = 0.1, 0.1, 0.005
    grid = sim.Grid((n, n), (1.0, 1.0), "dirichlet")
    y, x = grid.mesh()
    mode = jnp.sin(np.pi * x) * jnp.sin(2 * np.pi * y)
    model = sim.AdvectionDiffusion(grid, kappa, [0.0, 0.0])
    simulator = sim.Simulator(model, sim.IMEXRungeKutta("ars443"), dt)
    decay = np.exp(-5 * np.pi**2 * kappa * final_time)
    return simulator, mode, mode * decay, round(final_time / dt)


def _advected_gaussian(n):
    """A Gaussian advected and spread in a periodic domain (sum over images)."""
    kappa, velocity, final_time, dt, length = 0.01, 1.0, 0.5, 0.0025, 2.0
    grid = sim.Grid((n,), (length,))
    model = sim.AdvectionDiffusion(grid, kappa, [velocity])
    x = np.asarray(grid.coordinates(0))

    def gaussian(t):
        var = 0.1**2 + 2 * kappa * t
        centre = 0.5 + velocity * t
        images = [
            np.exp(-((x - centre - m * length) ** 2) / (2 * var))
            for m in (-2, -1, 0, 1, 2)
        ]
        return jnp.asarray(np.sqrt(0.1**2 / var) * sum(images))

    simulator = sim.Simulator(model, sim.IMEXRungeKutta("ars443"), dt)
    return simulator, gaussian(0.0), gaussian(final_time), round(final_time / dt)


def _burgers_cole_hopf(n):
    """1D viscous Burgers through the Cole-Hopf transform u = -2 nu phi_x / phi with
    phi = a + b exp(-nu k^2 t) cos(k x) solving the heat equation."""
    nu, final_time, dt, a, b = 0.1, 0.5, 0.0025, 2.0, 1.0
    grid = sim.Grid((n,), (2 * np.pi,))
    x = np.asarray(grid.coordinates(0))

    def exact(t):
        e = b * np.exp(-nu * t)
        return jnp.asarray(2 * nu * e * np.sin(x) / (a + e * np.cos(x)))

    simulator = sim.Simulator(sim.Burgers(grid, nu), sim.crank_nicolson(TIGHT), dt)
    return simulator, exact(0.0), exact(final_time), round(final_time / dt)


@pytest.mark.parametrize(
    "make", [_diffusion_eigenmode_2d, _advected_gaussian, _burgers_cole_hopf]
)
def test_space_order(make):
    sizes = {
        _diffusion_eigenmode_2d: [7, 15, 31],
        _advected_gaussian: [32, 64, 128],  # the Gaussian needs ~3 points per width
        _burgers_cole_hopf: [16, 32, 64],
    }[make]
    errors = _space_errors(make, sizes)
    grids = [1 / (n + (make is _diffusion_eigenmode_2d)) for n in sizes]
    rates = observed_orders(grids, errors)
    # Second-order finite differences; the time error is negligible at these dt.
    assert np.all(np.abs(rates - 2) < 0.25), (errors, rates)
