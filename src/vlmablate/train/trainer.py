"""`VlmTrainer`: HF Trainer with per-component optimizer groups, selective saving and token counts.

This is LLaVA's own approach (a Trainer subclass), with the groups and the saved artifacts taken
from the resolved `FreezePlan` instead of from flags scattered across scripts.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import contextmanager

import torch
from transformers import Trainer, TrainerCallback

from vlmablate.data.errors import DataError
from vlmablate.data.sampler import RankBatchSampler
from vlmablate.data.templates import IGNORE_INDEX
from vlmablate.model.plan import FreezePlan
from vlmablate.train.artifacts import save_artifacts
from vlmablate.train.optim import parameter_groups

log = logging.getLogger(__name__)


class TrainTimer(TrainerCallback):
    """Step bookkeeping: when training proper starts and ends (after Trainer's one-time set-up of
    loaders and optimizer), whether the current step saw an image, and a log line for the last step."""

    def __init__(self):
        self.start = self.end = None
        self.images_in_step = 0  # image samples in the current optimizer step's micro-batches

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.images_in_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        # Log the last step whatever logging_steps says: the final loss must be measured, not the
        # one of the last multiple of logging_steps.
        if state.global_step == state.max_steps:
            control.should_log = True

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        return (self.end - self.start) if self.start is not None and self.end is not None else 0.0


@contextmanager
def _frozen_quantized_llm_allowed(model, plan: FreezePlan):
    """Let Trainer take a quantized model whose trainable parameters are all full precision.

    Trainer refuses a quantized model without PEFT adapters, assuming its trainable weights would be
    quantized ones. The seed's first cell on a 4090 (4-bit LLM frozen, projector trained) is exactly
    the case it misjudges: what trains is on bitsandbytes' skip list. That is checked here, parameter
    by parameter, and only then is Trainer's own check passed over.
    """
    if model is None or plan.quant == "none" or plan.uses_lora:
        yield
        return
    quantized = [n for n, p in model.named_parameters() if p.requires_grad and type(p).__name__ in
                 ("Params4bit", "Int8Params")]
    if quantized:
        raise ValueError(f"quantized parameters are marked trainable: {quantized[:5]}")
    import transformers.trainer as trainer_module

    check = trainer_module.validate_quantization_for_training
    trainer_module.validate_quantization_for_training = lambda model: None
    try:
        yield
    finally:
        trainer_module.validate_quantization_for_training = check


class VlmTrainer(Trainer):
    def __init__(self, *args, plan: FreezePlan, plan_record: dict, sampler: str = "random",
                 lengths: list[int] | None = None, bad_budget: tuple[int, int, float] | None = None, **kwargs):
        with _frozen_quantized_llm_allowed(kwargs.get("model"), plan):
            super().__init__(*args, **kwargs)
        self.sampler_kind = sampler
        self.lengths = lengths  # LLaVA's modality lengths: > 0 with an image, < 0 text-only
        # (records, bad records found by the scan, data.max_bad_fraction): encoding failures add to it
        self.bad_budget = bad_budget
        self.bad_at_encode: Counter = Counter()
        self.timer = TrainTimer()
        self.add_callback(self.timer)
        self.plan = plan
        self.plan_record = plan_record
        self.real_tokens = 0  # non-padding tokens seen in training forwards (image tokens included)
        self.padded_tokens = 0
        self.fully_masked_samples = 0
        self.samples_seen = 0

    # --- sampling ----------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = self.lengths if self.lengths is not None else [1] * len(dataset)
        if self.sampler_kind != "random" and self.lengths is None:
            raise ValueError(f"stage.sampler={self.sampler_kind} needs per-record lengths")
        # One rank-aware batch sampler for every kind: each record exactly once per epoch across ranks.
        # As LLaVA, one grouping megabatch covers every rank's micro-batches of one optimizer step.
        return RankBatchSampler(lengths, kind=self.sampler_kind, batch_size=self.args.per_device_train_batch_size,
                                num_replicas=self.args.world_size, rank=self.args.process_index,
                                grad_accum=self.args.gradient_accumulation_steps, seed=self.args.seed)

    # --- optimizer -------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        groups = parameter_groups(opt_model, self.plan, decay_names=set(self.get_decay_parameter_names(opt_model)),
                                  weight_decay=self.args.weight_decay)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("lr", None)  # each group carries its component's learning rate
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        for g in self.optimizer.param_groups:
            log.info("optimizer group %-20s lr=%.2e weight_decay=%.3g tensors=%d", g["name"], g["lr"],
                     g["weight_decay"], len(g["params"]))
        return self.optimizer

    def log(self, logs: dict, *args, **kwargs) -> None:
        # Trainer logs only the first group's LR; a per-component LR tells the stages apart in W&B.
        if self.optimizer is not None and "loss" in logs:
            for g in self.optimizer.param_groups:  # decay and no_decay groups share their component's LR
                logs[f"lr/{g['name'].split('/')[0]}"] = g["lr"]
        super().log(logs, *args, **kwargs)

    # --- loss and counting -----------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        bad = inputs.pop("bad_samples", None)
        if bad:
            self._count_bad(bad)
        if model.training:
            labels = inputs["labels"]
            self.real_tokens += int(inputs["attention_mask"].sum())
            self.padded_tokens += inputs["attention_mask"].numel()
            self.timer.images_in_step += int("pixel_values" in inputs)
            self.samples_seen += labels.shape[0]
            self.fully_masked_samples += int((labels == IGNORE_INDEX).all(dim=1).sum())
            self._check_masking()
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _count_bad(self, reasons: list[str]) -> None:
        """Records skipped while encoding (data.on_bad_sample=skip): counted, and held to max_bad_fraction."""
        self.bad_at_encode.update(reasons)
        if self.bad_budget is not None:
            records, scanned_bad, limit = self.bad_budget
            bad = scanned_bad + sum(self.bad_at_encode.values())
            if records and bad / records > limit:
                raise DataError(f"{bad} of {records} records are bad ({bad / records:.2%}; found while encoding: "
                                f"{dict(self.bad_at_encode)}), more than data.max_bad_fraction={limit:.2%}")

    def _check_masking(self, min_samples: int = 16) -> None:
        """Stop a run that mostly trains on samples without one labelled token (a silent loss of 0)."""
        if self.samples_seen >= min_samples and self.fully_masked_samples * 2 > self.samples_seen:
            raise DataError(
                f"{self.fully_masked_samples} of {self.samples_seen} training samples had every label masked: "
                "the loss teaches nothing. Check the stage's template against the tokenizer and model.max_length."
            )

    # --- saving ----------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints keep what the plan trains (see `artifacts.py`), not a copy of frozen weights."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_artifacts(self.model, self.plan, output_dir, processor=self.processing_class,
                       plan_record=self.plan_record)
        torch.save(self.args, f"{output_dir}/training_args.bin")
