"""Observation operators `H`: model states at observation times -> observed values."""

import abc
import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from simulators import Grid


def grid_points(grid: Grid) -> Array:
    """The grid's point coordinates, `(points, ndim)` in C order."""
    return jnp.stack([m.reshape(-1) for m in grid.mesh()], axis=-1)


class AbstractObservationOperator(eqx.Module):
    """`H`, applied to the model states at the observation times of a window.

    Linear operators (all shipped ones) are differentiated and transposed by JAX; the
    cost functions never form a matrix.
    """

    @abc.abstractmethod
    def __call__(self, states: Float[Array, "time ..."]) -> Float[Array, "time ..."]:
        """`(time, *grid)` states -> `(time, *obs_shape)` predicted observations."""

    def locations(self, grid: Grid, n_times: int) -> Float[Array, "time obs ndim"]:
        """The coordinates of the observations (in the grid's length units and axis
        order), one row per flattened observation of each of the `n_times` times:
        what localisation (`assim.LETKF`) measures distances from."""
        raise NotImplementedError(
            f"{type(self).__name__} does not say where its observations are, so "
            "they cannot be localised (LETKF): implement locations(grid, n_times)"
        )


class GridSelection(AbstractObservationOperator):
    """Sensors on grid points: `H` is the identity on the grid and the window's
    `mask` selects the points that reported (observations have the grid's shape)."""

    def __call__(self, states):
        return states

    def locations(self, grid, n_times):
        points = grid_points(grid)
        return jnp.broadcast_to(points, (n_times, *points.shape))


class LinearInterpolation(AbstractObservationOperator):
    """Sensors at arbitrary positions: (bi)linear interpolation of the grid state.

    Periodic grids wrap around; on Dirichlet grids the state is zero on the boundary,
    which the interpolation uses between the outermost points and the walls. Indices
    and weights are computed once, so `H` is a gather and `H^T` a scatter-add.

    **Arguments:**

    - `grid`: the state's grid.
    - `positions`: sensor coordinates in the grid's length units, in the grid's axis
      order (`(x,)` or `(y, x)`), shape `(sensors, ndim)` for fixed sensors or
      `(time, sensors, ndim)` for sensors that move (one row per observation time).

    **Raises:** `ValueError` for positions outside the domain or of the wrong shape.
    """

    grid: Grid
    indices: Int[Array, "... sensors corners"]
    weights: Float[Array, "... sensors corners"]
    positions: Float[Array, "... sensors ndim"]

    def __init__(self, grid: Grid, positions):
        positions = np.asarray(positions, dtype=np.float64)
        if positions.ndim not in (2, 3) or positions.shape[-1] != grid.ndim:
            raise ValueError(
                f"sensor positions must have shape (sensors, {grid.ndim}) or "
                f"(time, sensors, {grid.ndim}), got {positions.shape}"
            )
        if not np.all(np.isfinite(positions)):
            raise ValueError("sensor positions have non-finite values")
        length = np.asarray(grid.length)
        outside = (positions < 0) | (positions > length)
        if np.any(outside):
            bad = positions[np.any(outside, axis=-1)][0]
            raise ValueError(
                f"sensor position {tuple(bad)} lies outside the domain "
                f"[0, {tuple(grid.length)}]"
            )
        per_axis = []  # (lower index, upper index, upper weight) per axis
        for axis in range(grid.ndim):
            n, dx = grid.shape[axis], grid.spacing[axis]
            p = positions[..., axis]
            if grid.boundary == "periodic":
                s = p / dx
                lo = np.floor(s)
                w = s - lo
                lo = lo.astype(np.int64) % n
                hi = (lo + 1) % n
            else:  # points at (i + 1) dx; zero at index -1 and n (the walls)
                s = p / dx - 1
                lo = np.clip(np.floor(s), -1, n - 1)
                w = s - lo
                lo = lo.astype(np.int64)
                hi = lo + 1
            per_axis.append((lo, hi, w))
        indices, weights = [], []
        for corner in itertools.product((0, 1), repeat=grid.ndim):
            weight = np.ones(positions.shape[:-1])
            index = np.zeros(positions.shape[:-1], dtype=np.int64)
            valid = np.ones(positions.shape[:-1], dtype=bool)
            for axis, upper in enumerate(corner):
                lo, hi, w = per_axis[axis]
                i = hi if upper else lo
                weight = weight * (w if upper else 1 - w)
                valid &= (i >= 0) & (i < grid.shape[axis])
                index = index * grid.shape[axis] + np.clip(i, 0, grid.shape[axis] - 1)
            indices.append(index)
            weights.append(np.where(valid, weight, 0.0))  # walls hold zero
        self.grid = grid
        self.indices = jnp.asarray(np.stack(indices, axis=-1))
        self.weights = jnp.asarray(np.stack(weights, axis=-1))
        self.positions = jnp.asarray(positions)

    def locations(self, grid, n_times):
        if self.positions.ndim == 2:  # fixed sensors
            return jnp.broadcast_to(self.positions, (n_times, *self.positions.shape))
        return self.positions

    @property
    def n_sensors(self) -> int:
        return self.indices.shape[-2]

    def _one(self, state, indices, weights):
        flat = state.reshape(-1)
        return jnp.sum(flat[indices] * weights.astype(flat.dtype), axis=-1)

    def __call__(self, states):
        if states.shape[1:] != self.grid.shape:
            raise ValueError(
                f"states of shape {states.shape[1:]} do not match the grid "
                f"{self.grid.shape}"
            )
        if self.indices.ndim == 2:  # fixed sensors
            return jax.vmap(lambda s: self._one(s, self.indices, self.weights))(states)
        if self.indices.shape[0] != states.shape[0]:
            raise ValueError(
                f"sensor positions are given for {self.indices.shape[0]} times, the "
                f"window has {states.shape[0]}"
            )
        return jax.vmap(self._one)(states, self.indices, self.weights)
