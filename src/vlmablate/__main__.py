"""`python -m vlmablate [group=option ...]`: compose a run with Hydra, validate it, train it."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vlmablate.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from vlmablate.train.runner import run_from_hydra

    return run_from_hydra(cfg)


if __name__ == "__main__":
    main()
