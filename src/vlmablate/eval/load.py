"""Load what a finished run trained, for evaluation: its base checkpoint plus the saved artifacts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from vlmablate.config import RunConfig, to_run_config
from vlmablate.model.load import load_model
from vlmablate.model.plan import resolve_plan
from vlmablate.model.projector_io import load_projector
from vlmablate.train.artifacts import NON_LORA_FILE, TRAINABLES_FILE, load_trainables


def run_config(run_dir: Path) -> RunConfig:
    """The composed config a run recorded in `.hydra/config.yaml`."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no .hydra/config.yaml: not a vlmablate run directory")
    return to_run_config(OmegaConf.load(path))


def load_trained(run_dir: str | Path):
    """(model, processor, config) of a finished run: base checkpoint (quantized as trained) + final/ artifacts."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("status") != "completed":
        raise ValueError(f"{run_dir} did not complete (status={summary.get('status')!r}); nothing to evaluate")
    cfg = run_config(run_dir)
    final = run_dir / "final"
    plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage, lr_scale=cfg.train.lr_scale)
    if (final / "model").exists():  # a fully trained LLM: the complete checkpoint
        base = replace(cfg.model, source="pretrained", checkpoint=str(final / "model"), pretrained_projector=None)
        loaded = load_model(base, projector_type=plan.projector_type, quant=cfg.quant,
                            skip_modules=plan.skip_modules(), compute_dtype=_dtype(cfg))
        return loaded.model, loaded.processor, cfg
    base = replace(cfg.model, source="pretrained", checkpoint=summary["lineage"]["checkpoint"],
                   pretrained_projector=None)
    loaded = load_model(base, projector_type=plan.projector_type, quant=cfg.quant, skip_modules=plan.skip_modules(),
                        compute_dtype=_dtype(cfg))
    model = loaded.model
    if (final / "adapter").exists():
        from peft import PeftModel

        from vlmablate.model.plan import peft_without_bitsandbytes

        with peft_without_bitsandbytes():  # a quantized base has imported it already; PEFT then uses it
            model = PeftModel.from_pretrained(model, final / "adapter")
    for name in (NON_LORA_FILE, TRAINABLES_FILE):
        if (final / name).exists():
            load_trainables(model, final / name)
    if (final / "projector").exists():
        load_projector(model, final / "projector", projector_type=plan.projector_type)
    return model, loaded.processor, cfg


def _dtype(cfg: RunConfig):
    import torch

    return torch.bfloat16 if cfg.train.bf16 else torch.float16 if cfg.train.fp16 else torch.float32
