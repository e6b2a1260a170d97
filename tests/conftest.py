import atexit
import os
import shutil
import subprocess
import sys
import tempfile

# Tests compile many small programs and run them briefly, so compiling is most of
# their time. Cheaper code generation: LLVM at -O0 without its expensive passes
# (about a quarter off), and XLA:CPU's loop emitters for fusions instead of its
# newer fusion emitters (compile time 650 s -> 411 s over the suite, 2026-12-07;
# the programs compute the same up to rounding). Subprocesses inherit the flags.
# An XLA that does not know a flag aborts, so the emitter flag is tried once per
# session in a subprocess; xdist's workers inherit the outcome.
_FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
_LOOP_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flags: str) -> bool:
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()",
        ],
        env={**os.environ, "XLA_FLAGS": flags},
        capture_output=True,
        timeout=300,
    )
    return probe.returncode == 0


if "ASSIM_TEST_XLA_FLAGS" not in os.environ:
    _flags = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
    if _xla_accepts(f"{_flags} {_LOOP_EMITTERS}"):
        _flags = f"{_flags} {_LOOP_EMITTERS}"
    os.environ["ASSIM_TEST_XLA_FLAGS"] = os.environ["XLA_FLAGS"] = _flags

# The CLI subprocesses' compilation cache (their default directory is under
# XDG_CACHE_HOME) is the session's, not the user's: made by the first process,
# inherited by xdist's workers, removed when that process ends.
if "ASSIM_TEST_CACHE_HOME" not in os.environ:
    _home = tempfile.mkdtemp(prefix="assim-tests-")
    atexit.register(shutil.rmtree, _home, True)
    os.environ["ASSIM_TEST_CACHE_HOME"] = os.environ["XDG_CACHE_HOME"] = _home

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.random as jr  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def getkey():
    """A fresh PRNG key per call, deterministic per test."""
    keys = iter(jr.split(jr.key(0), 1000))
    return lambda: next(keys)
