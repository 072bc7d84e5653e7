"""Stage chaining: find or train the stage-1 projector a stage-2 run starts from.

`model.pretrained_projector=auto` composes the stage-1 (align) run of the same model, projector,
quantization and train preset on `model.stage1_data`, hashes its resolved config, and reuses the
run cached under that hash, or trains it once under a file lock (two cells starting together train
it once). LLaVA users pass `--pretrain_mm_mlp_adapter PATH` by hand; this keeps the path and the
config that made it together.

Stage 1 is trained by the runner, which in turn calls `ensure_stage1`: the runner passes itself in
(`run=`), so this module never imports it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Callable

from filelock import FileLock

from vlmablate.config import config_hash, to_run_config
from vlmablate.train import distributed as dist

log = logging.getLogger(__name__)

PACKAGE_CONF = Path(__file__).resolve().parent.parent / "conf"

# Overrides that belong to the stage-2 cell and must not leak into its stage-1 run.
# `cell` picks vision and freeze; `train.seed` is a sweep's repeat axis: stage 1 is shared by every cell
# and every seed of a grid, as LLaVA shares one pretrained projector, and trains with its own default seed.
# `world.question_weights` and `world.n_instruct` shape stage 2's conversations only (the captions are scenes
# [0, n_caption), the conversations the next ones): stage 1's captions are the same under any, so a stage 2
# made longer keeps the stage-1 projector of the default length.
_CELL_KEYS = ("stage", "freeze", "vision", "cell", "data", "eval", "model.pretrained_projector", "hydra",
              "train.seed", "world.question_weights", "world.n_instruct")
# Settings that do not change what a run learns, left out of its hash (a sweep run again with resume
# on, or with W&B, still finds its finished cells). The MFU peak, the plan command's GPU, MFU and data
# size, the report's budgets and the retention evaluation came later: left out, they also keep the hashes
# (stage-1 caches, finished cells) made before them. A finished cell found again keeps its summary, so it
# has no retention section until it is run anew. `train.labelled_logits_only` runs the LM head on fewer rows
# for the same loss and gradients (to float rounding; tests/test_labelled_logits.py): a memory setting, as
# `plan.labelled_tokens` is an estimate's.
_UNHASHED = ("logger", "train.progress", "train.resume", "train.checkpoint_on_sigterm", "train.record_data_order",
             "train.peak_tflops", "train.labelled_logits_only", "data.size", "plan.gpu", "plan.mfu",
             "plan.labelled_tokens", "report", "eval.retention")


def compose_config(overrides: list[str]):
    """Compose `conf/config.yaml` with overrides, inside a running Hydra app or outside one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    if GlobalHydra.instance().is_initialized():
        cfg = compose(config_name="config", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(PACKAGE_CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    return to_run_config(cfg), OmegaConf.to_container(cfg, resolve=True)


def _key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def stage1_overrides(overrides: list[str], stage1_data: str) -> list[str]:
    kept = [o for o in overrides if _key(o).split(".")[0] not in _CELL_KEYS and not _key(o).startswith(_CELL_KEYS)]
    return [*kept, "stage=align", f"data={stage1_data}", "eval=none", "model.pretrained_projector=null"]


def learning_config(composed: dict) -> dict:
    """The composed config without the settings that do not change what a run learns (what hashes name)."""
    out = json.loads(json.dumps(composed, default=str))
    for dotted in _UNHASHED:
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return out


def ensure_stage1(overrides: list[str], stage1_data: str, cache_root: Path, *, run: Callable[..., dict]) -> dict:
    """The stage-1 projector for this cell: {"projector", "run_dir", "hash", "reused", "overrides"}.

    `run` trains stage 1 when it is not cached, called as `run(cfg, run_dir, composed=..., overrides=...)`
    (the runner's `run`).
    """
    align_overrides = stage1_overrides(overrides, stage1_data)
    cfg, composed = compose_config(align_overrides)
    material = learning_config(composed)
    material.get("world", {}).pop("question_weights", None)  # set in a world file: the captions are the same
    if cfg.model.source == "tiny_world":  # the weights the projector aligns to, not only the words that name them
        from vlmablate.world.components import components_hash

        material["world_components"] = components_hash(cfg.world)
    key = config_hash(material)
    run_dir = cache_root / "stage1" / f"{cfg.model.name}-{cfg.projector.type}-{key}"
    projector = run_dir / "final" / "projector"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # Under torchrun the ranks train stage 1 together: rank 0 holds the lock against other jobs and
    # decides whether it is cached, and every rank follows that one decision.
    with FileLock(str(run_dir) + ".lock") if dist.is_main() else contextlib.nullcontext():
        summary_path = run_dir / "summary.json"
        done = summary_path.exists() and json.loads(summary_path.read_text()).get("status") == "completed"
        done = dist.broadcast(done)
        if not done:
            log.info("stage 1 (align) for this cell is not cached: training it once into %s", run_dir)
            run(cfg, run_dir, composed=composed, overrides=align_overrides)
        else:
            log.info("reusing the stage-1 projector %s (config hash %s)", projector, key)
    return {"projector": str(projector), "run_dir": str(run_dir), "hash": key, "reused": done,
            "overrides": align_overrides}
