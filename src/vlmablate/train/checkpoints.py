"""Checkpoints a run can resume from: complete ones only, newest first, the rest of a run's progress beside them.

Trainer writes `checkpoint-N/` file by file, so a run killed while saving leaves a folder that looks
like a checkpoint but is not one. vlmablate marks a checkpoint complete by writing `COMPLETE` last
(atomically, after every rank has written its part), and `train.resume=auto` only ever picks a
marked one; rotation (`train.save_total_limit`) runs after the mark, so the previous complete
checkpoint is never deleted before the next one is.

Trainer's checkpoint holds the optimizer, the scheduler, the RNG states of every rank and its step
(which also places the batch sampler: it is deterministic per seed and epoch, and Trainer skips the
batches already trained). The weights are the plan's artifacts (`artifacts.py`). What vlmablate
itself counts — tokens, samples, skipped records, the data order — goes into `progress.rank<R>.json`,
so a resumed run's summary equals the one of a run never stopped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from vlmablate.config import ConfigError
from vlmablate.train.artifacts import write_json_atomic

COMPLETE = "COMPLETE"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def step_of(folder: Path) -> int | None:
    match = _CHECKPOINT.match(folder.name)
    return int(match.group(1)) if match else None


def checkpoints(parent: Path) -> list[Path]:
    """Every `checkpoint-N` folder under `parent`, oldest step first (complete or not)."""
    if not parent.is_dir():
        return []
    found = [p for p in parent.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def newest_complete(parent: Path) -> Path | None:
    complete = [p for p in checkpoints(parent) if is_complete(p)]
    return complete[-1] if complete else None


def mark_complete(folder: Path, step: int) -> None:
    """Written last, by rank 0, once every rank has saved its part."""
    tmp = folder / f".{COMPLETE}.tmp"
    with open(tmp, "w") as f:
        json.dump({"step": step}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / COMPLETE)


def rotate(parent: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than the newest
    complete (left by a killed save); return what was deleted. Nothing is deleted with `keep` None."""
    if not keep:
        return []
    all_ = checkpoints(parent)
    complete = [p for p in all_ if is_complete(p)]
    if not complete:
        return []
    newest = step_of(complete[-1])
    doomed = complete[:-keep] + [p for p in all_ if not is_complete(p) and step_of(p) < newest]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


def resolve_resume(value: str | None, parent: Path) -> Path | None:
    """The checkpoint `train.resume` names: null → none, auto → the newest complete one (or none), else a path."""
    if value is None:
        return None
    if value == "auto":
        return newest_complete(parent)
    folder = Path(value)
    if not folder.is_dir() or step_of(folder) is None:
        raise ConfigError(f"train.resume={value}: not a checkpoint folder (expected .../{PREFIX_CHECKPOINT_DIR}-N)")
    if not is_complete(folder):
        raise ConfigError(f"train.resume={value}: the checkpoint is incomplete (no {COMPLETE} file: its save was "
                          "interrupted); use train.resume=auto to take the newest complete one")
    return folder


def progress_file(folder: Path, rank: int) -> Path:
    return folder / f"progress.rank{rank}.json"


def save_progress(folder: Path, rank: int, progress: dict) -> None:
    write_json_atomic(progress_file(folder, rank), progress)


def load_progress(folder: Path, rank: int) -> dict:
    path = progress_file(folder, rank)
    if not path.exists():
        raise ConfigError(f"{folder} has no {path.name}: it was written by a run with another number of processes "
                          "or by another tool; resume with the same launch, or start afresh")
    return json.loads(path.read_text())
