"""`python -m vlmablate.eval run_dir=PATH eval=mmbench [eval.tsv=FILE]`: evaluate a finished run
(or, without run_dir, the model a `model=...` option names) and merge the results into its summary."""

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
    results, _ = run_eval(cfg.eval, model, processor, out_dir / "eval", world=cfg.world, progress=cfg.train.progress)
    merge_summary(out_dir / "summary.json", results)
    log.info("evaluation merged into %s", out_dir / "summary.json")
    mmbench = results.get("mmbench")
    return mmbench["circular_acc"] if mmbench else None


def merge_summary(path: Path, results: dict) -> dict:
    """Add or replace the evaluated sets under `eval`, leaving the rest of the summary as it was."""
    summary = json.loads(path.read_text()) if path.exists() else {"status": "evaluated"}
    summary.setdefault("eval", {}).update(results)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, path)
    return summary


if __name__ == "__main__":
    main()
