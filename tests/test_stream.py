"""Archives of many observation files, opened lazily and streamed window by window:
the same windows and the same training as in memory, files that disagree refused
by name, and the prefetching thread bounded, ordered and stoppable."""

import threading
import time

import equinox as eqx
import numpy as np
import pytest
import xarray as xr
from helpers import l96_twin_windows, plain_result, tiny_l96_net, tree_allclose

from assim import (
    ObservationError,
    TrainSettings,
    WindowStream,
    bundled_dataset,
    iter_windows,
    open_archive,
    open_observations,
    train,
    windows_batch,
)
from assim._stream import prefetch

T, INTERVAL = 3, 5


def _split_bundled(tmp_path, n_files=4):
    """The bundled file cut along time into `n_files` files (one window each)."""
    ds = xr.open_dataset(bundled_dataset()).load()
    per = ds.sizes["time"] // n_files
    paths = []
    for k in range(n_files):
        path = tmp_path / f"part{k:02d}.nc"
        ds.isel(time=slice(k * per, (k + 1) * per)).to_netcdf(path)
        paths.append(path)
    return ds, paths


def test_archive_streams_the_same_windows_as_one_file(tmp_path):
    ds, _ = _split_bundled(tmp_path)
    archive = open_archive(tmp_path, chunk_times=10)  # a directory of *.nc
    assert archive["obs"].chunks is not None  # dask: nothing read yet
    assert archive.sizes == ds.sizes
    length = int(ds.attrs["window_length"])
    stream = WindowStream(archive, length, prefetch=2)
    whole = list(iter_windows(open_observations(bundled_dataset()), length))
    assert len(stream) == len(whole) == 4
    for streamed, read in zip(stream, whole, strict=True):
        assert tree_allclose(streamed, read, rtol=0, atol=0)
    # Windows that straddle two files (files of 10 times, windows of 4).
    short = list(iter_windows(open_observations(bundled_dataset()), 4))
    for streamed, read in zip(WindowStream(archive, 4), short, strict=True):
        assert tree_allclose(streamed, read, rtol=0, atol=0)
    part = WindowStream(archive, length, windows=[3, 1])
    assert tree_allclose(part[0], whole[3], rtol=0, atol=0)
    assert tree_allclose(part.batch([1, 0]).obs.values[0], whole[1].values)
    with pytest.raises(ObservationError, match="out of range"):
        WindowStream(archive, length, windows=[4])


def _rewrite(path, change):
    ds = xr.open_dataset(path).load()
    ds.close()
    change(ds).to_netcdf(path)


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda ds: ds.drop_vars("truth"), "variables"),
        (lambda ds: ds.assign_coords(x=ds.x * 2), "grid coordinate 'x' differs"),
        (lambda ds: ds.isel(x=slice(0, 16)), "grid size along 'x' 16 differs"),
        (lambda ds: ds.assign(obs_error_std=ds.obs_error_std * 2), "obs_error_std"),
        (lambda ds: ds.assign_coords(time=ds.time - 2.0), "do not continue"),
        (lambda ds: ds.rename(obs="values"), "missing variable 'obs'"),
    ],
)
def test_archive_refuses_a_file_that_disagrees_naming_it(tmp_path, change, why):
    _, paths = _split_bundled(tmp_path)
    _rewrite(paths[2], change)
    with pytest.raises(ObservationError, match=why) as error:
        open_archive(sorted(tmp_path.glob("*.nc")))
    assert str(error.value).startswith(str(paths[2]))


def test_archive_with_no_files():
    with pytest.raises(ObservationError, match="no observation files match"):
        open_archive("/nonexistent/obs_*.nc")


def test_prefetch_keeps_order_and_stays_bounded():
    produced = []

    def items():
        for k in range(20):
            produced.append(k)
            yield k

    stream = prefetch(items(), size=2)
    first = next(stream)
    time.sleep(0.3)  # the producer runs ahead, but no further than the buffer
    # Read ahead: the 2 buffered items plus the one waiting to be put.
    assert first == 0 and len(produced) <= 1 + 2 + 1
    assert [first, *stream] == list(range(20))


def test_prefetch_raises_the_producers_error_and_stops_on_close():
    def failing():
        yield 1
        raise ObservationError("window at time index 10: all observations missing")

    stream = prefetch(failing(), size=2)
    assert next(stream) == 1
    with pytest.raises(ObservationError, match="all observations missing"):
        next(stream)
    before = threading.active_count()
    endless = prefetch(iter(int, 1), size=2)  # never ends
    next(endless)
    endless.close()
    time.sleep(0.3)
    assert threading.active_count() <= before


def _l96_archive(tmp_path, n_files=2, windows_per_file=4):
    """Lorenz-96 twin windows written as `n_files` files (NaN where unobserved)."""
    l96, B, windows = l96_twin_windows(
        n_files * windows_per_file, T, INTERVAL, spinup=300
    )
    values = np.concatenate([np.where(w.mask, w.values, np.nan) for w in windows])
    truth = np.concatenate([np.asarray(w.truth) for w in windows])
    times = np.arange(len(values)) * 0.05
    ds = xr.Dataset(
        {
            "obs": (("time", "x"), values),
            "truth": (("time", "x"), truth),
            "obs_error_std": 1.0,
        },
        coords={
            "time": ("time", times, {"units": "model time units"}),
            "x": ("x", np.arange(40.0), {"units": "model length units"}),
        },
    )
    per = windows_per_file * T
    for k in range(n_files):
        ds.isel(time=slice(k * per, (k + 1) * per)).to_netcdf(tmp_path / f"{k}.nc")
    return l96, B, tmp_path / "*.nc"


def test_streamed_training_equals_training_in_memory(tmp_path):
    """The stream reads each step's windows from disk (the same draws as the
    in-memory path): the same steps, the same parameters."""
    l96, B, pattern = _l96_archive(tmp_path)
    stream = WindowStream(open_archive(pattern, chunk_times=T), T, prefetch=2)
    in_memory = windows_batch([stream[k] for k in range(len(stream))], (40,))
    net, problem = tiny_l96_net(l96, B, T, INTERVAL)
    settings = TrainSettings(
        steps=3, batch_size=2, validate_every=0, checkpoint_every=0
    )
    streamed, records = train(
        net, problem, stream, settings, checkpoint=tmp_path / "s.eqx"
    )
    loaded, expected = train(
        net, problem, in_memory, settings, checkpoint=tmp_path / "m.eqx"
    )
    assert [r["loss"] for r in records] == pytest.approx(
        [r["loss"] for r in expected], rel=1e-9
    )  # the same steps, to the rounding of two compiled programs (which Adam
    # turns into steps of lr * g / eps for near-zero gradients g: atol)
    assert tree_allclose(streamed, loaded, rtol=1e-9, atol=1e-9)
    assert not tree_allclose(
        eqx.filter(streamed, eqx.is_inexact_array),
        eqx.filter(net, eqx.is_inexact_array),
    )
    # A resumed streamed run continues with the same draws.
    more = TrainSettings(steps=5, batch_size=2, validate_every=0, checkpoint_every=0)
    resumed, _ = train(
        net, problem, stream, more, checkpoint=tmp_path / "s.eqx", resume=True
    )
    straight, _ = train(net, problem, in_memory, more, checkpoint=tmp_path / "m2.eqx")
    assert tree_allclose(resumed, straight, rtol=1e-9, atol=1e-9)


def test_analysis_written_while_windows_are_read_on_another_thread(tmp_path):
    """netCDF-C / HDF5 are not thread-safe: `assim-run` appends to analysis.nc while
    the prefetch thread reads windows through xarray (without the shared lock this
    failed at once with 'NetCDF: HDF error')."""
    import simulators as sim
    from assim import AnalysisWriter

    n = 16
    rng = np.random.default_rng(0)
    xr.Dataset(
        {"obs": (("time", "y", "x"), rng.random((500, n, n), dtype=np.float32))}
    ).to_netcdf(tmp_path / "source.nc")
    source = xr.open_dataset(tmp_path / "source.nc", engine="netcdf4")
    stop, failures = threading.Event(), []

    def read():
        k = 0
        while not stop.is_set():
            try:
                source.isel(time=slice(k, k + 10)).load()
            except Exception as e:  # reported by the test
                failures.append(repr(e))
                return
            k = (k + 10) % 490

    reader = threading.Thread(target=read)
    reader.start()
    try:
        with AnalysisWriter(tmp_path / "a.nc", grid=sim.Grid((n, n), (1.0, 1.0))) as w:
            for i in range(300):
                state = rng.random((10, n, n), dtype=np.float32)
                w.append(plain_result(10.0 * i + np.arange(10), state))
            w.close()
    finally:
        stop.set()
        reader.join()
    assert not failures, failures
    with xr.open_dataset(tmp_path / "a.nc") as written:
        assert written["analysis"].shape == (3000, n, n)
        np.testing.assert_array_equal(written["analysis"][-10:].values, state)
