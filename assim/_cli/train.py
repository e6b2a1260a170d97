"""`assim-train`: train a window network (unrolled, or bilevel with `network=bilevel`).

With no arguments: the bundled 2D advection-diffusion dataset, the masking loss (no
ground truth), 5 layers with momentum and a proximal CNN prior, the diffusivity field
learned jointly. Writes `checkpoint.eqx` and `metrics.jsonl` into the hydra run
directory; `resume=true hydra.run.dir=THAT_DIR` continues where it stopped. E.g.
`assim-train training.weights.masking=0 training.weights.supervised=1`,
`assim-train network.net.prior=pnp`.
"""

import dataclasses
import time
from pathlib import Path

import hydra
import jax
import jax.numpy as jnp
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from assim import quality_control, train, windows_batch
from assim._config import (
    build_network,
    build_simulator,
    network_header,
    training_settings,
)
from assim._runtime import runtime_summary
from assim._stream import split_windows, stream_windows, window_labels

from .common import COMPILE_STATS, TRAIN_SETTINGS, check_writable, log, run_app
from .run import open_data


def _train(cfg: DictConfig) -> dict:
    out = Path(HydraConfig.get().runtime.output_dir)
    checkpoint = Path(cfg.checkpoint)
    if not checkpoint.is_absolute():
        checkpoint = out / checkpoint
    if cfg.resume and not checkpoint.is_file():
        raise FileNotFoundError(f"resume=true but there is no checkpoint {checkpoint}")
    check_writable(out, (checkpoint.name, Path(cfg.log).name))
    simulator, _ = build_simulator(cfg.simulator)
    grid = simulator.model.grid
    dtype = jnp.zeros(()).dtype
    ds, _, interval = open_data(cfg, grid, out)
    length = int(cfg.network.window_length or ds.attrs.get("window_length", 10))
    numbers, rejected = None, 0
    if cfg.data.get("stream"):
        data, validation = stream_windows(ds, length, cfg.data.max_windows, dtype, grid)
        first = data.batch(range(min(len(data), 16)))
    else:
        groups = split_windows(ds, length, dtype)
        factor = cfg.get("gross_error_factor")
        checked = {
            k: [quality_control(w, factor) for w in v] for k, v in groups.items()
        }
        groups = {k: [w for w, _ in v] for k, v in checked.items()}
        rejected = sum(n for v in checked.values() for _, n in v)
        if rejected:
            log.warning("%d observations rejected as gross errors", rejected)
        if not groups[0]:
            raise ValueError("the observation file has no training window")
        labels = window_labels(ds, length)
        numbers = {k: np.flatnonzero(labels == k) for k in groups}
        if cfg.data.max_windows:
            groups = {k: v[: int(cfg.data.max_windows)] for k, v in groups.items()}
            numbers = {k: v[: int(cfg.data.max_windows)] for k, v in numbers.items()}
        numbers = (numbers[0], numbers[1] if groups[1] else None)
        data = first = windows_batch(groups[0], grid.shape)
        validation = windows_batch(groups[1], grid.shape) if groups[1] else None
    # The networks' input scale: the spread of the training observations (no truth).
    scale = first.observed_std()
    net, problem, parameter = build_network(
        cfg, n_times=length, interval=interval, scale=scale, seed=cfg.seed
    )
    if cfg.network.get("stable_steps") and hasattr(net, "with_stable_steps"):
        net = net.with_stable_steps(
            problem, jax.tree.map(lambda a: a[0], first.obs), first.background[0]
        )
    settings = training_settings(cfg.training)
    if settings.cycle_every and cfg.data.get("stream"):
        log.warning(
            "streamed windows: training on the file's backgrounds (cycled "
            "backgrounds, training.cycle_every, need the windows in memory)"
        )
        settings = dataclasses.replace(settings, cycle_every=0)
    checkpoint = Path(cfg.checkpoint)
    if not checkpoint.is_absolute():
        checkpoint = out / checkpoint
    metrics_log = Path(cfg.log)
    if not metrics_log.is_absolute():
        metrics_log = out / metrics_log
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.steps, desc="train", unit="step")

    def on_step(step, record):
        if bar is not None:
            bar.n = step
            shown = {
                k: f"{v:.4g}"
                for k, v in record.items()
                if k not in ("step", "validation")
            }
            if "validation" in record:
                shown["val"] = f"{record['validation']['loss']:.4g}"
            bar.set_postfix(shown)
            bar.refresh()

    header = network_header(cfg, n_times=length, interval=interval, scale=scale)
    t0 = time.perf_counter()
    try:
        trained, records = train(
            net,
            problem,
            data,
            settings,
            validation=validation,
            checkpoint=checkpoint,
            header=header,
            resume=bool(cfg.resume),
            log=metrics_log,
            on_step=on_step,
            window_numbers=numbers,
        )
    finally:
        if bar is not None:
            bar.close()
    summary = {
        "checkpoint": str(checkpoint),
        "log": str(metrics_log),
        "steps": settings.steps,
        "train_windows": data.size,
        "validation_windows": 0 if validation is None else validation.size,
        "observations_rejected": rejected,
        "final_loss": records[-1]["loss"] if records else None,
        "validation": next(
            (r["validation"] for r in reversed(records) if "validation" in r), None
        ),
        "wall_time_s": time.perf_counter() - t0,
        "compilation": COMPILE_STATS.summary(),
        "runtime": runtime_summary(),
    }
    if parameter is not None:
        value = np.asarray(parameter.value(trained.theta))
        summary["parameter"] = {"name": parameter.name, "mean": float(value.mean())}
        true_name = f"true_{parameter.name}"
        if true_name in ds.variables:  # evaluation only, after training
            true = np.asarray(ds[true_name].values)
            summary["parameter"]["relative_l2_error"] = float(
                np.linalg.norm(value - true) / np.linalg.norm(true)
            )
    log.info("wrote %s", checkpoint)
    return summary


@hydra.main(version_base=None, config_path="pkg://assim.configs", config_name="train")
def _main(cfg: DictConfig) -> None:
    summary = run_app("assim-train", cfg, _train, TRAIN_SETTINGS)
    print(OmegaConf.to_yaml(OmegaConf.create(summary)))


def main():
    _main()


if __name__ == "__main__":
    main()
