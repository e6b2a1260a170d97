import os

# Tests compile many small programs and run them briefly: cheaper LLVM code
# generation cuts their compile time by about a quarter (subprocesses inherit it).
_FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.random as jr  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def getkey():
    """A fresh PRNG key per call, deterministic per test."""
    keys = iter(jr.split(jr.key(0), 1000))
    return lambda: next(keys)
