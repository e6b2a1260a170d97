"""A checkpoint is a file someone else may have written: loading it may build only
the project's own objects (an allow-list), never call what its header names."""

import glob
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from assim._config import _check_target, load_network, network_header

CONFIGS = Path(__file__).parent.parent / "configs"


def test_every_project_config_target_is_allowed():
    targets = set()
    for path in glob.glob(str(CONFIGS / "**" / "*.yaml"), recursive=True):
        targets.update(re.findall(r"_target_:\s*([\w.]+)", Path(path).read_text()))
    # The apps' hydra callbacks are built by hydra from the packaged configs (the
    # `hydra:` section), never from a checkpoint's header.
    targets -= {"assim._cli.common.RunDirectoryLock"}
    assert len(targets) > 20
    for target in targets:
        _check_target(target)


@pytest.mark.parametrize(
    "target",
    [
        "builtins.open",
        "os.remove",
        "assim._io.os.remove",  # a module's import reached through the package
        "assim.os",
        "assim.save_checkpoint",  # public, but writes a file
        "assim.AnalysisWriter",  # creates a file
        "assim._config.instantiate",
        "simulators.Grid.__init__",
        "assim.WindowProblem.forecast",  # a method, not a constructor
        "assim.Variational.__class__.__subclasses__",
    ],
)
def test_targets_outside_the_allow_list_are_refused(target):
    with pytest.raises(ValueError, match="refusing to build"):
        _check_target(target)


def _crafted(tmp_path, victim, target) -> Path:
    """A checkpoint whose header is a real one with the model's `_target_`
    replaced by `target` called on `victim`."""
    with initialize_config_module("assim.configs", version_base=None):
        cfg = compose("train")
    header = network_header(cfg, n_times=10, interval=5, scale=1.0)
    header["simulator"]["model"] = {"_target_": target, "_args_": [str(victim), "w"]}
    path = tmp_path / "crafted.eqx"
    path.write_bytes((json.dumps(header) + "\n").encode() + b"\x00" * 64)
    return path


@pytest.mark.parametrize("target", ["builtins.open", "assim._io.os.remove"])
def test_crafted_checkpoint_is_refused_and_calls_nothing(tmp_path, target):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    path = _crafted(tmp_path, victim, target)
    with pytest.raises(ValueError, match="refusing to build"):
        load_network(path)
    assert victim.read_text() == "precious"


def test_crafted_checkpoint_from_the_cli(tmp_path):
    """`assim-run method=unrolled` with the crafted file: exit code 2, one line
    naming the refused target, the victim intact, no output written."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    path = _crafted(tmp_path, victim, "builtins.open")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "assim._cli.run",
            f"hydra.run.dir={tmp_path / 'run'}",
            "method=unrolled",
            f"method.checkpoint={path}",
            "progress=false",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if "refusing" in line]
    assert len(lines) == 1 and "builtins.open" in lines[0], run.stderr
    assert victim.read_text() == "precious"
    assert not (tmp_path / "run" / "analysis.nc").exists()


def _state(n):
    import jax.numpy as jnp

    from assim._train import TrainState

    return TrainState({"w": jnp.arange(n, dtype=jnp.float32)}, (), jnp.asarray(3))


def test_damaged_checkpoints_are_refused_with_one_line(tmp_path):
    """A flipped byte, a truncated file, random bytes and a checkpoint of another
    network each give a one-line ValueError naming the file."""
    import numpy as np

    from assim._train import load_checkpoint, save_checkpoint

    path = tmp_path / "ck.eqx"
    save_checkpoint(path, _state(8), {"format": "test"})
    state, header = load_checkpoint(path, _state(8))
    np.testing.assert_array_equal(state.params["w"], np.arange(8))
    assert len(header["sha256"]) == 64
    data = path.read_bytes()
    cases = {
        "flipped": data[:-5] + bytes([data[-5] ^ 1]) + data[-4:],
        "truncated": data[:-16],
        "random": bytes(np.random.default_rng(0).integers(0, 256, 300, np.uint8)),
    }
    for name, content in cases.items():
        bad = tmp_path / f"{name}.eqx"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=name + r"\.eqx") as error:
            load_checkpoint(bad, _state(8))
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="does not fit this network"):
        load_checkpoint(path, _state(9))
