"""Atomic writers: a reader never sees a half-written output file. In a multi-host
run only the first process writes (every process holds the same results)."""

import json
import os
import tempfile
from pathlib import Path

import jax
import numpy as np
import xarray as xr


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    if jax.process_index() != 0:
        return path
    tmp = temporary_path(path)
    try:
        write(tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def temporary_path(path: Path) -> str:
    """A new empty file beside `path` (same folder, hidden name) to write into
    before `publish` renames it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    return tmp


def publish(tmp: str, path: Path) -> None:
    """Rename the finished `tmp` to `path` (atomic), with the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs are shared
    os.replace(tmp, path)


def write_netcdf(dataset: xr.Dataset, path) -> Path:
    """Write `dataset` to NetCDF at `path` through a temporary file and a rename."""
    return _atomic(path, lambda tmp: dataset.to_netcdf(tmp, engine="netcdf4"))


def write_json(obj, path) -> Path:
    """Write `obj` as indented JSON at `path` atomically."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    return _atomic(path, write)


def savefig(fig, path) -> Path:
    """Save a matplotlib figure atomically (PNG)."""
    return _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def cf_coords(grid, times, time_units: str = "model time units"):
    """`(names, coords)`: the grid's CF dimension names (`("x",)` or `("y", "x")`)
    and xarray coordinates `time`, `y`, `x` with `units` and `axis`."""
    names = ("x",) if grid.ndim == 1 else ("y", "x")
    coords = {
        "time": (
            "time",
            np.asarray(times),
            {"units": time_units, "standard_name": "time", "axis": "T"},
        )
    }
    for axis, name in enumerate(names):
        coords[name] = (
            name,
            np.asarray(grid.coordinates(axis)),
            {
                "units": "model length units",
                "axis": name.upper(),
                "long_name": f"{name} coordinate",
            },
        )
    return names, coords
