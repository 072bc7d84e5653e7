"""`python -m vlmablate.eval run_dir=PATH eval=mmbench [eval.tsv=FILE]`: evaluate a finished run
(or, without run_dir, the model a `model=...` option names) and merge the results into its summary.

An evaluation that differs from the one the run reports for a set (another mode, extraction, file...)
is kept beside it, never over it (`eval/evaluations.py`)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from vlmablate.config import register_configs, to_run_config

register_configs()
log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from vlmablate.train.distributed import name_deepspeed_accelerator

    name_deepspeed_accelerator(cfg.train.get("deepspeed"))

    from vlmablate.eval.load import load_trained
    from vlmablate.eval.suite import check_benchmark_files, run_eval
    from vlmablate.model.load import load_model
    from vlmablate.model.plan import resolve_plan
    from vlmablate.train.runner import compute_dtype, resolve_model

    cfg = to_run_config(cfg)
    check_benchmark_files(cfg.eval)  # before any weights load
    if cfg.run_dir:
        out_dir = Path(cfg.run_dir)
        model, processor, _ = load_trained(out_dir)
    else:  # a plain checkpoint, evaluated as loaded
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage)
        loaded = load_model(resolve_model(cfg), projector_type=plan.projector_type, quant=cfg.quant,
                            skip_modules=plan.skip_modules(), compute_dtype=compute_dtype(cfg))
        model, processor = loaded.model, loaded.processor
    reported = reported_evaluations(out_dir / "summary.json")
    results, _ = run_eval(cfg.eval, model, processor, out_dir / "eval", world=cfg.world, progress=cfg.train.progress,
                          reported=reported)
    merge_summary(out_dir / "summary.json", results)
    log.info("evaluation merged into %s as %s", out_dir / "summary.json", ", ".join(f"eval.{key}" for key in results))
    mmbench = next((m for m in results.values() if m["evaluation"]["set"] == "mmbench"), None)
    return mmbench["circular_acc"] if mmbench else None


def reported_evaluations(path: Path) -> dict:
    """The summary's `eval` section: the evaluations the run reports, which a new one must not replace."""
    return (json.loads(path.read_text()).get("eval") or {}) if path.exists() else {}


def merge_summary(path: Path, results: dict) -> dict:
    """Add the evaluated sets under `eval` (replacing only the same evaluations made again: `run_eval` named the
    others apart), leaving the rest of the summary as it was."""
    summary = json.loads(path.read_text()) if path.exists() else {"status": "evaluated"}
    summary.setdefault("eval", {}).update(results)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, path)
    return summary


if __name__ == "__main__":
    main()
