"""`python -m vlmablate [group=option ...]`: compose a run with Hydra, validate it, train it."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from vlmablate.config import register_configs
from vlmablate.train.distributed import leave_process_group, replica_overrides

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from vlmablate.train.runner import run_from_hydra

    return run_from_hydra(cfg)


def cli() -> None:
    # Under torchrun / accelerate launch, ranks other than 0 keep no Hydra files or log file of their own.
    sys.argv += replica_overrides()
    try:
        main()
    finally:
        leave_process_group()


if __name__ == "__main__":
    cli()
