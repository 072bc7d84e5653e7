"""`python -m vlmablate [group=option ...]`: compose a run with Hydra, validate it, train it."""

from __future__ import annotations

import logging
import os
import sys

import hydra
import torch
from omegaconf import DictConfig

from vlmablate.config import register_configs
from vlmablate.train.distributed import is_main, leave_process_group, replica_overrides

register_configs()
log = logging.getLogger("vlmablate")


def name_deepspeed_accelerator(cfg: DictConfig) -> None:
    """Trainer (through accelerate) imports DeepSpeed whenever it is installed, only to recognise a model DeepSpeed
    wrapped; DeepSpeed then looks for an accelerator and, finding none, warns that it falls back to the CPU. On a
    machine without one the CPU is its only choice, so it is named beforehand (DS_ACCELERATOR, which DeepSpeed alone
    reads), and only a run that does use DeepSpeed hears about it."""
    has_accelerator = (torch.cuda.is_available() or torch.backends.mps.is_available()
                       or (hasattr(torch, "xpu") and torch.xpu.is_available()))
    if has_accelerator or "DS_ACCELERATOR" in os.environ:
        return
    os.environ["DS_ACCELERATOR"] = "cpu"
    if cfg.train.get("deepspeed") or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        log.warning("no GPU here: DeepSpeed (train.deepspeed=%s) runs on the CPU", cfg.train.get("deepspeed"))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    name_deepspeed_accelerator(cfg)
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
