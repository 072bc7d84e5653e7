"""The configured evaluation of one model: which sets, where their files are, what goes into summary.json."""

from __future__ import annotations

import logging
from pathlib import Path

from vlmablate.config import EvalConfig, WorldConfig
from vlmablate.eval.run import evaluate_mmbench, evaluate_vqa

log = logging.getLogger(__name__)


def benchmark_files(cfg: EvalConfig, world: WorldConfig | None) -> dict:
    """The MMBench TSV and VQA JSON to use: the configured files, else the tiny world's."""
    files = {"tsv": cfg.tsv, "vqa_json": cfg.vqa_json, "vqa_image_root": cfg.vqa_image_root}
    if (cfg.tsv is None or cfg.vqa_json is None) and world is not None:
        from vlmablate.world.build import ensure_world_data

        data = ensure_world_data(world, progress=False)
        files["tsv"] = files["tsv"] or data["bench_tsv"]
        if files["vqa_json"] is None:
            files["vqa_json"], files["vqa_image_root"] = data["vqa_json"], data["image_root"]
    return files


def run_eval(cfg: EvalConfig, model, processor, out_dir: Path, *, world: WorldConfig | None = None,
             progress: bool = False) -> tuple[dict, dict]:
    """Evaluate; return (metrics for summary["eval"], samples for W&B). Predictions go under out_dir/<set>/."""
    if not cfg.tasks:
        return {}, {}
    files = benchmark_files(cfg, world)
    results, samples = {}, {}
    common = dict(batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, max_questions=cfg.max_questions,
                  n_boot=cfg.n_boot, progress=progress)
    if "mmbench" in cfg.tasks:
        metrics, rows = evaluate_mmbench(model, processor, files["tsv"], mode=cfg.mode, out_dir=out_dir / "mmbench",
                                         circular=cfg.circular, **common)
        results["mmbench"], samples["mmbench"], samples["mmbench_tsv"] = metrics, rows, files["tsv"]
        log.info("MMBench (%s): circular %.3f [%.3f, %.3f], vanilla %.3f, unparsed %.3f, %d questions in %.1f s",
                 cfg.mode, metrics["circular_acc"] or 0, *(metrics["circular_ci"] or [0, 0]),
                 metrics["vanilla_acc"] or 0, metrics["unparsed_rate"] or 0, metrics["n_questions"],
                 metrics["seconds"])
        if cfg.text_only_baseline:
            blank, _ = evaluate_mmbench(model, processor, files["tsv"], mode=cfg.mode, blank=True,
                                        out_dir=out_dir / "mmbench_blank_image", circular=cfg.circular, **common)
            results["mmbench_blank_image"] = blank
            log.info("MMBench with a blank image (text-only baseline): circular %.3f, vanilla %.3f",
                     blank["circular_acc"] or 0, blank["vanilla_acc"] or 0)
    if "textvqa" in cfg.tasks:
        results["textvqa"] = evaluate_vqa(model, processor, files["vqa_json"], out_dir=out_dir / "textvqa",
                                          image_root=files["vqa_image_root"], use_ocr=cfg.use_ocr, **common)
        log.info("VQA accuracy: %.3f on %d questions", results["textvqa"]["vqa_acc"] or 0, results["textvqa"]["n"])
    return results, samples
