"""One run, top to bottom: validate → plan → stage 1 → load → data → W&B → train → save → evaluate → summary.

`run` calls one function per step, in that order; `RunRecord` keeps what each step found, and
`summary_of` assembles summary.json from it in one place (also for a run that stops part way).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import time
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import TrainingArguments, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from vlmablate.config import AUTO, ModelConfig, RunConfig, cache_root, config_hash, to_run_config, validate
from vlmablate.data.collator import LlavaCollator
from vlmablate.data.dataset import preflight
from vlmablate.data.errors import DataError
from vlmablate.data.sources import MixedDataset, build_dataset
from vlmablate.data.verdict import BadPolicy, BadRecordTally, judge
from vlmablate.eval.retention import (
    ReadingProbe,
    RetentionProbe,
    checkpoint_identity,
    read_retention_file,
    retention_set,
)
from vlmablate.eval.suite import check_benchmark_files, run_eval
from vlmablate.model.load import load_model, model_dims, resolve_checkpoint
from vlmablate.model.plan import (
    FreezePlan,
    apply_plan,
    format_table,
    parameter_table,
    resolve_plan,
    unwrap,
)
from vlmablate.model.projector_io import check_projector_shapes, load_projector
from vlmablate.report.wandb_log import (
    finish_wandb,
    flat_config,
    log_predictions,
    start_wandb,
)
from vlmablate.train import distributed as dist
from vlmablate.train.artifacts import export_merged, write_json_atomic
from vlmablate.train.audit import GradientAudit
from vlmablate.train.checkpoints import resolve_resume
from vlmablate.train.mfu import Peak, device_peak, mfu_report, model_shapes
from vlmablate.train.stages import PACKAGE_CONF, ensure_stage1, learning_config
from vlmablate.train.trainer import VlmTrainer
from vlmablate.world.build import ensure_world

log = logging.getLogger(__name__)
# Trainer's switch for recomputing activations: transformers renamed `gradient_checkpointing` to
# `activation_checkpointing` within 5.x (the old name warns); the releases before know only the old one.
CHECKPOINTING_ARG = next(name for name in ("activation_checkpointing", "gradient_checkpointing")
                         if name in {f.name for f in fields(TrainingArguments)})


def compute_dtype(cfg: RunConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.train.bf16 else torch.float16 if cfg.train.fp16 else torch.float32


def gradient_accumulation(cfg: RunConfig) -> int:
    """The preset's accumulation, or the one that gives the stage's global batch."""
    if cfg.train.gradient_accumulation_steps is not None:
        return cfg.train.gradient_accumulation_steps
    per_step = cfg.train.per_device_train_batch_size * dist.world_size()
    if not cfg.stage.global_batch_size:
        return 1
    return max(1, round(cfg.stage.global_batch_size / per_step))


def deepspeed_config(name: str | None) -> str | None:
    if not name:
        return None
    packaged = PACKAGE_CONF / "deepspeed" / f"{name}.json"
    return str(packaged) if packaged.exists() else name


def peak_memory_mb() -> float:
    """Peak CUDA memory allocated, or the process's peak RSS on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def training_arguments(cfg: RunConfig, run_dir: Path) -> TrainingArguments:
    """Trainer's arguments from the preset. Under DeepSpeed ZeRO-3 they must exist before the model is
    loaded (from_pretrained then partitions the weights as it loads them)."""
    t = cfg.train
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation(cfg),
        learning_rate=cfg.stage.lr,  # the scheduler scales every group's own LR; this is only the default
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        bf16=t.bf16,
        fp16=t.fp16,
        **{CHECKPOINTING_ARG: t.gradient_checkpointing},
        logging_steps=t.logging_steps,
        logging_first_step=False,  # first_loss is the mean of the first logging window, not one batch
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        dataloader_num_workers=t.dataloader_num_workers,
        seed=t.seed,
        deepspeed=deepspeed_config(t.deepspeed),
        fsdp=t.fsdp,
        fsdp_config=dict(t.fsdp_config) if t.fsdp_config else None,
        ddp_find_unused_parameters=t.ddp_find_unused_parameters,  # null: set by the runner once the data is known
        ddp_backend=t.ddp_backend,
        full_determinism=t.deterministic,
        use_cpu=t.use_cpu,
        report_to=["wandb"] if cfg.logger.name == "wandb" else [],
        remove_unused_columns=False,  # the collator already yields model inputs only
        label_names=["labels"],
        disable_tqdm=not t.progress,
    )


def resolve_model(cfg: RunConfig) -> ModelConfig:
    """`model.source=tiny_world` is the compose mode on the tiny world's pretrained components."""
    if cfg.model.source != "tiny_world":
        return cfg.model
    paths = ensure_world(cfg.world, progress=cfg.train.progress)
    return replace(cfg.model, source="compose", vision_checkpoint=str(paths.vision), llm_checkpoint=str(paths.llm))


def prepare_model(cfg: RunConfig, plan: FreezePlan) -> ModelConfig:
    """Build what the model loads from when missing (the tiny world, a tiny or composed checkpoint).

    Rank 0 builds, the other ranks wait: once the process group exists `save_pretrained` writes
    nothing on them. And it happens before Trainer's arguments exist: under ZeRO-3 a model made
    while they live is partitioned, and would be saved as shape-[0] tensors.
    """
    with dist.main_first():
        model_cfg = resolve_model(cfg)
        resolve_checkpoint(model_cfg, projector_type=plan.projector_type)
    return model_cfg


def load_cell_model(cfg: RunConfig, model_cfg: ModelConfig, plan: FreezePlan, projector_path: str | None):
    """Load the model, install the stage-1 projector if given, apply the plan; return model, processor, lineage."""
    if projector_path:
        # Shapes are checked from configs alone, before any weights load.
        check_projector_shapes(projector_path, model_dims(model_cfg, projector_type=plan.projector_type),
                               plan.projector_type)
    loaded = load_model(model_cfg, projector_type=plan.projector_type, quant=cfg.quant,
                        skip_modules=plan.skip_modules(), compute_dtype=compute_dtype(cfg))
    lineage = {"checkpoint": loaded.checkpoint, "arch": loaded.arch, "pretrained_projector": None}
    if projector_path:
        meta = load_projector(loaded.model, projector_path, projector_type=plan.projector_type)
        lineage["pretrained_projector"] = {"path": str(projector_path), "sha256": meta["sha256"]}
    model = apply_plan(loaded.model, plan, gradient_checkpointing=cfg.train.gradient_checkpointing,
                       sharded=bool(cfg.train.fsdp))
    return model, loaded.processor, lineage


def image_size_of(processor) -> int:
    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None) or {}
    size = getattr(ip, "size", None) or {}
    return int(crop.get("height") or size.get("shortest_edge") or size.get("height") or 336)


def image_tokens_of(model) -> int:
    """Image tokens per image for the length estimates (LLaVA-NeXT's base grid; its tiles come on top)."""
    return int(getattr(unwrap(model).config, "image_seq_length", 0) or 0)


def image_aspect_of(cfg: RunConfig) -> str:
    """The model's own image mode wins over the stage's (LLaVA-NeXT checkpoints: anyres)."""
    return cfg.model.image_aspect or cfg.stage.image_aspect


def _data_report(dataset: MixedDataset, cfg: RunConfig) -> tuple[dict, BadRecordTally]:
    """The data's report with the preflight's findings and their verdict (data/verdict.py, the rule that
    `vlmablate.data.check` applies too), and the tally that training goes on counting bad records in."""
    found: dict[str, str] = {}  # record reference -> reason, of what the preflight found bad
    report = preflight(dataset, max_records=cfg.data.preflight_records, bad_records=found)
    if report["fully_masked"]:
        log.warning("%d of %d checked samples have every label masked (they teach nothing), e.g. %s",
                    report["fully_masked"], report["checked"], report["examples"][:3])
    data = dataset.report()
    policy = BadPolicy.of(cfg.data)
    verdict = judge(policy, records=data["records"], scanned=data["bad_by_reason"], encoded=report["bad"],
                    examples=sorted(found)[:3])
    tally = BadRecordTally(data["records"], data["bad_by_reason"], policy.max_bad_fraction, found=found)
    return {**data, "records_in_mix": len(dataset), "image_aspect": image_aspect_of(cfg),
            "sampler": cfg.stage.sampler, "on_bad_sample": cfg.data.on_bad_sample, "preflight": report,
            "verdict": verdict.to_dict()}, tally


@dataclass
class LoadedCell:
    """The model with its plan applied, and what the trainer and the summary need to know about it."""

    model: torch.nn.Module
    processor: object
    plan: FreezePlan
    table: dict  # parameter counts per component (`parameter_table`)
    lineage: dict  # where the weights came from: checkpoint, stage-1 projector and run
    flop_shapes: object  # `model_shapes`, read before Trainer wraps the model
    no_flops: str | None  # why FLOPs cannot be counted, if they cannot


@dataclass
class Trained:
    """What `train_cell` reports: the summary's `train` section and the records only encoding found bad,
    or the step SIGTERM stopped at (and nothing else)."""

    stopped_at: int | None = None
    section: dict | None = None
    encode_failures: dict | None = None  # bad_at_encode (counts by reason), bad_at_encode_examples


@dataclass
class RunRecord:
    """What the steps of one run found so far; `summary_of` turns it into summary.json. A run that
    stops part way still writes its summary, holding what the steps before the failure found."""

    run_dir: Path
    config_hash: str | None
    seed: int
    cell: dict
    world_size: int
    status: str = "failed"
    loaded: LoadedCell | None = None
    data: dict | None = None
    determinism: dict | None = None
    interrupted_at_step: int | None = None
    trained: Trained | None = None
    data_order: dict | None = None
    artifacts: dict | None = None
    eval: dict | None = None
    error: str | None = None


def run(cfg: RunConfig, run_dir: Path, *, composed: dict | None = None, overrides: list[str] = ()) -> dict:
    """Train one cell; write `summary.json` into `run_dir` whatever happens; return the summary.

    Under torchrun every rank calls this with the same `run_dir`; rank 0 alone writes into it.
    """
    main = dist.is_main()
    cfg = open_run_dir(cfg, run_dir, composed)
    digest = learning_hash(composed)
    done = dist.broadcast(completed_summary(run_dir, digest))
    if done is not None:  # a sweep run again: this cell already finished with this very config
        log.info("%s already completed with this config (hash %s): skipped", run_dir, digest)
        return done
    record = RunRecord(run_dir=run_dir, config_hash=digest, seed=cfg.train.seed, world_size=dist.world_size(),
                       cell={"name": cfg.cell.name, "label": cfg.cell.label})
    wandb_run = None
    try:
        validate_cell(cfg, overrides)
        resume = resolve_resume(cfg.train.resume, run_dir / "checkpoints")
        plan = plan_of(cfg)
        projector_path, stage1 = find_stage1(cfg, overrides)
        model_cfg = prepare_model(cfg, plan)
        # After stage 1 (which made its own) and before the model loads: under DeepSpeed ZeRO-3,
        # from_pretrained partitions the weights as it reads them only while these arguments live.
        args = training_arguments(cfg, run_dir)
        export_fsdp_wrap_classes(cfg)
        # Seeded right before anything draws random numbers (LoRA's initial weights among them): a
        # cell's result must not depend on what ran before it in the process, such as its stage 1.
        set_seed(cfg.train.seed)
        record.loaded = loaded = load_cell(cfg, model_cfg, plan, projector_path, stage1)
        retention = start_retention(cfg, loaded) if main else None
        lm_eval_probe = start_lm_eval_retention(cfg, loaded) if main else None
        dataset, record.data, bad_tally = build_data(cfg, loaded)
        stop_on_bad_data(record.data)
        require_trainable_samples(cfg, plan, dataset)
        wandb_run = start_tracking(cfg, composed, run_dir) if main else None
        trainer = make_trainer(cfg, args, loaded, dataset, bad_tally, composed)
        record.determinism = determinism_record(cfg, args)
        trained = train_cell(cfg, trainer, args, loaded, resume)
        if (step := trained.stopped_at) is not None:
            record.status, record.interrupted_at_step = "interrupted", step
            raise Interrupted(f"stopped by SIGTERM at step {step}; checkpoint {args.output_dir}/checkpoint-{step} "
                              "is complete: run again with train.resume=auto to continue")
        record.trained = trained
        if trainer.data_order is not None:
            record.data_order = _write_data_order(trainer, run_dir)
        trainer.save_model(str(run_dir / "final"))  # every rank: ZeRO-3 gathers before rank 0 writes
        if not main:
            return summary_of(record)
        record.artifacts = export_artifacts(cfg, trainer, loaded, run_dir)
        record.eval = evaluate(cfg, trainer, loaded.processor, run_dir, wandb_run, retention, lm_eval_probe)
        record.status = "completed"
        return summary_of(record)
    except Exception as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if main:
            summary = summary_of(record)
            write_json_atomic(run_dir / "summary.json", summary)
            finish_wandb(wandb_run, summary)


def summary_of(r: RunRecord) -> dict:
    """summary.json: the run's identity, then the section of every step that finished, in the steps' order."""
    summary = {"status": r.status, "run_dir": str(r.run_dir), "config_hash": r.config_hash, "seed": r.seed,
               "cell": r.cell, "world_size": r.world_size}
    if r.loaded is not None:
        summary.update(params=r.loaded.table, plan=r.loaded.plan.to_dict(), lineage=r.loaded.lineage)
    if r.data is not None:
        summary["data"] = r.data
    if r.determinism is not None:
        summary["determinism"] = r.determinism
    if r.interrupted_at_step is not None:
        summary["interrupted_at_step"] = r.interrupted_at_step
    if r.trained is not None:
        failures = r.trained.encode_failures
        # every bad record of the run once: what the scan found plus what only encoding found
        summary["data"] = {**r.data, **failures,
                           "bad_total": r.data["bad"] + sum(failures["bad_at_encode"].values())}
        summary["train"] = r.trained.section if r.data_order is None else {**r.trained.section,
                                                                            "data_order": r.data_order}
    for key in ("artifacts", "eval", "error"):
        if getattr(r, key) is not None:
            summary[key] = getattr(r, key)
    return summary


# --- the steps of `run`, in order -------------------------------------------------------------------


def open_run_dir(cfg: RunConfig, run_dir: Path, composed: dict | None) -> RunConfig:
    """Rank 0 creates the run directory (with the composed config when called in-process, not through
    Hydra); the other ranks write nothing there and show no progress bars."""
    if not dist.is_main():
        return replace(cfg, train=replace(cfg.train, progress=False))
    run_dir.mkdir(parents=True, exist_ok=True)
    hydra_config = run_dir / ".hydra" / "config.yaml"
    if composed is not None and not hydra_config.exists():
        hydra_config.parent.mkdir(exist_ok=True)
        OmegaConf.save(OmegaConf.create(composed), hydra_config)
    return cfg


def learning_hash(composed: dict | None) -> str | None:
    """The hash a finished cell is found by. Logging settings do not change what a cell learns: turning
    W&B on does not rerun a finished sweep."""
    return config_hash(learning_config(composed)) if composed is not None else None


def validate_cell(cfg: RunConfig, overrides: list[str]) -> None:
    """Every cross-field rule, and the benchmark and retention files: a broken one fails now, not after training."""
    validate(cfg, overrides)
    check_benchmark_files(cfg.eval)
    if cfg.eval.retention.enabled and cfg.eval.retention.data:
        read_retention_file(cfg.eval.retention.data, cfg.eval.retention.max_items)  # encoding is checked once loaded
    if cfg.eval.retention.enabled and cfg.eval.retention.lm_eval_tasks:
        from vlmablate.eval.lm_eval_retention import check_tasks  # lm-eval is an optional extra

        check_tasks(list(cfg.eval.retention.lm_eval_tasks), cfg.eval.retention.lm_eval_include_path)


def plan_of(cfg: RunConfig) -> FreezePlan:
    """What trains, and at which learning rate, from the vision, projector, freeze, quant and stage groups."""
    return resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage, lr_scale=cfg.train.lr_scale)


def find_stage1(cfg: RunConfig, overrides: list[str]) -> tuple[str | None, dict | None]:
    """The projector this cell starts from, and the stage-1 run that made it when `auto` found or trained one."""
    path = cfg.model.pretrained_projector
    if path != AUTO:
        return path, None
    if not cfg.stage.requires_pretrained_projector:  # only a stage that starts from stage-1 weights looks for them
        return None, None
    stage1 = ensure_stage1(list(overrides), cfg.model.stage1_data, cache_root(cfg.data.cache_dir), run=run)
    return stage1["projector"], stage1


def load_cell(cfg: RunConfig, model_cfg: ModelConfig, plan: FreezePlan, projector_path: str | None,
              stage1: dict | None) -> LoadedCell:
    """The model with its stage-1 projector and its plan applied; the per-component table logged."""
    model, processor, lineage = load_cell_model(cfg, model_cfg, plan, projector_path)
    flop_shapes, no_flops = model_shapes(model)  # before Trainer hands the model to DDP / DeepSpeed / FSDP
    table = parameter_table(model, plan)
    log.info("freeze plan (stage=%s, quant=%s):\n%s", cfg.stage.name, cfg.quant.mode, format_table(table, plan))
    return LoadedCell(model=model, processor=processor, plan=plan, table=table, lineage={**lineage, "stage1": stage1},
                      flop_shapes=flop_shapes, no_flops=no_flops)


def build_data(cfg: RunConfig, loaded: LoadedCell) -> tuple[MixedDataset, dict, BadRecordTally]:
    """The training data, its report for the summary, and the tally of its bad records that training goes on
    with; with the LLM frozen, its image samples only."""
    dataset = build_dataset(cfg.data, processor=loaded.processor, template=cfg.stage.template,
                            max_length=cfg.model.max_length, image_aspect=image_aspect_of(cfg),
                            cache_dir=cache_root(cfg.data.cache_dir), image_size=image_size_of(loaded.processor),
                            image_tokens=image_tokens_of(loaded.model), world=cfg.world, progress=cfg.train.progress)
    report, tally = _data_report(dataset, cfg)
    if not loaded.plan.llm.trainable:
        # Nothing a text-only sample passes through trains (the vision tower and the projector only
        # see images): such a batch has no gradient at all, so those samples are left out.
        report["text_only_left_out"] = dropped = dataset.keep_images_only()
        report["records_in_mix"] = len(dataset)
        if dropped:
            log.info("LLM frozen: %d text-only samples left out (no trainable parameter sees them)", dropped)
    return dataset, report, tally


def stop_on_bad_data(report: dict) -> None:
    """Stop before the first step when the scan and the preflight already found more bad records than the
    policy allows (the verdict `vlmablate.data.check` gives on the same counts)."""
    verdict = report["verdict"]
    if verdict["stops"]:
        raise DataError(f"data preflight: {verdict['why']}", "too_many_bad_records")


def require_trainable_samples(cfg: RunConfig, plan: FreezePlan, dataset: MixedDataset) -> None:
    """A frozen LLM on data without images would train nothing: fail before training starts."""
    if not plan.llm.trainable and len(dataset) == 0:
        raise DataError(f"data={cfg.data.name} has no image samples, and with the LLM frozen only image "
                        "samples reach a trainable parameter")


def start_tracking(cfg: RunConfig, composed: dict | None, run_dir: Path):
    """Rank 0's W&B run, tagged with the cell's choices (None with logger=none)."""
    return start_wandb(cfg.logger, flat_config(composed or {}), run_dir=run_dir, job_type=cfg.stage.name,
                       tags=[f"stage:{cfg.stage.name}", f"freeze:{cfg.freeze.name}", f"vision:{cfg.vision.policy}",
                             f"quant:{cfg.quant.mode}", f"cell:{cfg.cell.name}"])


def make_trainer(cfg: RunConfig, args: TrainingArguments, loaded: LoadedCell, dataset: MixedDataset,
                 bad_tally: BadRecordTally, composed: dict | None) -> VlmTrainer:
    """The Trainer over the loaded cell and its data; its checkpoints carry the config and what trained."""
    if cfg.train.ddp_find_unused_parameters is None:
        args.ddp_find_unused_parameters = find_unused_parameters(loaded.plan, dataset.lengths)
    plan_record = {"config": composed, "plan": loaded.plan.to_dict(), "params": loaded.table,
                   "lineage": loaded.lineage}
    return VlmTrainer(
        model=loaded.model,
        args=args,
        train_dataset=dataset,
        data_collator=LlavaCollator(pad_token_id=loaded.processor.tokenizer.pad_token_id),
        processing_class=loaded.processor,
        plan=loaded.plan,
        plan_record=plan_record,
        sampler=cfg.stage.sampler,
        lengths=dataset.lengths,
        bad_tally=bad_tally,
        record_data_order=cfg.train.record_data_order,
        checkpoint_on_sigterm=cfg.train.checkpoint_on_sigterm,
        labelled_logits_only=cfg.train.labelled_logits_only,
    )


def train_cell(cfg: RunConfig, trainer: VlmTrainer, args: TrainingArguments, loaded: LoadedCell,
               resume: Path | None) -> Trained:
    """Train (from `resume` when given) with the gradient audit attached; report what training did."""
    audit = None
    if not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
        # DeepSpeed and FSDP keep gradients in their own partitions: `p.grad` tells nothing there.
        audit = GradientAudit(step_had_images=lambda: trainer.timer.images_in_step > 0)
        trainer.add_callback(audit)
    peak = device_peak(cfg.train.peak_tflops, args.device, cache_root(cfg.data.cache_dir)) if dist.is_main() else None
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall = time.perf_counter() - start
    if trainer.sigterm is not None and trainer.sigterm.stopped_at is not None:
        return Trained(stopped_at=trainer.sigterm.stopped_at)
    section = _train_summary(trainer, output.metrics, wall, flop_shapes=loaded.flop_shapes, peak=peak,
                             no_flops=loaded.no_flops)
    failures = {key: section.pop(key) for key in ("bad_at_encode", "bad_at_encode_examples")}
    section["resumed_from"] = str(resume) if resume else None
    section["gradient_audit"] = audit.report if audit else {
        "skipped": "DeepSpeed / FSDP hold gradients in their own partitions"}
    return Trained(section=section, encode_failures=failures)


def export_artifacts(cfg: RunConfig, trainer: VlmTrainer, loaded: LoadedCell, run_dir: Path) -> dict:
    """Where the saved weights are (rank 0), after exporting a merged model when LoRA trained and it is asked for."""
    artifacts = trainer.saved_artifacts
    if cfg.train.export_merged and loaded.plan.uses_lora:
        artifacts["merged"] = export_merged(loaded.lineage["checkpoint"], run_dir / "final" / "merged",
                                            run_dir / "final")
    return {"checkpoint": str(run_dir / "final"), "projector": artifacts.get("projector"), **artifacts}


def start_retention(cfg: RunConfig, loaded: LoadedCell) -> RetentionProbe | None:
    """The base's losses on the retention set (eval/retention.py), read from the model as loaded, before any
    training step; None where retention is off, or the weights are sharded over ranks (rank 0 alone cannot
    run a forward then)."""
    if dist.is_distributed() and (is_deepspeed_zero3_enabled() or cfg.train.fsdp):
        return None
    rset = retention_set(cfg.eval.retention, loaded.processor, tiny_world=cfg.model.source == "tiny_world",
                         max_length=cfg.eval.retention.max_length or cfg.model.max_length)
    if rset is None:
        return None
    identity = checkpoint_identity(loaded.lineage["checkpoint"], arch=loaded.lineage["arch"], quant=cfg.quant.mode,
                                   dtype=str(compute_dtype(cfg)), torch_dtype=cfg.model.torch_dtype)
    tok = loaded.processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    probe = RetentionProbe.start(rset, loaded.model, pad_id=pad_id, batch_size=cfg.eval.retention.batch_size,
                                 identity=identity, cache_dir=cache_root(cfg.data.cache_dir))
    if cfg.model.source == "tiny_world" and cfg.eval.retention.reading_per_kind:  # the LM's own pretrained skill
        from vlmablate.world.components import components_config, ensure_components

        probe.reading = ReadingProbe.start(loaded.model, tok, ensure_components(cfg.world),
                                           components_config(cfg.world),
                                           per_kind=cfg.eval.retention.reading_per_kind, identity=identity,
                                           cache_dir=cache_root(cfg.data.cache_dir))
    return probe


def start_lm_eval_retention(cfg: RunConfig, loaded: LoadedCell):
    """The base's lm-eval results on `eval.retention.lm_eval_tasks` (eval/lm_eval_retention.py), before any
    training step; None where none are named, retention is off, or the weights are sharded over ranks."""
    ret = cfg.eval.retention
    if not (ret.enabled and ret.lm_eval_tasks) or (dist.is_distributed() and (is_deepspeed_zero3_enabled()
                                                                             or cfg.train.fsdp)):
        return None
    from vlmablate.eval.lm_eval_retention import LmEvalProbe  # lm-eval is an optional extra

    identity = checkpoint_identity(loaded.lineage["checkpoint"], arch=loaded.lineage["arch"], quant=cfg.quant.mode,
                                   dtype=str(compute_dtype(cfg)), torch_dtype=cfg.model.torch_dtype)
    return LmEvalProbe.start(loaded.model, loaded.processor.tokenizer, ret, identity=identity,
                             cache_dir=cache_root(cfg.data.cache_dir))


def evaluate(cfg: RunConfig, trainer: VlmTrainer, processor, run_dir: Path, wandb_run,
             retention: RetentionProbe | None = None, lm_eval_probe=None) -> dict:
    """Rank 0 evaluates the trained model (and its retention, where `start_retention` scored the base, and its
    lm-eval tasks, where `start_lm_eval_retention` ran them on the base); with its weights sharded over ranks it
    says how to evaluate later."""
    if cfg.eval.name != "none" and dist.is_distributed() and (is_deepspeed_zero3_enabled() or trainer.is_fsdp_enabled):
        # The weights are sharded over the ranks, and every forward needs all of them: rank 0 alone
        # cannot evaluate. The saved run is evaluated in one process afterwards.
        skipped = {"skipped": f"weights sharded over {dist.world_size()} ranks; evaluate the saved run "
                              f"with: python -m vlmablate.eval run_dir={run_dir} eval={cfg.eval.name}"}
        log.warning("evaluation skipped: %s", skipped["skipped"])
        return skipped
    results, samples = run_eval(cfg.eval, trainer.model, processor, run_dir / "eval", world=cfg.world,
                                progress=cfg.train.progress)
    log_predictions(wandb_run, samples, cfg.eval.wandb_samples)
    if retention is not None:
        results["retention"] = retention.measure(trainer.model, run_dir / "eval" / "retention", n_boot=cfg.eval.n_boot)
    if lm_eval_probe is not None:
        results.setdefault("retention", {})["lm_eval"] = lm_eval_probe.measure(
            trainer.model, run_dir / "eval" / "retention", n_boot=cfg.eval.n_boot)
    return results


class Interrupted(RuntimeError):
    """Training stopped on SIGTERM after writing a complete checkpoint (the summary says `interrupted`)."""


def export_fsdp_wrap_classes(cfg: RunConfig) -> None:
    """PEFT's FSDP wrap policy reads the layer classes from FSDP_TRANSFORMER_CLS_TO_WRAP, which
    `accelerate launch` sets from its config and torchrun does not: set it from the preset."""
    classes = (cfg.train.fsdp_config or {}).get("transformer_layer_cls_to_wrap")
    if cfg.train.fsdp and classes and "FSDP_TRANSFORMER_CLS_TO_WRAP" not in os.environ:
        os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = ",".join([classes] if isinstance(classes, str) else classes)


def find_unused_parameters(plan: FreezePlan, lengths: list[int]) -> bool:
    """Whether DDP must look for trainable parameters a step leaves out of its graph.

    Parameters past `vision_feature_layer` are frozen by the plan (they never reach the output), so
    the only gap is a text-only micro-batch, which skips the vision tower and the projector. Looking
    costs a graph traversal per step, so it is on only when the data has text-only samples and a
    vision-side component trains.
    """
    vision_side_trains = plan.projector.trainable or plan.vision.trainable
    return vision_side_trains and any(n < 0 for n in lengths)


def determinism_record(cfg: RunConfig, args: TrainingArguments) -> dict:
    """The seed and the settings that make a run repeatable, as they stand once Trainer applied them."""
    return {
        "seed": args.seed,
        "data_seed": cfg.data.seed,
        "train.deterministic": cfg.train.deterministic,
        "torch.use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "CUDA_LAUNCH_BLOCKING": os.environ.get("CUDA_LAUNCH_BLOCKING"),  # set by full determinism: slow on GPUs
        "device": str(args.device),
        "world_size": args.world_size,
    }


def _write_data_order(trainer: VlmTrainer, run_dir: Path) -> dict:
    """Every rank's records per optimizer step, merged into `data_order.json` (rank 0); its digest for the summary."""
    merged: dict[int, list[int]] = {}
    for part in dist.gather(trainer.data_order):
        for step, indices in part.items():
            merged.setdefault(int(step), []).extend(indices)
    order = {str(step): sorted(merged[step]) for step in sorted(merged)}
    text = json.dumps(order)
    if dist.is_main():
        (run_dir / "data_order.json").write_text(text)
    records = [i for v in order.values() for i in v]
    return {"steps": len(order), "records": len(records), "distinct": len(set(records)),
            "sha256": hashlib.sha256(text.encode()).hexdigest()}


def completed_summary(run_dir: Path, digest: str | None) -> dict | None:
    """The run's summary if it completed with the config of hash `digest` (None: not done, or another config)."""
    path = run_dir / "summary.json"
    if digest is None or not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:  # written atomically, so this is a file from elsewhere: run again
        return None
    return summary if summary.get("status") == "completed" and summary.get("config_hash") == digest else None


def _train_summary(trainer: VlmTrainer, metrics: dict, wall: float, *, flop_shapes=None, peak: Peak | None = None,
                   no_flops: str | None = None) -> dict:
    """What training did, summed over the ranks (each counts its own micro-batches).

    Rates (tokens/s, TFLOP/s) divide what this train() call trained by its training time: after a resume,
    the tokens of the earlier attempts are in `tokens` but not in the rate.
    """
    curve = [[e["step"], round(e["loss"], 5)] for e in trainer.state.log_history if "loss" in e]
    losses = [loss for _, loss in curve]
    training_s = trainer.timer.seconds or wall
    parts = dist.gather(trainer.progress())
    tokens, padded = sum(p["real_tokens"] for p in parts), sum(p["padded_tokens"] for p in parts)
    trained_now = tokens - sum(dist.gather(trainer.resumed_tokens))
    shapes = sum(dist.gather(trainer.sample_shapes), Counter())
    bad_records = {ref: reason for p in parts for ref, reason in p["bad_records"].items()}  # a record once
    steps = trainer.state.global_step
    return {
        "steps": steps,
        "wall_clock_s": round(wall, 3),  # the whole trainer.train() call, set-up and checkpoints included
        "setup_s": round(wall - training_s, 3),  # set-up before the first step and the last checkpoint after the last
        "tokens": tokens,
        "tokens_per_s": round(trained_now / training_s, 2) if training_s > 0 else 0.0,
        # model FLOPs per real token, achieved TFLOP/s, the device's peak and their ratio (train/mfu.py)
        **mfu_report(flop_shapes, shapes, training_s, peak, dist.world_size(), why_not=no_flops),
        "padding_efficiency": round(tokens / padded, 4) if padded else None,
        "peak_mem_mb": round(peak_memory_mb(), 1),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        # Over the whole run, also across a resume (Trainer's own metric covers the last train() call only).
        "train_loss": trainer._total_loss_scalar / steps if steps else metrics.get("train_loss"),
        "samples_seen": sum(p["samples_seen"] for p in parts),
        "fully_masked_samples": sum(p["fully_masked_samples"] for p in parts),
        "bad_at_encode": dict(sorted(Counter(bad_records.values()).items())),
        "bad_at_encode_examples": sorted(bad_records)[:10],
        "loss_curve": curve,  # (step, mean loss over the logging window ending there)
    }


def run_from_hydra(cfg: DictConfig) -> float | None:
    """The Hydra entry point's one call: typed config once at the edge, then `run`."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    dist.quiet_replica_logging()
    composed = OmegaConf.to_container(cfg, resolve=True)
    run_cfg = to_run_config(cfg)
    # Under torchrun each rank's Hydra stamped its own directory: all follow rank 0's. TrainingArguments
    # creates the process group (as Trainer would: gloo on CPU, NCCL on CUDA, DeepSpeed's own init).
    run_dir = dist.agree_on_run_dir(Path(hydra_cfg.runtime.output_dir),
                                    lambda: training_arguments(run_cfg, Path(hydra_cfg.runtime.output_dir)))
    try:
        summary = run(run_cfg, run_dir, composed=composed, overrides=list(hydra_cfg.overrides.task))
    except Interrupted as stop:
        # Preempted: the exit status says so (128 + SIGTERM), so a scheduler can requeue the job.
        log.warning("%s", stop)
        raise SystemExit(143) from stop
    except Exception:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise
        # One failed cell (out of memory, bad data) must not stop the sweep: its summary says
        # failed, the report shows it, and the next invocation runs it again.
        log.exception("cell %s failed; the sweep goes on", run_dir)
        return None
    if summary.get("status") != "completed" or not dist.is_main():
        return None
    train, mmbench = summary["train"], summary["eval"].get("mmbench")
    log.info("what trained:\n%s", format_table(summary["params"], plan_of(run_cfg)))
    log.info("done: %d steps in %.1f s, loss %.3f -> %.3f, %.0f tokens/s, %s TFLOP/s, MFU %s", train["steps"],
             train["wall_clock_s"], train["first_loss"], train["final_loss"], train["tokens_per_s"], train["tflops"],
             train["mfu"])
    if mmbench:
        log.info("MMBench-style %s accuracy: circular %.3f (95%% CI %.3f-%.3f), vanilla %.3f", mmbench["mode"],
                 mmbench["circular_acc"], *mmbench["circular_ci"], mmbench["vanilla_acc"])
    log.info("run directory: %s (summary.json, final/, eval/)", run_dir)
    return mmbench["circular_acc"] if mmbench else train["final_loss"]
