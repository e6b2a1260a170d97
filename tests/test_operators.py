"""Observation operators: exactness on linear fields, adjoints, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import simulators as sim
from assim import GridSelection, LinearInterpolation


@pytest.mark.parametrize("boundary", ["periodic", "dirichlet"])
def test_interpolation_is_exact_for_bilinear_fields(boundary):
    grid = sim.Grid((7, 9), (1.0, 2.0), boundary)
    y, x = (np.asarray(m) for m in grid.mesh())
    rng = np.random.default_rng(0)
    if boundary == "periodic":
        # Away from the wrap-around cell, where a linear field is not periodic.
        positions = rng.uniform([0, 0], [6 / 7, 2 * 8 / 9], size=(25, 2))
        field = 1.0 + 2.0 * y - 0.5 * x + 3.0 * x * y
        expected = 1 + 2 * positions[:, 0] - 0.5 * positions[:, 1]
        expected = expected + 3 * positions[:, 0] * positions[:, 1]
    else:
        # A smooth field vanishing on the walls: checked against the interpolation
        # error bound below (the walls are used as zero-valued points).
        positions = rng.uniform([0, 0], [1.0, 2.0], size=(25, 2))
        field = (y * (1 - y)) * (x * (2 - x))
        expected = None
    op = LinearInterpolation(grid, positions)
    out = np.asarray(op(jnp.asarray(field)[None]))[0]
    if expected is not None:
        np.testing.assert_allclose(out, expected, rtol=1e-12)
    # Positions on grid points return the grid values exactly.
    on_grid = np.stack([y.ravel(), x.ravel()], axis=-1)
    exact = LinearInterpolation(grid, on_grid)(jnp.asarray(field)[None])[0]
    np.testing.assert_allclose(exact, field.ravel(), atol=1e-13)
    # Interpolation of a smooth field: second-order error, bounded by the curvature.
    if boundary == "dirichlet":
        truth = (
            positions[:, 0]
            * (1 - positions[:, 0])
            * positions[:, 1]
            * (2 - positions[:, 1])
        )
        dx = max(grid.spacing)
        assert np.max(np.abs(out - truth)) < dx**2


def test_interpolation_wraps_and_walls():
    grid = sim.Grid((4,), (1.0,))  # periodic: points 0, .25, .5, .75
    op = LinearInterpolation(grid, [[0.875], [1.0]])
    u = jnp.asarray([[0.0, 1.0, 2.0, 4.0]])
    np.testing.assert_allclose(op(u)[0], [2.0, 0.0])  # halfway 4 -> 0; L == 0
    grid = sim.Grid((3,), (1.0,), "dirichlet")  # points .25, .5, .75, walls 0 and 1
    op = LinearInterpolation(grid, [[0.125], [0.0], [0.875]])
    np.testing.assert_allclose(op(jnp.asarray([[2.0, 3.0, 4.0]]))[0], [1.0, 0.0, 2.0])


def test_interpolation_adjoint_dot_product(getkey):
    grid = sim.Grid((6, 8), (1.0, 1.0), "dirichlet")
    positions = jax.random.uniform(getkey(), (3, 5, 2))  # moving sensors
    op = LinearInterpolation(grid, positions)
    x = jax.random.normal(getkey(), (3, 6, 8))
    y = jax.random.normal(getkey(), (3, 5))
    hx, vjp = jax.vjp(op, x)
    (hty,) = vjp(y)
    assert abs(float(jnp.vdot(hx, y) - jnp.vdot(x, hty))) < 1e-12


def test_operator_bad_input():
    grid = sim.Grid((6,), (1.0,))
    with pytest.raises(ValueError, match="outside the domain"):
        LinearInterpolation(grid, [[1.5]])
    with pytest.raises(ValueError, match="shape"):
        LinearInterpolation(grid, [[0.1, 0.2]])
    with pytest.raises(ValueError, match="non-finite"):
        LinearInterpolation(grid, [[np.nan]])
    moving = LinearInterpolation(grid, np.full((2, 3, 1), 0.5))
    with pytest.raises(ValueError, match="2 times"):
        moving(jnp.zeros((3, 6)))
    assert GridSelection()(jnp.ones((2, 6))).shape == (2, 6)
