"""Data parallelism on 4 forced CPU host devices (in a subprocess: the device count
is fixed when JAX starts): sharded training steps and assimilation agree with one
device, the batch really is split, and a batch that does not divide is refused or
padded, never dropped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def found():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env["JAX_PLATFORMS"] = "cpu"
    script = Path(__file__).with_name("parallel_check.py")
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_four_devices_are_visible(found):
    assert found["devices"] == 4


def test_sharded_training_matches_one_device(found):
    assert found["params_changed"] > 1e-4  # two steps really moved the parameters
    assert found["max_param_difference"] < 1e-10
    for a, b in zip(found["loss_sharded"], found["loss_single"], strict=True):
        assert abs(a - b) <= 1e-10 * abs(b)


def test_training_step_is_split_across_devices(found):
    assert found["all_reduce_in_step"]
    assert found["shard_devices"] == 4
    assert found["shard_rows"] == [1, 1, 1, 1]


def test_sharded_assimilation_pads_and_matches_one_device(found):
    assert found["analysis_rows"] == 7  # 7 windows padded to 8, the copy dropped
    assert found["max_analysis_difference"] < 1e-10
    assert found["windows_results"] == 7
    assert found["max_window_difference"] < 1e-10


def test_indivisible_training_batch_is_refused(found):
    assert found["indivisible"].startswith(
        "batch_size 3 does not divide across 4 devices"
    )
