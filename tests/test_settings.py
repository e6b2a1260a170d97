"""Settings are checked before any work: the wrong type or range of a key is one
line naming the key; the CLIs refuse unknown methods, a resume without checkpoint
and failed windows with their exit codes."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from cli_zygote import run_cli
from hydra import compose, initialize_config_module

from assim._cli.common import (
    RUN_SETTINGS,
    TRAIN_SETTINGS,
    check_settings,
    method_names,
)
from assim._cli.run import _failed_windows


def _compose(name, *overrides):
    with initialize_config_module("assim.configs", version_base=None):
        return compose(name, overrides=list(overrides))


def test_the_shipped_configs_pass():
    check_settings(_compose("run"), RUN_SETTINGS)
    check_settings(_compose("train"), TRAIN_SETTINGS)
    for method in method_names():
        check_settings(_compose("run", f"method={method}"), RUN_SETTINGS)
    for simulator in ("lorenz96", "ks", "burgers1d", "navier_stokes2d"):
        check_settings(_compose("run", f"simulator={simulator}"), RUN_SETTINGS)


@pytest.mark.parametrize(
    "override,match",
    [
        ("seed=abc", "seed must be an integer, got 'abc'"),
        ("float64=maybe", r"float64 must be a boolean, got 'maybe' \(true or false\)"),
        ("method.analyser.max_steps=0", "method.analyser.max_steps must be >= 1"),
        ("method.analyser.max_steps=abc", "method.analyser.max_steps must be an int"),
        ("method.analyser.solver.inner_steps=0", "inner_steps must be >= 1, got 0"),
        ("method.window_length=0", "method.window_length must be >= 1, got 0"),
        ("method.window_length=many", "method.window_length must be an integer"),
        ("data.max_windows=two", "data.max_windows must be an integer, got 'two'"),
        ("data.heldout_fraction=1.5", r"heldout_fraction must be >= 0 and < 1"),
        ("data.heldout_fraction=-0.1", r"heldout_fraction must be >= 0 and < 1"),
        ("scoring.burn_in=-1", "scoring.burn_in must be >= 0"),
        ("gross_error_factor=0", "gross_error_factor must be > 0"),
        (
            "simulator.background_covariance.std=big",
            "simulator.background_covariance.std must be a number, got 'big'",
        ),
        (
            "simulator.background_covariance.length_fraction=2",
            "length_fraction must be > 0 and <= 1",
        ),
    ],
)
def test_bad_run_settings_name_the_key(override, match):
    with pytest.raises(ValueError, match=match) as info:
        check_settings(_compose("run", override), RUN_SETTINGS)
    assert "\n" not in str(info.value)


def test_filters_call_length_auto():
    """`method.window_length=auto` (the filters' default): times per compiled call
    keeping the call's mean and spread within 64 MiB, at most 200, dividing the
    file's times where a divisor of 10 or more does; a variational method refuses
    it (its window is the 4D-Var window: tested in test_cli)."""
    from assim._cli.run import times_per_call

    check_settings(_compose("run", "method=etkf"), RUN_SETTINGS)  # auto passes
    assert times_per_call((40,), jnp.float64, 1200) == 200
    assert times_per_call((40,), jnp.float64, 24) == 24
    assert times_per_call((40,), jnp.float64, 1000) == 200
    assert times_per_call((40,), jnp.float64, 1100) == 110  # no time left over
    assert times_per_call((40,), jnp.float64, 1201) == 200  # prime: the cap
    assert times_per_call((512, 512), jnp.float32, 1200) == 30  # 2 MiB per time
    assert times_per_call((4096, 4096), jnp.float64, 1200) == 1
    assert _compose("run", "method=letkf").method.window_length == "auto"


def test_letkf_weight_stride_setting():
    letkf = _compose("run", "method=letkf", "method.analyser.weight_stride=0")
    with pytest.raises(ValueError, match="weight_stride must be >= 1, got 0"):
        check_settings(letkf, RUN_SETTINGS)
    check_settings(_compose("run", "method=letkf"), RUN_SETTINGS)  # null: the radius


@pytest.mark.parametrize(
    "override,match",
    [
        ("training.steps=0", "training.steps must be >= 1"),
        ("training.learning_rate=-1", "training.learning_rate must be > 0"),
        ("resume=yes", "resume must be a boolean"),
        ("training.cycle_every=-2", "training.cycle_every must be >= 0"),
    ],
)
def test_bad_train_settings_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        check_settings(_compose("train", override), TRAIN_SETTINGS)


class _Result:
    def __init__(self, outcome, cost):
        self.outcome, self.cost = outcome, np.asarray(cost)


def test_failed_windows_are_the_non_finite_and_failed_ones():
    results = [
        _Result("converged", [2.0, 1.0]),
        _Result("max_steps", [2.0, np.nan]),
        _Result("failed", [2.0, 1.5]),
        _Result("fixed_steps", [np.inf, 1.0]),
        _Result("non_finite", [2.0, 1.9]),
    ]
    assert _failed_windows(results) == [1, 2, 3, 4]


def _cli(module, tmp_path, *overrides):
    return run_cli(
        f"assim._cli.{module}",
        f"hydra.run.dir={tmp_path}",
        "progress=false",
        *overrides,
        cwd=tmp_path,
        timeout=300,
    )


def test_cli_refusals_exit_2_before_any_work(tmp_path):
    """An unknown method, a setting of the wrong type and a resume without a
    checkpoint: exit code 2, one line, nothing written."""
    cases = [
        ("run", ["method.name=foo"], "method.name 'foo' is not a method"),
        ("run", ["seed=abc"], "seed must be an integer"),
        ("train", ["resume=true"], "resume=true but there is no checkpoint"),
    ]
    for module, overrides, message in cases:
        run = _cli(module, tmp_path, *overrides)
        assert run.returncode == 2, run.stderr
        errors = [line for line in run.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0], run.stderr
    written = {p.name for p in tmp_path.iterdir()} - {".hydra", "_run.log"}
    assert not {"analysis.nc", "metrics.json", "checkpoint.eqx"} & written


def test_cli_exit_4_when_windows_fail(capsys):
    """A run whose windows failed (the others written) exits 4 with one line."""
    from assim import WindowsFailed
    from assim._cli import common

    def body(cfg):
        raise WindowsFailed("2 of 4 windows failed (first: window 1)")

    with pytest.raises(SystemExit) as info:
        # no persistent cache in the test process (the CLIs' subprocesses use it)
        cfg = _compose("run", "compilation_cache.enabled=false")
        common.run_app("assim-run", cfg, body, RUN_SETTINGS)
    assert info.value.code == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["assim-run: error: 2 of 4 windows failed (first: window 1)"]


def _lock(directory):
    from omegaconf import OmegaConf

    from assim._cli.common import RunDirectoryLock

    lock = RunDirectoryLock()
    cfg = {"hydra": {"run": {"dir": str(directory)}, "job": {"name": "run"}}}
    lock.on_run_start(OmegaConf.create(cfg))
    return lock


def test_run_directory_lock_refuses_a_second_run_and_cleans_leftovers(tmp_path):
    """While a run holds its directory, a second `assim-run` into it exits 2 with
    one line before hydra writes anything there; a new holder removes the
    temporary files a killed run left (and nothing else)."""
    stale = [
        ".analysis.nc.k3j2h1g0",
        ".checkpoint.eqx.ab_cd123",
        ".metrics.json.x1y2z3w4",
    ]
    for name in [*stale, ".keep.txt", "analysis.nc"]:
        (tmp_path / name).write_text("x")
    holder = _lock(tmp_path)
    assert not any((tmp_path / name).exists() for name in stale)
    assert (tmp_path / ".keep.txt").exists() and (tmp_path / "analysis.nc").exists()
    second = _cli("run", tmp_path)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"assim-run: error: the run directory {tmp_path} is in use by assim pid "
        f"{os.getpid()}: give this run another hydra.run.dir"
    ]
    assert not (tmp_path / ".hydra").exists()
    holder._file.close()  # the first run ends: the directory is free again
    _lock(tmp_path)._file.close()


def test_compilation_cache_persists_programs(tmp_path):
    """`compilation_cache` sends every program (no minimum compile time) to the
    cache directory, and a later compilation of the same program is a cache hit,
    both counted for `metrics.json`."""
    import jax
    import jax.numpy as jnp
    from jax._src import compilation_cache
    from omegaconf import OmegaConf

    from assim._cli.common import COMPILE_STATS, use_compilation_cache

    saved = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    cache = tmp_path / "cache"
    try:
        use_compilation_cache(OmegaConf.create({"enabled": True, "dir": str(cache)}))
        compilation_cache.reset_cache()
        f = jax.jit(lambda x: jnp.sin(x) * 3.25 + x**3)
        programs = COMPILE_STATS.programs
        f(jnp.arange(7.0)).block_until_ready()
        assert COMPILE_STATS.programs > programs
        assert any(cache.iterdir())
        jax.clear_caches()  # the in-memory cache: the next call reads the disk
        hits = COMPILE_STATS.cache_hits
        f(jnp.arange(7.0)).block_until_ready()
        assert COMPILE_STATS.cache_hits > hits
        assert COMPILE_STATS.summary()["cache_dir"] == str(cache)
    finally:
        jax.config.update("jax_compilation_cache_dir", saved[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
        compilation_cache.reset_cache()


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, monkeypatch):
    """A run directory that cannot be written, or an existing output that cannot
    be replaced, is refused with one line naming the path (`os.access` stands in
    for the permissions: the tests may run as root, who may write anything)."""
    import os as os_module

    from assim._cli.common import check_writable

    (tmp_path / "analysis.nc").write_text("old")
    check_writable(tmp_path, ("analysis.nc",))
    real = os_module.access
    monkeypatch.setattr(
        os_module,
        "access",
        lambda path, mode: False if str(path).endswith(".nc") else real(path, mode),
    )
    with pytest.raises(PermissionError, match="analysis.nc exists and is not writable"):
        check_writable(tmp_path, ("analysis.nc",))
    target = tmp_path / "file-not-dir"
    target.write_text("x")
    with pytest.raises(PermissionError, match="cannot write to the run directory"):
        check_writable(target / "run")


def test_an_unwritable_cache_directory_only_disables_the_cache(tmp_path, caplog):
    """A cache directory that cannot be made (a read-only home in CI) costs the
    cache, not the run."""
    import jax
    from omegaconf import OmegaConf

    from assim._cli.common import use_compilation_cache

    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache directory's parent should be
    before = jax.config.jax_compilation_cache_dir
    settings = {"enabled": True, "dir": str(blocker / "c")}
    use_compilation_cache(OmegaConf.create(settings))
    assert jax.config.jax_compilation_cache_dir == before
    assert "no compilation cache" in caplog.text


def test_network_without_learned_parameters_runs_the_constant_prior():
    """`network.learn_parameters=false` on the bundled problem: the model runs the
    diffusivity's prior median as a scalar (FFT solves: 306 s -> 26 s for 20
    training steps of `assim-train` on 2 cores), and no parameter is learned."""
    from assim._config import build_network

    for learn, ndim in ((False, 0), (True, 2)):
        cfg = _compose("train", f"network.learn_parameters={str(learn).lower()}")
        net, problem, parameter = build_network(
            cfg, n_times=3, interval=1, scale=1.0, seed=0
        )
        assert problem.simulator.model.kappa.ndim == ndim
        assert (parameter is None) == (not learn)
