"""What the hydra apps share: float64, joining a multi-host run, one-line errors
and exit codes. Everything they build comes from `assim._config`."""

import logging
import sys
from collections.abc import Callable

import equinox as eqx
import jax
from omegaconf import DictConfig

log = logging.getLogger("assim")


def run_app(name: str, cfg: DictConfig, body: Callable[[DictConfig], dict]):
    """Run a CLI body: float64 switch, joining a multi-host run (`distributed`),
    one-line errors and exit code 2 on bad input."""
    from assim import ObservationError, TrainingStopped

    # JAX logs at INFO that it found no TPU on every run: not the user's concern.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    if cfg.get("float64"):
        jax.config.update("jax_enable_x64", True)
    try:
        distributed = cfg.get("distributed")
        if distributed is not None and distributed.enabled:
            from assim import initialize_distributed

            initialize_distributed(
                distributed.coordinator_address,
                distributed.num_processes,
                distributed.process_id,
            )
        metrics = body(cfg)
    except (ObservationError, ValueError, TypeError, FileNotFoundError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        log.error("%s", message)
        print(f"{name}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError, TrainingStopped) as e:
        from assim._train import error_summary

        message = error_summary(e)
        log.error("%s", message)
        print(f"{name}: solver error: {message}", file=sys.stderr)
        sys.exit(3)
    return metrics
