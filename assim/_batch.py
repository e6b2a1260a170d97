"""Batches of windows: stacked observation windows with their backgrounds, the unit
that training, validation and the batched map over windows work on."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._observations import ObservationSet


class Batch(eqx.Module):
    """A batch of windows: observations stacked along a leading axis (every leaf of
    the `ObservationSet`) and one background per window; `analysis`, if set, holds
    the refined 4D-Var analyses the cost loss is evaluated at (`train` sets it from
    its warm-started store)."""

    obs: ObservationSet
    background: Float[Array, "batch ..."]
    analysis: Float[Array, "batch ..."] | None = None

    @classmethod
    def stack(cls, windows: list[ObservationSet], backgrounds) -> "Batch":
        obs = jax.tree.map(lambda *leaves: jnp.stack(leaves), *windows)
        return cls(obs, jnp.stack(list(backgrounds)))

    @property
    def size(self) -> int:
        return self.background.shape[0]

    def observed_std(self) -> float:
        """The spread of the observed values (no truth): the networks' input scale."""
        values = np.asarray(self.obs.values)[np.asarray(self.obs.mask)]
        return float(values.std()) or 1.0


def windows_batch(windows, shape, backgrounds=None) -> Batch:
    """Stack `ObservationSet` windows into a `Batch`; backgrounds (grid `shape`)
    default to the constant field at each window's mean observed value (no truth
    used)."""
    windows = list(windows)
    if not windows:
        raise ValueError("no windows to stack")
    if backgrounds is None:
        backgrounds = [obs_mean_background(o, shape) for o in windows]
    return Batch.stack(windows, backgrounds)


def obs_mean_background(obs, shape):
    """The constant field at the window's mean observed value."""
    values, mask = np.asarray(obs.values), np.asarray(obs.mask)
    level = values[mask].mean() if mask.any() else 0.0
    return jnp.full(tuple(shape), level, obs.values.dtype)
