"""Data parallelism on 4 forced CPU host devices (in a subprocess: the device count
is fixed when JAX starts): sharded training steps and assimilation agree with one
device, the batch really is split, and a batch that does not divide is refused or
padded, never dropped. Then the same over two processes of 2 devices each, joined
by `jax.distributed.initialize` (two local "hosts" talking through the coordinator
and gloo collectives), against the single-process results."""

import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("parallel_check.py")


def _env(devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} "
        f"--xla_force_host_platform_device_count={devices}"
    )
    return env


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _four_devices() -> dict:
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        env=_env(4),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return _last_json(result.stdout)


@pytest.fixture(scope="module")
def found(tmp_path_factory, worker_id):
    """The 4-device run's results, computed once per test session: under
    pytest-xdist the workers share them through a locked file in the session's
    temporary directory (xdist's recipe), instead of each worker that gets one of
    these tests running the subprocess again."""
    if worker_id == "master":
        return _four_devices()
    root = tmp_path_factory.getbasetemp().parent  # this session's, all workers'
    path = root / "parallel_check_4.json"
    with open(root / "parallel_check_4.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            path.write_text(json.dumps(_four_devices()))
        return json.loads(path.read_text())


@pytest.fixture(scope="module")
def processes():
    """What each of 2 processes (2 devices each, one 4-device mesh) computed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "--distributed", f"127.0.0.1:{port}", "2"]
            + [str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(2),
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
            outputs.append(_last_json(out))
    finally:
        for p in procs:
            p.kill()
    return outputs


def test_four_devices_are_visible(found):
    assert found["devices"] == 4


def test_sharded_training_matches_one_device(found):
    assert found["params_changed"] > 1e-4  # two steps really moved the parameters
    # The same steps up to rounding: all-reduced sums add in another order, and
    # Adam turns a near-zero gradient's rounding into a step of lr * g / eps
    # (~1e-10 here).
    assert found["max_param_difference"] < 1e-9
    for a, b in zip(found["loss_sharded"], found["loss_single"], strict=True):
        assert abs(a - b) <= 1e-9 * abs(b)


def test_training_step_is_split_across_devices(found):
    assert found["all_reduce_in_step"]
    assert found["shard_devices"] == 4
    assert found["shard_rows"] == [1, 1, 1, 1]


def test_sharded_assimilation_pads_and_matches_one_device(found):
    assert found["analysis_rows"] == 7  # 7 windows padded to 8, the copy dropped
    assert found["max_analysis_difference"] < 1e-10
    assert found["windows_results"] == 7
    assert found["max_window_difference"] < 1e-10


def test_ensemble_members_split_over_devices(found):
    assert found["ensemble_shard_devices"] == 4
    assert found["ensemble_max_difference"] < 1e-10


def test_independent_4dvar_windows_over_devices(found):
    assert found["var_results"] == 7
    assert all(found["var_converged"]) and found["var_minimise_converged"]
    assert found["var_max_difference"] < 1e-10  # 4 devices = 1 device
    # Vmapped over windows, the compiled solve takes the iterates of one window's
    # solve alone.
    assert found["var_vs_minimise"] < 1e-10


def test_indivisible_training_batch_is_refused(found):
    assert found["indivisible"].startswith(
        "batch_size 3 does not divide across 4 devices"
    )


def test_two_processes_form_one_mesh(processes):
    for i, found in enumerate(processes):
        assert found["process"] == i
        assert found["processes"] == 2
        assert found["devices"] == 4 and found["local_devices"] == 2
        assert found["shard_processes"] == 2  # the batch spans both processes
        assert found["local_shard_rows"] == [1, 1]  # 4 windows: 1 per device
    # Only the first process writes the (replicated) checkpoint.
    assert [f["checkpoint_written"] for f in processes] == [True, False]


def test_two_processes_train_and_assimilate_as_one_device(found, processes):
    single = np.asarray(found["params_single"])
    for other in processes:
        assert np.max(np.abs(np.asarray(other["params_sharded"]) - single)) < 1e-9
        np.testing.assert_allclose(other["loss_sharded"], found["loss_single"], 1e-9)
        assert other["analysis_rows"] == 7
        # The parameters' rounding differences (above) carried through the
        # network: ~5e-9 here.
        np.testing.assert_allclose(
            other["analysis_sharded"], found["analysis_single"], rtol=0, atol=1e-7
        )
