"""The configured evaluation of one model: which sets, where their files are, what goes into summary.json."""

from __future__ import annotations

import logging
from pathlib import Path

from vlmablate.config import EvalConfig, WorldConfig
from vlmablate.eval.evaluations import identity, place
from vlmablate.eval.mmbench import read_mmbench_tsv
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


def check_benchmark_files(cfg: EvalConfig) -> None:
    """Read a configured MMBench TSV in full now, so a broken file (no answers in a dev split, a bad image
    cell) fails before any training or model loading rather than after. The tiny world's file is built
    by the project and checked when it is built."""
    if "mmbench" in cfg.tasks and cfg.tsv is not None:
        read_mmbench_tsv(cfg.tsv, circular=cfg.circular, split=cfg.split)


def _acc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_eval(cfg: EvalConfig, model, processor, out_dir: Path, *, world: WorldConfig | None = None,
             progress: bool = False, reported: dict | None = None) -> tuple[dict, dict]:
    """Evaluate; return (metrics for summary["eval"], samples for W&B). Each set's predictions go under
    out_dir/<set>/ and its metrics under <set>, named by `metrics["evaluation"]`; where `reported` (the run's
    summary["eval"]) already holds another evaluation of a set, this one goes beside it under its own name
    (`eval/evaluations.py`)."""
    if not cfg.tasks:
        return {}, {}
    files = benchmark_files(cfg, world)
    results, samples = {}, {}
    common = dict(batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, max_questions=cfg.max_questions,
                  n_boot=cfg.n_boot, progress=progress)

    def where(set_name: str, file: str) -> tuple[str, dict]:
        ident = identity(set_name, cfg, file)
        key = place(set_name, ident, reported or {})
        if key != set_name:
            log.info("%s: the run reports another evaluation (%s); this one is kept beside it as %s", set_name,
                     (reported[set_name].get("evaluation") or {}).get("name", "named before evaluations had names"),
                     key)
        return key, {**ident, "dir": f"{out_dir.name}/{key}"}

    def record(key: str, ident: dict, metrics: dict) -> dict:
        results[key] = {**metrics, "evaluation": ident}
        return results[key]

    if "mmbench" in cfg.tasks:
        mmbench = dict(mode=cfg.mode, circular=cfg.circular, split=cfg.split, extraction=cfg.extraction, **common)
        key, ident = where("mmbench", files["tsv"])
        metrics, rows = evaluate_mmbench(model, processor, files["tsv"], out_dir=out_dir / key, **mmbench)
        metrics = record(key, ident, metrics)
        samples["mmbench"], samples["mmbench_tsv"] = rows, files["tsv"]
        samples["mmbench_split"] = cfg.split
        rule = f"{cfg.mode}, {cfg.extraction}" if cfg.mode == "generate" else cfg.mode
        if cfg.split == "test":
            log.info("MMBench test split (%s): %d rows, unparsed %s; no answers, so no score here: upload %s to "
                     "the MMBench server", rule, metrics["n_rows"], _acc(metrics["unparsed_rate"]),
                     metrics["submission"]["xlsx"])
        else:
            lo, hi = metrics["circular_ci"]
            log.info("MMBench (%s): circular %s [%s, %s], vanilla %s, unparsed %s, %d questions in %.1f s", rule,
                     _acc(metrics["circular_acc"]), _acc(lo), _acc(hi), _acc(metrics["vanilla_acc"]),
                     _acc(metrics["unparsed_rate"]), metrics["n_questions"], metrics["seconds"])
        if cfg.text_only_baseline and cfg.split == "test":
            log.info("text-only baseline skipped: a test split has no answers to compare it by")
        elif cfg.text_only_baseline:
            key, ident = where("mmbench_blank_image", files["tsv"])
            blank, _ = evaluate_mmbench(model, processor, files["tsv"], blank=True, out_dir=out_dir / key, **mmbench)
            record(key, ident, blank)
            log.info("MMBench with a blank image (text-only baseline): circular %s (%s on the %d questions with 3+ "
                     "options), vanilla %s", _acc(blank["circular_acc"]), _acc(blank["circular_acc_3plus_options"]),
                     blank["n_questions_3plus_options"], _acc(blank["vanilla_acc"]))
    if "textvqa" in cfg.tasks:
        vqa = dict(image_root=files["vqa_image_root"], use_ocr=cfg.use_ocr, **common)
        key, ident = where("textvqa", files["vqa_json"])
        textvqa = record(key, ident, evaluate_vqa(model, processor, files["vqa_json"], out_dir=out_dir / key, **vqa))
        log.info("VQA accuracy: %s on %d questions", _acc(textvqa["vqa_acc"]), textvqa["n"])
        if cfg.text_only_baseline:
            key, ident = where("vqa_blank_image", files["vqa_json"])
            blank = record(key, ident, evaluate_vqa(model, processor, files["vqa_json"], blank=True,
                                                    out_dir=out_dir / key, **vqa))
            log.info("VQA with a blank image (text-only baseline): %s", _acc(blank["vqa_acc"]))
    return results, samples
