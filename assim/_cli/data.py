"""`assim-data`: generate a twin-experiment observation file (NetCDF, CF-1.8).

`assim-data simulator=ks twin.sensors.pattern=stations output=ks.nc`
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from assim._config import generate_twin

from .common import DATA_SETTINGS, log, run_app


def _generate(cfg: DictConfig) -> dict:
    from assim._io import write_netcdf

    ds = generate_twin(cfg.simulator, cfg.twin, int(cfg.seed))
    out = Path(cfg.output)
    if not out.is_absolute():
        out = Path(HydraConfig.get().runtime.output_dir) / out
    write_netcdf(ds, out)
    observed = float(ds["obs"].notnull().mean())
    log.info(
        "wrote %s (%d times, %.1f%% observed)", out, ds.sizes["time"], 100 * observed
    )
    return {"path": str(out), "observed_fraction": observed}


@hydra.main(
    version_base=None, config_path="pkg://assim.configs", config_name="generate"
)
def _main(cfg: DictConfig) -> None:
    metrics = run_app("assim-data", cfg, _generate, DATA_SETTINGS)
    print(metrics["path"])


def main():
    _main()


if __name__ == "__main__":
    main()
