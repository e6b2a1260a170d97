"""Observation archives larger than memory: many NetCDF files opened lazily as one
dataset (xarray + dask, checked file by file), read window by window on a host
thread ahead of the computation, so that memory holds a few windows at a time."""

import glob
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from simulators import Grid

from ._batch import Batch, windows_batch
from ._observations import (
    ObservationError,
    ObservationSet,
    in_time_units,
    open_observations,
    time_values,
    validate_dataset,
    window_starts,
)


def archive_files(paths) -> list[Path]:
    """The files of an archive: a list of paths, a glob pattern (`obs/*.nc`) or a
    directory (its `*.nc`), in sorted order."""
    if isinstance(paths, (str, Path)):
        text = str(paths)
        if Path(text).is_dir():
            files = sorted(Path(text).glob("*.nc"))
        elif any(c in text for c in "*?["):
            files = [Path(p) for p in sorted(glob.glob(text))]
        else:
            files = [Path(text)]
    else:
        files = [Path(p) for p in paths]
    if not files:
        raise ObservationError(f"no observation files match {paths}")
    return files


def _signature(ds: xr.Dataset) -> dict:
    """What the files of one archive must share: the variables and their dims, the
    grid (sizes and coordinates), and the values of everything without a time
    axis (e.g. a scalar `obs_error_std`, a true parameter field)."""
    spatial = ds["obs"].dims[1:]
    return {
        "variables": {name: ds[name].dims for name in sorted(map(str, ds.data_vars))},
        "grid": {d: np.asarray(ds[d].values) for d in spatial},
        "constants": {
            name: np.asarray(ds[name].values)
            for name in sorted(map(str, ds.data_vars))
            if "time" not in ds[name].dims
        },
    }


def _disagreement(a: dict, b: dict) -> str | None:
    """How signature `b` differs from `a`, or `None`."""
    if a["variables"] != b["variables"]:
        return f"variables {b['variables']} differ from {a['variables']}"
    for d, coords in a["grid"].items():
        other = b["grid"][d]
        if coords.shape != other.shape:
            return f"grid size along '{d}' {other.size} differs from {coords.size}"
        if not np.allclose(coords, other, rtol=1e-6, atol=1e-9):
            return f"grid coordinate '{d}' differs"
    for name, value in a["constants"].items():
        other = b["constants"][name]
        if value.shape != other.shape or not np.array_equal(
            value, other, equal_nan=True
        ):
            return f"'{name}' (no time axis) differs"
    return None


def open_archive(
    paths, *, grid: Grid | None = None, chunk_times: int = 16
) -> xr.Dataset:
    """Open an archive of observation files as one lazy dataset along `time`.

    Each file is validated as `open_observations` does, then checked against the
    first: the same variables with the same dims, the same grid, the same values of
    every variable without a time axis, and times that continue the previous
    file's. Nothing else is read: the data are dask arrays of `chunk_times` times
    per chunk, read when a window asks for them.

    **Arguments:**

    - `paths`: files, a glob pattern or a directory (see `archive_files`).
    - `grid`: when given, every file's grid must match it.
    - `chunk_times`: observation times per dask chunk (a window's length is a good
      choice).

    **Raises:** `ObservationError` naming the first file that disagrees and how.
    """
    files = archive_files(paths)
    first = previous_end = units = None
    counts, all_times = [], []
    for path in files:
        with open_observations(path, grid=grid) as ds:
            if units is None:
                units = ds["time"].attrs.get("units", "")
                calendar = ds["time"].attrs.get("calendar")
            try:  # counted in the first file's time units
                ds = in_time_units(ds, units, calendar)
            except ObservationError as e:
                message = f"{path}: {e} (the archive's first file's)"
                raise ObservationError(message) from e
            signature = _signature(ds)
            times = ds["time"].values
            if first is None:
                first = (path, signature)
            else:
                why = _disagreement(first[1], signature)
                if why is not None:
                    raise ObservationError(
                        f"{path}: does not match the archive's first file "
                        f"{first[0].name}: {why}"
                    )
                if not times[0] > previous_end:
                    raise ObservationError(
                        f"{path}: its times do not continue the previous file's "
                        f"(starts at {times[0]}, previous ends at {previous_end})"
                    )
            previous_end = times[-1]
            counts.append(times.size)
            all_times.append(np.asarray(times, np.float64))
    combined = xr.open_mfdataset(
        [str(p) for p in files],
        engine="netcdf4",
        combine="nested",
        concat_dim="time",
        data_vars="minimal",
        coords="minimal",
        compat="override",
        chunks={"time": int(chunk_times)},
        parallel=False,
        decode_times=False,
    )
    time_attrs = {**combined["time"].attrs, "units": units}
    combined = combined.assign_coords(
        time=("time", np.concatenate(all_times), time_attrs)
    )
    validate_dataset(combined, grid=grid, name=f"archive of {len(files)} files")
    # For `WindowStream`: a window is read from its file(s) directly, since computing
    # a slice of the combined dask array costs time in proportion to the archive
    # (dask orders the whole graph), not to the window.
    combined.encoding["archive_files"] = [str(p) for p in files]
    combined.encoding["archive_counts"] = counts
    return combined


class _ArchiveFiles:
    """The files of an archive, opened lazily without dask: a time slice is read
    from the one or two files that hold it."""

    def __init__(self, files: list[str], counts: list[int], units: str, calendar):
        self.datasets = [
            in_time_units(
                xr.open_dataset(f, engine="netcdf4", decode_times=False),
                units,
                calendar,
            )
            for f in files
        ]
        self.offsets = np.concatenate([[0], np.cumsum(counts)])

    def slice(self, start: int, stop: int) -> xr.Dataset:
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        k = first
        while k < len(self.datasets) and self.offsets[k] < stop:
            lo = max(start, self.offsets[k]) - self.offsets[k]
            hi = min(stop, self.offsets[k + 1]) - self.offsets[k]
            pieces.append(self.datasets[k].isel(time=slice(int(lo), int(hi))).load())
            k += 1
        if len(pieces) == 1:
            return pieces[0]
        return xr.concat(
            pieces, "time", data_vars="minimal", coords="minimal", compat="override"
        )


_END = object()


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(items: Iterable, size: int = 2) -> Iterator:
    """Yield `items`, produced up to `size` ahead on a host thread (e.g. windows read
    from disk while the device computes). An error in the producer is raised here;
    closing the iterator stops the producer. `size=0`: no thread."""
    if size <= 0:
        yield from items
        return
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer
            put(_Raised(e))

    thread = threading.Thread(target=produce, daemon=True, name="assim-prefetch")
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class WindowStream:
    """The windows of a (lazily opened) observation dataset, read from disk on
    demand: iterate over them in order, or draw batches of them, with host-side
    prefetch. Memory holds the windows in flight, not the archive.

    **Arguments:**

    - `ds`: from `open_archive` or `open_observations`.
    - `length`: observation times per window.
    - `stride`: times between window starts (default `length`).
    - `windows`: which windows (indices into all of them; default all), e.g. the
      training split.
    - `prefetch`: windows (or batches) read ahead on a host thread.
    - `dtype`: floating dtype of the arrays (default: JAX's default float).
    - `grid_shape`: the state's shape, for the backgrounds of `batches` (default:
      the observations' spatial shape).
    """

    def __init__(
        self,
        ds: xr.Dataset,
        length: int,
        *,
        stride: int | None = None,
        windows: Sequence[int] | None = None,
        prefetch: int = 2,
        dtype=None,
        grid_shape: tuple[int, ...] | None = None,
    ):
        self.ds = ds
        self.length = int(length)
        starts = window_starts(ds, self.length, stride)
        if windows is not None:
            bad = [k for k in windows if not 0 <= k < len(starts)]
            if bad:
                raise ObservationError(
                    f"window indices {bad[:3]} out of range (0..{len(starts) - 1})"
                )
            starts = [starts[k] for k in windows]
        if not starts:
            raise ObservationError("the stream has no window")
        self.starts = starts
        self.prefetch = int(prefetch)
        self.dtype = jnp.zeros(()).dtype if dtype is None else dtype
        self.grid_shape = tuple(grid_shape or ds["obs"].shape[1:])
        self.files = None
        if "archive_files" in ds.encoding:  # from open_archive
            self.files = _ArchiveFiles(
                ds.encoding["archive_files"],
                ds.encoding["archive_counts"],
                ds["time"].attrs.get("units", ""),
                ds["time"].attrs.get("calendar"),
            )
        self.origin = time_values(ds)[0]

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def size(self) -> int:
        return len(self)

    def __getitem__(self, k: int) -> ObservationSet:
        """Window `k`, read from disk now."""
        start = self.starts[k]
        name = f"window at time index {start}"
        if self.files is None:
            window = self.ds.isel(time=slice(start, start + self.length))
        else:
            window = self.files.slice(start, start + self.length)
        obs = ObservationSet.from_dataset(window, name=name, origin=self.origin)
        return jax.tree.map(self._cast, obs)

    def _cast(self, a):
        return a.astype(self.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    def __iter__(self) -> Iterator[ObservationSet]:
        """The windows in order, read `prefetch` ahead."""
        return prefetch((self[k] for k in range(len(self))), self.prefetch)

    def batch(self, indices: Sequence[int]) -> Batch:
        """The windows `indices` stacked, each with the constant background at its
        mean observed value (no truth; as `windows_batch`)."""
        return windows_batch([self[int(k)] for k in indices], self.grid_shape)

    def batches(self, index_lists: Iterable[Sequence[int]]) -> Iterator[Batch]:
        """`batch(indices)` for each entry of `index_lists`, read `prefetch` ahead."""
        return prefetch((self.batch(ix) for ix in index_lists), self.prefetch)


def split_windows(ds, length: int, dtype):
    """The file's windows grouped by its `split` variable (0 train, 1 validation,
    2 test; without one: the first 80% train, the next 10% validation)."""
    stream = WindowStream(ds, length, prefetch=0, dtype=dtype)
    groups = {0: [], 1: [], 2: []}
    for label, k in zip(window_labels(ds, length), range(len(stream)), strict=True):
        groups[label].append(stream[k])
    return groups


def window_labels(ds, length: int) -> np.ndarray:
    """Each window's split (0 train, 1 validation, 2 test) from the file's `split`
    variable (read alone); without one: the first 80% train, the next 10%
    validation."""
    n = ds.sizes["time"] // length
    if "split" in ds.variables:
        split = np.asarray(ds["split"].values)
        if split.shape != (ds.sizes["time"],) or not np.issubdtype(
            split.dtype, np.number
        ):
            raise ValueError(
                f"'split' must be numeric with dims (time,), got dtype {split.dtype} "
                f"and shape {split.shape}"
            )
        unknown = sorted(set(np.unique(split).tolist()) - {0, 1, 2})
        if unknown:
            raise ValueError(
                f"'split' must be 0 (train), 1 (validation) or 2 (test), got {unknown}"
            )
        per_window = split[: n * length].reshape(n, length)
        varies = np.flatnonzero((per_window != per_window[:, :1]).any(axis=1))
        if varies.size:
            raise ValueError(
                f"'split' varies inside {varies.size} windows of {length} times "
                f"(first: window {varies[0]}, time index {varies[0] * length}): it "
                "labels whole windows (set network.window_length to the file's)"
            )
        return per_window[:, 0].astype(int)
    k = np.arange(n)
    return np.where(k < 0.8 * n, 0, np.where(k < 0.9 * n, 1, 2))


def stream_windows(ds, length: int, max_windows, dtype, grid):
    """`(training WindowStream, validation Batch or None)` of a dataset's splits
    (`window_labels`): the training windows stay on disk and are read batch by
    batch; the validation windows are loaded."""
    labels = window_labels(ds, length)
    if max_windows:
        labels = labels[: int(max_windows)]
    train_idx = np.flatnonzero(labels == 0)
    if not train_idx.size:
        raise ValueError("the observation file has no training window")
    data = WindowStream(
        ds, length, windows=train_idx.tolist(), dtype=dtype, grid_shape=grid.shape
    )
    val_idx = np.flatnonzero(labels == 1).tolist()
    validation = None
    if val_idx:
        val = WindowStream(
            ds, length, windows=val_idx, dtype=dtype, grid_shape=grid.shape
        )
        validation = val.batch(range(len(val)))
    return data, validation
