"""Weights & Biases for one run: flat config keys, stage as job type, policies as tags; and for a sweep, its
decision per budget in a run of its own in the sweep's group (job type `report`).

Without an API key the run is offline (sync it later with `wandb sync`); any W&B failure is
logged and training goes on: experiment tracking must never block or crash a run.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import fields
from pathlib import Path
from typing import Mapping

from vlmablate.config import LoggerConfig

log = logging.getLogger(__name__)


def flat_config(config: dict, prefix: str = "") -> dict:
    """{"freeze": {"name": "lora_llm"}} → {"freeze.name": "lora_llm"}, so W&B can group by any key."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, prefix=name + "."))
        else:
            flat[name] = value
    return flat


def sweep_retention_summary(rows) -> dict:
    """Per cell of the report: its retention loss with the CI, and its MMBench gain over the frozen-LLM cell."""
    out = {}
    for r in rows:
        if r.get("retention_loss") is not None:
            out.update(retention_keys(r["retention_loss"], r.get("retention_ci_low"), r.get("retention_ci_high"),
                                      r["cell"]))
        if r.get("mmbench_gain") is not None:
            out[f"mmbench_gain/{r['cell']}"] = r["mmbench_gain"]
    return out


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def resolve_mode(cfg: LoggerConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if _has_api_key() else "offline"


def _resume_kwargs(run_dir: Path, mode: str) -> dict:
    """One W&B run per run directory: a run resumed after preemption continues its W&B run online
    (offline, each attempt is its own offline run; `wandb sync` uploads them).

    A W&B sweep agent names its runs itself (WANDB_RUN_ID), so there the agent's id stands.
    """
    if mode != "online" or os.environ.get("WANDB_SWEEP_ID") or os.environ.get("WANDB_RUN_ID"):
        return {}
    path = run_dir / "wandb_run_id"
    if not path.exists():
        path.write_text(secrets.token_hex(6))
    return {"id": path.read_text().strip(), "resume": "allow"}


def start_wandb(cfg: LoggerConfig, config: dict, *, run_dir: Path, job_type: str, tags: list[str]):
    """Start the run (Trainer's W&B callback then logs into it); None when logging is off or fails."""
    if cfg.name != "wandb":
        return None
    try:
        import wandb

        run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, job_type=job_type,
                         tags=[*tags, *cfg.tags], config=config, dir=str(run_dir), mode=resolve_mode(cfg),
                         name=run_dir.name, reinit="finish_previous", **_resume_kwargs(run_dir, resolve_mode(cfg)))
        log.info("W&B run %s (%s mode) in %s", run.id, resolve_mode(cfg), run.dir)
        return run
    except Exception as exc:  # tracking is optional; never let it take the run down
        log.warning("W&B could not start (%s); training continues without it", exc)
        return None


def log_predictions(run, samples: dict, n: int) -> None:
    """A `wandb.Table` of the first `n` MMBench predictions with their images."""
    rows = samples.get("mmbench") or []
    if run is None or not rows or n <= 0:
        return
    try:
        import wandb

        from vlmablate.eval.mmbench import decode_image, read_mmbench_tsv

        tsv = samples.get("mmbench_tsv")
        split = samples.get("mmbench_split", "dev")
        images = {q.q: q.image_b64 for q in read_mmbench_tsv(tsv, split=split)} if tsv else {}
        table = wandb.Table(columns=["index", "copy", "category", "image", "prediction", "answer", "correct", "raw"])
        for row in rows[:n]:
            image = wandb.Image(decode_image(images[row["q"]])) if row["q"] in images else None
            raw = row.get("reply", row.get("letter_scores"))
            table.add_data(row["index"], row["copy"], row["category"], image, row["prediction"], row["answer"],
                           row["correct"], json.dumps(raw))
        run.log({"eval/mmbench_predictions": table})
    except Exception as exc:
        log.warning("W&B prediction table skipped (%s)", exc)


def finish_wandb(run, summary: dict) -> None:
    if run is None:
        return
    try:
        # The same keys for every run, so W&B's grouping, parallel-coordinates and table views compare cells.
        keep = ("status", "cell", "seed", "params", "train", "eval")
        run.summary.update(flat_config({k: v for k, v in summary.items() if k in keep}))
        retention = (summary.get("eval") or {}).get("retention")
        if retention and "difference" in retention:  # the report's and the decision's name, beside eval.retention.*
            run.summary.update(retention_keys(retention["difference"], *retention["ci"]))
        offline = run.settings.mode == "offline"
        run_path = Path(run.dir).parent
        run.finish()
        if offline:
            log.info("W&B ran offline; upload with: wandb sync %s", run_path)
    except Exception as exc:
        log.warning("W&B could not finish cleanly (%s)", exc)


def retention_keys(loss: float | None, low: float | None, high: float | None, cell: str | None = None) -> dict:
    """The retention keys of a run summary (`retention_loss`...) or, per `cell`, of the sweep summary."""
    suffix = f"/{cell}" if cell else ""
    return {f"retention_loss{suffix}": loss, f"retention_ci_low{suffix}": low, f"retention_ci_high{suffix}": high}


DECISION_COLUMNS = ["budget", "pick", "most accurate", "fits", "estimated", "line"]


def log_decision(logger: Mapping, decision: dict, *, sweep_dir: Path,
                 rows: list[dict] = ()) -> str | None:
    """The sweep's decision in W&B: a run in the sweep's group (job type `report`) whose summary holds one
    `decision/<budget>` line per budget and `decision/notes`, each row's `retention_loss/<cell>` (with
    `retention_ci_low/<cell>`, `retention_ci_high/<cell>`) and `mmbench_gain/<cell>`, and a `decision` table.
    `logger` is the sweep's logger config; nothing is logged unless it names W&B, and a W&B failure is only
    logged. Returns the offline run's folder for `wandb sync`, if it ran offline."""
    cfg = LoggerConfig(**{f.name: logger[f.name] for f in fields(LoggerConfig) if f.name in logger})
    if cfg.name != "wandb":
        return None
    try:
        import wandb

        mode = resolve_mode(cfg)
        run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, job_type="report",
                         tags=[*cfg.tags, "decision"], dir=str(sweep_dir), mode=mode, name=f"{sweep_dir.name}-report",
                         reinit="finish_previous")
        table = wandb.Table(columns=DECISION_COLUMNS)
        for d in decision["budgets"]:
            table.add_data(d["budget"], d["pick"], d["most_accurate"], ", ".join(d["fits"]),
                           ", ".join(d["estimated"]), d["line"])
        run.log({"decision": table})
        run.summary.update({**{f"decision/{d['budget']}": d["line"] for d in decision["budgets"]},
                            "decision/notes": "\n".join(decision["notes"]),
                            "decision/ranked_by": decision["ranked_by"]})
        run.summary.update(sweep_retention_summary(rows))
        run_path = Path(run.dir).parent
        run.finish()
        return str(run_path) if mode == "offline" else None
    except Exception as exc:
        log.warning("W&B decision not logged (%s)", exc)
        return None
