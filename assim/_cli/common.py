"""What the hydra apps share: float64, joining a multi-host run, one-line errors
and exit codes. Everything they build comes from `assim._config`."""

import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("assim")


def run_app(
    name: str,
    cfg: DictConfig,
    body: Callable[[DictConfig], dict],
    settings: dict | None = None,
):
    """Run a CLI body: float64 switch, joining a multi-host run (`distributed`),
    one-line errors and exit codes: 2 bad input or settings (`settings`: the
    spec `check_settings` checks first), 3 a failed solve (nothing written), 4
    some windows failed (the others written)."""
    from assim import ForecastFailed, ObservationError, TrainingStopped, WindowsFailed

    # JAX logs at INFO that it found no TPU on every run: not the user's concern.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    try:
        check_settings(cfg, settings or {})
        if cfg.get("float64"):
            jax.config.update("jax_enable_x64", True)
        use_compilation_cache(cfg.get("compilation_cache"))
        distributed = cfg.get("distributed")
        if distributed is not None and distributed.enabled:
            from assim import initialize_distributed

            initialize_distributed(
                distributed.coordinator_address,
                distributed.num_processes,
                distributed.process_id,
            )
        metrics = body(cfg)
    except (ObservationError, ValueError, TypeError, OSError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        log.error("%s", message)
        print(f"{name}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except (
        eqx.EquinoxRuntimeError,
        jax.errors.JaxRuntimeError,
        TrainingStopped,
        ForecastFailed,
    ) as e:
        from assim._train import error_summary

        message = error_summary(e)
        log.error("%s", message)
        print(f"{name}: solver error: {message}", file=sys.stderr)
        sys.exit(3)
    except WindowsFailed as e:
        log.error("%s", e)
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(4)
    return metrics


# What the CLIs check before any work: key -> (type, lowest, highest, nullable);
# a bound is inclusive unless written as ("<", value). Keys a config does not have
# (another method, another data source) are skipped.
_COMMON = {
    "seed": (int, None, None, False),
    "float64": (bool, None, None, False),
    "progress": (bool, None, None, False),
    "gross_error_factor": (float, ("<", 0.0), None, True),
    "data.max_windows": (int, 1, None, True),
    "data.heldout_fraction": (float, 0.0, ("<", 1.0), False),
    "data.chunk_times": (int, 1, None, False),
    "twin.n_times": (int, 1, None, False),
    "twin.observation_interval": (int, 1, None, False),
    "twin.spinup_steps": (int, 0, None, False),
    "twin.noise_std": (float, ("<", 0.0), None, False),
    "twin.window_length": (int, 1, None, False),
    "twin.initial_amplitude": (float, 0.0, None, False),
    "twin.sensors.density": (float, ("<", 0.0), 1.0, False),
    "twin.sensors.dropout": (float, 0.0, ("<", 1.0), False),
}
for _where in ("simulator.background_covariance", "problem.background_covariance"):
    _COMMON.update(
        {
            f"{_where}.std": (float, ("<", 0.0), None, False),
            f"{_where}.scale": (float, ("<", 0.0), None, False),
            f"{_where}.length_fraction": (float, ("<", 0.0), 1.0, False),
            f"{_where}.length_scale": (float, ("<", 0.0), None, False),
            f"{_where}.samples": (int, 2, None, False),
            f"{_where}.interval_steps": (int, 1, None, False),
            f"{_where}.spinup_steps": (int, 0, None, False),
        }
    )
RUN_SETTINGS = {
    **_COMMON,
    "plot": (bool, None, None, False),
    "scoring.burn_in": (int, 0, None, False),
    "method.window_length": (int, 1, None, True),
    "method.shift": (int, 1, None, True),
    "method.batch_windows": (int, 1, None, False),
    "method.cycle": (bool, None, None, False),
    "method.cycle_parameters": (bool, None, None, False),
    "method.analyser.max_steps": (int, 1, None, False),
    "method.analyser.gradient_rtol": (float, ("<", 0.0), ("<", 1.0), True),
    "method.analyser.solver.inner_steps": (int, 1, None, False),
    "method.analyser.solver.rtol": (float, 0.0, None, False),
    "method.analyser.solver.atol": (float, 0.0, None, False),
    "method.ensemble.size": (int, 2, None, False),
    "method.ensemble.seed": (int, None, None, True),
    "method.analyser.inflation": (float, 1.0, None, False),
    "method.analyser.rtps": (float, 0.0, 1.0, False),
    "method.analyser.radius": (float, ("<", 0.0), None, True),
    "method.analyser.relative_radius": (float, ("<", 0.0), None, False),
    "method.analyser.weight_stride": (int, 1, None, True),
    "method.analyser.weight": (float, 0.0, 1.0, False),
    "method.analyser.localisation_radius": (float, ("<", 0.0), None, True),
    "method.analyser.filter.inflation": (float, 1.0, None, False),
    "method.analyser.filter.weight_stride": (int, 1, None, True),
    "method.analyser.filter.rtps": (float, 0.0, 1.0, False),
    "method.analyser.variational.max_steps": (int, 1, None, False),
    "method.refine_steps": (int, 0, None, True),
    "method.refine_inner_steps": (int, 1, None, False),
    "method.refine_parameters": (bool, None, None, False),
}
TRAIN_SETTINGS = {
    **_COMMON,
    "resume": (bool, None, None, False),
    "network.window_length": (int, 1, None, True),
    "training.steps": (int, 1, None, False),
    "training.batch_size": (int, 1, None, False),
    "training.learning_rate": (float, ("<", 0.0), None, False),
    "training.parameter_learning_rate": (float, ("<", 0.0), None, True),
    "training.warmup_steps": (int, 0, None, False),
    "training.final_fraction": (float, 0.0, None, False),
    "training.clip_norm": (float, ("<", 0.0), None, False),
    "training.validate_every": (int, 0, None, False),
    "training.checkpoint_every": (int, 0, None, False),
    "training.cycle_every": (int, 0, None, False),
    "training.keep_best": (bool, None, None, False),
    "training.patience": (int, 0, None, False),
}
DATA_SETTINGS = {
    key: v
    for key, v in _COMMON.items()
    if key in ("seed", "float64") or key.startswith("twin.")
}


def check_settings(cfg: DictConfig, spec: dict) -> None:
    """Raise a one-line `ValueError` naming the key of the first setting in `spec`
    of the wrong type (`seed=abc`, `float64=maybe`) or outside its range
    (`data.heldout_fraction=1.5`, `method.analyser.max_steps=0`)."""
    from omegaconf import OmegaConf

    for key, (kind, low, high, nullable) in spec.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if isinstance(value, str) and value == "__absent__":
            continue
        if value is None:
            if nullable:
                continue
            raise ValueError(f"{key} must be set (got null)")
        if key in _AUTO and value == "auto":
            continue
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ValueError(
                f"{key} must be {_KIND_NAMES[kind]}, got {value!r}"
                + (" (true or false)" if kind is bool else "")
            )
        if not _within(value, low, high):
            raise ValueError(f"{key} must be {_range_text(low, high)}, got {value!r}")


_KIND_NAMES = {bool: "a boolean", int: "an integer", float: "a number"}
_AUTO = {"method.window_length"}  # settings that may also say `auto`


def _within(value, low, high) -> bool:
    if isinstance(low, tuple):
        if not value > low[1]:
            return False
    elif low is not None and value < low:
        return False
    if isinstance(high, tuple):
        return value < high[1]
    return high is None or value <= high


def _range_text(low, high) -> str:
    parts = []
    if low is not None:
        parts.append(f"> {low[1]:g}" if isinstance(low, tuple) else f">= {low:g}")
    if high is not None:
        parts.append(f"< {high[1]:g}" if isinstance(high, tuple) else f"<= {high:g}")
    return " and ".join(parts)


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/assim/jax` (default `~/.cache/assim/jax`)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "assim" / "jax"


def use_compilation_cache(cache) -> None:
    """JAX's persistent compilation cache for this process (`compilation_cache`
    config: `enabled`, `dir`, `min_compile_time_s`), set before the first
    compilation: a later identical run loads its programs instead of compiling
    them. JAX caches only programs that took at least
    `jax_persistent_cache_min_compile_time_secs` to compile (default 1 s, which
    leaves out the many small programs of a run, and with them most of its
    compile time) and whose entry is at least
    `jax_persistent_cache_min_entry_size_bytes`: both are lowered here (0 s,
    0 bytes). Compile (or cache load) times are counted by `CompileStats`."""
    COMPILE_STATS.listen()
    if cache is None or not cache.get("enabled", True):
        return
    directory = Path(cache.dir) if cache.get("dir") else default_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a read-only home: run without the cache
        log.warning("no compilation cache (%s): compiling everything", e)
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(cache.get("min_compile_time_s", 0.0)),
    )
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    COMPILE_STATS.directory = str(directory)


class CompileStats:
    """Seconds JAX spent compiling or loading programs from the persistent cache
    (`/jax/core/compile/backend_compile_duration`), programs compiled, and cache
    hits, counted through `jax.monitoring` for `metrics.json`."""

    def __init__(self):
        self.seconds = 0.0
        self.programs = 0
        self.cache_hits = 0
        self.directory = None
        self._listening = False

    def listen(self) -> None:
        if self._listening:
            return
        self._listening = True

        def duration(event: str, seconds: float, **kwargs) -> None:
            if event == "/jax/core/compile/backend_compile_duration":
                self.seconds += seconds
                self.programs += 1

        def count(event: str, **kwargs) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                self.cache_hits += 1

        jax.monitoring.register_event_duration_secs_listener(duration)
        jax.monitoring.register_event_listener(count)

    def summary(self) -> dict:
        return {
            "compile_s": self.seconds,
            "programs": self.programs,
            "cache_hits": self.cache_hits,
            "cache_dir": self.directory,
        }


COMPILE_STATS = CompileStats()


def method_names() -> list[str]:
    """The `method` configs shipped with the package (`configs/method/*.yaml`)."""
    from importlib.resources import files

    folder = files("assim.configs") / "method"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def check_writable(out, names=()) -> None:
    """Refuse, before any compute, a run directory that cannot be written or an
    existing output in it that cannot be replaced (one line naming the path)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test."):
            pass
    except OSError as e:
        raise PermissionError(f"cannot write to the run directory {out}: {e}") from e
    for name in names:
        path = out / name
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} exists and is not writable")


# Temporary files of the atomic writes (`.analysis.nc.k3j2h1g0`, from mkstemp):
# left by a killed run, removed by the next run that holds the directory's lock.
_STALE = re.compile(r"^\.[^/]+\.(nc|json|jsonl|eqx|png)\.[A-Za-z0-9_]{8}$")


class RunDirectoryLock(Callback):
    """A hydra callback (`hydra.callbacks` of each app's config) that, before hydra
    writes anything into the run directory, takes an exclusive lock on it
    (`.assim.lock`, `fcntl.flock`: released by the system when the process ends,
    even killed), refuses a second run into the same directory with one line and
    exit code 2, and removes the temporary files a killed run left there. Not in
    a multi-host run (`distributed.enabled`: the processes share the directory)."""

    def __init__(self):
        self._file = None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if config.get("distributed") is not None and config.distributed.enabled:
            return
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        out = Path(str(config.hydra.run.dir))
        app = f"assim-{config.hydra.job.name}"  # the module: run, train, data
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".assim.lock", "a+")  # noqa: SIM115 (held until exit)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            owner = lock.read().strip() or "another process"
            lock.close()
            print(
                f"{app}: error: the run directory {out} is in use by {owner}: give "
                "this run another hydra.run.dir",
                file=sys.stderr,
            )
            sys.exit(2)
        lock.seek(0)
        lock.truncate()
        lock.write(f"assim pid {os.getpid()}\n")
        lock.flush()
        self._file = lock
        for path in out.iterdir():
            if _STALE.match(path.name):
                path.unlink(missing_ok=True)
