"""Rank awareness for `torchrun` / `accelerate launch`: who writes, who logs, what every rank agrees on.

The process group itself belongs to the ecosystem: `TrainingArguments` creates it (accelerate's
`PartialState`: gloo on the CPU, NCCL on CUDA, DeepSpeed's own init under DeepSpeed) and Trainer
wraps the model in DDP. What a multi-process *run* needs on top of that lives here:

- one run directory: Hydra stamps each rank's directory with its own clock, so rank 0's is
  broadcast and the others follow it;
- one writer: only rank 0 writes `summary.json`, `final/`, `eval/` and the Hydra files (Trainer's
  checkpoints are already rank-aware); the other ranks log warnings only, marked with their rank;
- agreement before collective work: whether a stage-1 projector is cached is decided by rank 0 and
  broadcast, so the ranks never split between training it and loading it.

Every helper is a no-op in a single process, so the runner reads the same either way.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def broadcast(value, *, from_rank: int = 0):
    """Rank `from_rank`'s `value` on every rank (the value itself in one process)."""
    if not _initialized():
        if is_distributed():
            raise RuntimeError("broadcast across ranks before the process group exists (TrainingArguments makes it)")
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=from_rank)[0]


def gather(value) -> list:
    """Every rank's `value`, in rank order, on every rank ([value] in one process)."""
    if not _initialized():
        return [value]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def barrier() -> None:
    if _initialized():
        torch.distributed.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first, the others after it (caches: `save_pretrained` writes nothing on
    a rank other than 0 once the process group exists, so rank 0 must be the one that builds them)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def leave_process_group() -> None:
    """Tear the process group down before the interpreter exits. Left to interpreter shutdown, gloo's
    threads can outlive the objects they use and abort a rank that already finished its run."""
    if _initialized():
        torch.distributed.destroy_process_group()


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when `flag` is true on at least one (a SIGTERM seen by one rank stops all)."""
    if not _initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def replica_overrides() -> list[str]:
    """Hydra overrides for a rank other than 0: no `.hydra/` copy and no log file of its own."""
    if is_main():
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


def quiet_replica_logging() -> None:
    """Ranks other than 0 log warnings and errors only, each line marked with the rank."""
    if is_main():
        return
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    fmt = logging.Formatter(f"[rank{rank()}][%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    for handler in root.handlers:
        handler.setFormatter(fmt)


def agree_on_run_dir(proposed: Path, make_state) -> Path:
    """Rank 0's run directory on every rank; `make_state()` creates the process group first.

    A rank whose own (empty) directory differs — Hydra stamped it a second later — removes it.
    """
    if not is_distributed():
        return proposed
    make_state()
    agreed = Path(broadcast(str(proposed)))
    if agreed != proposed and not is_main() and proposed.is_dir() and not any(proposed.iterdir()):
        proposed.rmdir()
    return agreed


def name_deepspeed_accelerator(deepspeed: str | None = None) -> None:
    """Trainer (through accelerate) imports DeepSpeed whenever it is installed, only to recognise a model DeepSpeed
    wrapped; DeepSpeed then looks for an accelerator and, finding none, warns that it falls back to the CPU. On a
    machine without one the CPU is its only choice, so every entry point names it beforehand (DS_ACCELERATOR, which
    DeepSpeed alone reads), and only a run that does use DeepSpeed (`deepspeed`: its config) hears about it."""
    has_accelerator = (torch.cuda.is_available() or torch.backends.mps.is_available()
                       or (hasattr(torch, "xpu") and torch.xpu.is_available()))
    if has_accelerator or "DS_ACCELERATOR" in os.environ:
        return
    os.environ["DS_ACCELERATOR"] = "cpu"
    if deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        logging.getLogger("vlmablate").warning("no GPU here: DeepSpeed (train.deepspeed=%s) runs on the CPU", deepspeed)
