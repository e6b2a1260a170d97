"""Twin experiments: a hidden truth with model error, sparse noisy sensors, splits."""

import dataclasses

import equinox as eqx
import numpy as np
import xarray as xr

from simulators import Grid, Simulator

from ._covariance import DiffusionCovariance
from ._io import cf_coords


def random_field(grid: Grid, rng: np.random.Generator, length_scale: float):
    """A smooth Gaussian random field with unit mean variance: white noise coloured
    by the diffusion-operator square root `(I - l^2 Laplacian)^{-1}` (Matérn-like)."""
    import jax.numpy as jnp

    cov = DiffusionCovariance(grid, 1.0, length_scale)
    return np.asarray(cov.sqrt(jnp.asarray(rng.normal(size=grid.shape))))


class MissingTerm(eqx.Module):
    """A term of the true dynamics that the assimilating model lacks (the model error
    to learn), added to the truth's tendency inside its implicit step.

    - `"decay"`: `-rate u`; `"cubic"`: `-rate u^3`; `"none"`: nothing.
    """

    kind: str = eqx.field(static=True)
    rate: float

    def __check_init__(self):
        if self.kind not in ("none", "decay", "cubic"):
            raise ValueError(
                f"missing term must be 'none', 'decay' or 'cubic', got {self.kind!r}"
            )

    def __call__(self, u):
        return -self.rate * (u if self.kind == "decay" else u**3)

    def describe(self) -> str:
        what = {"none": "none", "decay": "-rate*u", "cubic": "-rate*u**3"}[self.kind]
        return f"{what} (rate {self.rate:g})" if self.kind != "none" else "none"


def sensor_mask(
    grid: Grid,
    n_times: int,
    rng: np.random.Generator,
    *,
    pattern: str = "stations",
    density: float = 0.05,
    dropout: float = 0.0,
    track_angle: float = 30.0,
    track_speed: float = 0.13,
) -> np.ndarray:
    """Where sensors report, `(n_times, *grid.shape)`.

    - `"stations"`: a fixed random set of grid points, a fraction `density` of them.
    - `"tracks"`: satellite-like swaths: at each time a straight band (at
      `track_angle` degrees to the x axis in 2D) covering a fraction `density` of the
      domain, shifted by `track_speed` domain lengths per observation time.
    - `dropout`: each reporting sensor independently misses each time with this
      probability (time-varying gaps).
    """
    if not 0 < density <= 1:
        raise ValueError(f"sensor density must be in (0, 1], got {density}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    shape = (n_times, *grid.shape)
    if pattern == "stations":
        n_points = int(np.prod(grid.shape))
        count = max(1, round(density * n_points))
        flat = np.zeros(n_points, bool)
        flat[rng.choice(n_points, size=count, replace=False)] = True
        mask = np.broadcast_to(flat.reshape(grid.shape), shape).copy()
    elif pattern == "tracks":
        mesh = [np.asarray(m) for m in grid.mesh()]
        if grid.ndim == 1:
            s = mesh[0] / grid.length[0]
        else:
            a = np.deg2rad(track_angle)
            s = (
                np.cos(a) * mesh[1] / grid.length[1]
                + np.sin(a) * mesh[0] / grid.length[0]
            )
        offset = rng.uniform()
        mask = np.stack(
            [((s - offset - t * track_speed) % 1.0) < density for t in range(n_times)]
        )
    else:
        raise ValueError(
            f"sensor pattern must be 'stations' or 'tracks', got {pattern!r}"
        )
    if dropout:
        mask &= rng.random(shape) >= dropout
    return mask


@dataclasses.dataclass
class Twin:
    """A generated twin experiment (before writing)."""

    truth: np.ndarray  # (time, *grid) at observation times
    obs: np.ndarray  # NaN where no sensor
    split: np.ndarray  # (time,) 0 train, 1 validation, 2 test


def run_twin(
    truth_simulator: Simulator,
    initial_state,
    *,
    n_times: int,
    observation_interval: int,
    spinup_steps: int,
    noise_std: float,
    window_length: int,
    splits: tuple[float, float, float],
    rng: np.random.Generator,
    sensors: dict,
) -> Twin:
    """Run the truth, observe it, split its windows.

    The truth is spun up for `spinup_steps`, then sampled every `observation_interval`
    steps `n_times` times; sensors (see `sensor_mask`) see it with Gaussian noise of
    std `noise_std`. Windows of `window_length` times are assigned to train /
    validation / test in time order (contiguous blocks, so that no validation window
    sits between training windows), in the proportions `splits`.
    """
    import jax.numpy as jnp

    if noise_std <= 0:
        raise ValueError(f"noise_std must be positive, got {noise_std}")
    if n_times % window_length:
        raise ValueError(
            f"n_times ({n_times}) must be a multiple of window_length ({window_length})"
        )
    if len(splits) != 3 or min(splits) < 0 or not np.isclose(sum(splits), 1.0):
        raise ValueError(
            f"splits must be three non-negative fractions summing to 1, "
            f"got {list(splits)}"
        )
    n_steps = spinup_steps + (n_times - 1) * observation_interval
    # Checked here, on the host: a raising check inside the program is a host
    # callback, which keeps it out of JAX's persistent compilation cache.
    unchecked = dataclasses.replace(truth_simulator, check_finite=False)
    rollout = eqx.filter_jit(lambda s, u: s.rollout(u, n_steps))
    trajectory = np.asarray(rollout(unchecked, jnp.asarray(initial_state)))
    if not np.all(np.isfinite(trajectory)):
        raise ValueError(
            "the truth run became non-finite: the model blew up from its initial "
            "state, or the time step is too long for the scheme"
        )
    truth = trajectory[spinup_steps::observation_interval]
    mask = sensor_mask(truth_simulator.model.grid, n_times, rng, **sensors)
    noisy = truth + noise_std * rng.normal(size=truth.shape)
    obs = np.where(mask, noisy, np.nan)
    n_windows = n_times // window_length
    bounds = np.round(np.cumsum(splits)[:2] * n_windows).astype(int)
    window_split = np.searchsorted(bounds, np.arange(n_windows), side="right")
    return Twin(truth, obs, np.repeat(window_split, window_length).astype(np.int8))


def twin_dataset(
    twin: Twin,
    grid: Grid,
    *,
    dt: float,
    observation_interval: int,
    noise_std: float,
    attrs: dict,
    extra: dict | None = None,
    time_units: str = "model time units",
) -> xr.Dataset:
    """The observation file (DESIGN.md contract, CF-1.8) of a twin experiment.
    `time_units`: e.g. `hours since 2000-01-01` (the model's time unit is then
    the hour: times are written as the model's).

    `extra`: `{name: (dims, values, attrs)}` for evaluation-only variables (the hidden
    true parameters), written next to `truth`.
    """
    n = twin.truth.shape[0]
    names, coords = cf_coords(
        grid, np.arange(n) * dt * observation_interval, time_units
    )
    dims = ("time", *names)
    data = {
        "obs": (
            dims,
            twin.obs.astype(np.float64),
            {
                "long_name": "observed state",
                "units": "1",
                "ancillary_variables": "obs_error_std",
            },
        ),
        "obs_error_std": (
            (),
            np.float64(noise_std),
            {
                "long_name": "observation error standard deviation",
                "standard_name": "state standard_error",
                "units": "1",
            },
        ),
        "truth": (
            dims,
            twin.truth.astype(np.float64),
            {"long_name": "true state (evaluation only)", "units": "1"},
        ),
        "split": (
            "time",
            twin.split,
            {
                "long_name": "window split",
                "flag_values": np.array([0, 1, 2], np.int8),
                "flag_meanings": "train validation test",
            },
        ),
    }
    data.update(extra or {})
    ds = xr.Dataset(data, coords=coords, attrs={"Conventions": "CF-1.8", **attrs})
    ds["obs"].encoding["_FillValue"] = np.nan
    return ds
