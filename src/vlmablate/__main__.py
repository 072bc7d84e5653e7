"""`python -m vlmablate [group=option ...]`: compose a run with Hydra, validate it, train it."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from vlmablate.config import register_configs
from vlmablate.train.distributed import is_main, leave_process_group, name_deepspeed_accelerator, replica_overrides

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    name_deepspeed_accelerator(cfg.train.get("deepspeed"))
    from vlmablate.train.runner import run_from_hydra

    return run_from_hydra(cfg)


def cli() -> None:
    # Under torchrun / accelerate launch, ranks other than 0 keep no Hydra files or log file of their own.
    sys.argv += replica_overrides()
    try:
        main()
    finally:
        leave_process_group()
    if not is_main():
        # A replica that finished leaves without the interpreter's teardown: there, gloo's threads can
        # outlive what they use and abort a rank whose run completed ("terminate called without an active
        # exception", exit -6), which fails the whole launch. Rank 0 writes every artifact and exits normally.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    cli()
