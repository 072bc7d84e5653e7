"""`VlmTrainer`: HF Trainer with per-component optimizer groups, selective saving and token counts.

This is LLaVA's own approach (a Trainer subclass), with the groups and the saved artifacts taken
from the resolved `FreezePlan` instead of from flags scattered across scripts.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from vlmablate.data.errors import DataError
from vlmablate.data.sampler import RankBatchSampler
from vlmablate.data.templates import IGNORE_INDEX
from vlmablate.data.verdict import BadRecordTally
from vlmablate.model.plan import FreezePlan, unwrap
from vlmablate.train import checkpoints
from vlmablate.train import distributed as dist
from vlmablate.train.artifacts import load_artifacts, save_artifacts
from vlmablate.train.loss import SUPPORTED as LABELLED_LOGITS_SUPPORTED
from vlmablate.train.loss import with_labelled_logits_only
from vlmablate.train.mfu import sample_shapes
from vlmablate.train.optim import parameter_groups

log = logging.getLogger(__name__)


class TrainTimer(TrainerCallback):
    """Step bookkeeping: when training proper starts and ends, whether the current step saw an image, and
    a log line for the last step.

    Training proper starts after Trainer's one-time set-up of loaders and optimizer, and ends when the
    last step ends: the checkpoint Trainer writes after its last step (26 GiB of weights and optimizer
    states for a fully trained 7B) is not training, and would make a short run's tokens/s and MFU read
    several times too low. Checkpoints written between steps stay inside the time: a run pays for them.
    """

    def __init__(self):
        self.start = self.end = self._last_step_end = None
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
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the last step's kernels belong to training
        self._last_step_end = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.end = self._last_step_end if self._last_step_end is not None else time.perf_counter()

    @property
    def seconds(self) -> float:
        return (self.end - self.start) if self.start is not None and self.end is not None else 0.0


class StopOnSigterm(TrainerCallback):
    """SIGTERM (preemption, `scancel`, `kill`): finish the current step, write a checkpoint, stop.

    The ranks agree at every step end (one all-reduce of a flag), so a signal seen by one rank stops
    them all at the same step. `stopped_at` is the step of that checkpoint.
    """

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None
        self._previous = None

    def _handle(self, signum, frame):
        log.warning("SIGTERM: writing a checkpoint at the end of this step, then stopping")
        self.requested = True

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if dist.any_rank(self.requested, device=args.device):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class _ResumedLoss(TrainerCallback):
    """Put a checkpoint's loss bookkeeping back after Trainer reset its own at the start of train()."""

    def __init__(self, trainer: "VlmTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        loss = self.trainer.loss_state
        if loss is None:
            return
        self.trainer._tr_loss.fill_(loss["window"])
        self.trainer._total_loss_scalar = loss["total"]
        self.trainer._globalstep_last_logged = loss["last_logged"]
        self.trainer.loss_state = None


@contextmanager
def _frozen_quantized_llm_allowed(model, plan: FreezePlan):
    """Let Trainer take a quantized model whose trainable parameters are all full precision.

    Trainer refuses a quantized model without PEFT adapters, assuming its trainable weights would be
    quantized ones. The reference freeze table's first cell on a 4090 (4-bit LLM frozen, projector trained) is exactly
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
                 lengths: list[int] | None = None, bad_tally: BadRecordTally | None = None,
                 record_data_order: bool = False, checkpoint_on_sigterm: bool = True,
                 labelled_logits_only: bool = True, **kwargs):
        with _frozen_quantized_llm_allowed(kwargs.get("model"), plan):
            super().__init__(*args, **kwargs)
        # Rotation happens here, after a checkpoint is marked complete (see checkpoints.py), not in Trainer.
        self.keep_checkpoints = self.args.save_total_limit
        self.args.save_total_limit = None
        self.sigterm = StopOnSigterm() if checkpoint_on_sigterm else None
        if self.sigterm is not None:
            self.add_callback(self.sigterm)
        # optimizer step -> mix positions this rank trained on in it (train.record_data_order): a skipped
        # record's substitute under its own position, so the file holds what was trained
        self.data_order: dict[int, list[int]] | None = {} if record_data_order else None
        self.loss_state: dict | None = None
        self.saved_artifacts: dict[str, str] = {}  # what the last save wrote (rank 0)
        # Named before any engine wraps the model (FSDP flattens or shards the parameters).
        self.trainable_names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        self.add_callback(_ResumedLoss(self))
        self.sampler_kind = sampler
        self.lengths = lengths  # LLaVA's modality lengths: > 0 with an image, < 0 text-only
        # what the scan and the preflight found, judged with each encoding failure of training under the data's
        # policy (data/verdict.py), each bad record once however often it is met
        self.bad_at_encode = bad_tally if bad_tally is not None else BadRecordTally()
        self.timer = TrainTimer()
        self.add_callback(self.timer)
        self.plan = plan
        self.plan_record = plan_record
        self.real_tokens = 0  # non-padding tokens seen in training forwards (image tokens included)
        self.padded_tokens = 0
        self.fully_masked_samples = 0
        self.samples_seen = 0
        # (real tokens, image crops) -> samples trained in this train() call: the FLOPs count (train/mfu.py)
        self.sample_shapes: Counter = Counter()
        self.resumed_tokens = 0  # real_tokens a resumed run starts from (trained by an earlier attempt)
        self._model_config = unwrap(self.model).config
        self.labelled_logits_only = labelled_logits_only  # the LM head only where the loss reads (train/loss.py)

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
        if bad:  # (record_ref, reason) of records skipped while encoding (data.on_bad_sample=skip)
            self.bad_at_encode.add(bad)
        indices = inputs.pop("sample_index", None)
        if model.training:
            if self.data_order is not None and indices is not None:
                self.data_order.setdefault(self.state.global_step + 1, []).extend(indices)
            labels = inputs["labels"]
            shapes = sample_shapes(inputs, self._model_config)
            self.sample_shapes.update(shapes)
            self.real_tokens += sum(length for length, _ in shapes)
            self.padded_tokens += inputs["attention_mask"].numel()
            self.timer.images_in_step += int("pixel_values" in inputs)
            self.samples_seen += labels.shape[0]
            self.fully_masked_samples += int((labels == IGNORE_INDEX).all(dim=1).sum())
            self._check_masking()
            if self._labelled_logits_apply():
                inputs = with_labelled_logits_only(inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _labelled_logits_apply(self) -> bool:
        """Training only: evaluation and `prediction_step` keep the library's full logits. Trainer's own loss
        stays where it replaces the model's (label smoothing, `compute_loss_func`, DeepSpeed sequence
        parallelism), since those read the full logits or shard the sequence."""
        parallel = getattr(self.accelerator, "parallelism_config", None)
        sequence_parallel = parallel is not None and getattr(parallel, "sp_enabled", False)
        return (self.labelled_logits_only and LABELLED_LOGITS_SUPPORTED and self.label_smoother is None
                and self.compute_loss_func is None and not sequence_parallel)

    def _check_masking(self, min_samples: int = 16) -> None:
        """Stop a run that mostly trains on samples without one labelled token (a silent loss of 0)."""
        if self.samples_seen >= min_samples and self.fully_masked_samples * 2 > self.samples_seen:
            raise DataError(
                f"{self.fully_masked_samples} of {self.samples_seen} training samples had every label masked: "
                "the loss teaches nothing. Check the stage's template against the tokenizer and model.max_length."
            )

    # --- progress: what a resumed run must carry on counting ------------------------------------------
    def progress(self) -> dict:
        # Trainer's loss bookkeeping too: the logging window open at the checkpoint continues after a resume,
        # so the loss curve and train_loss come out as if the run had never stopped.
        loss = {"window": self._tr_loss.item(), "total": self._total_loss_scalar,
                "last_logged": self._globalstep_last_logged}
        return {"loss": loss, "real_tokens": self.real_tokens, "padded_tokens": self.padded_tokens,
                "fully_masked_samples": self.fully_masked_samples, "samples_seen": self.samples_seen,
                "bad_records": dict(self.bad_at_encode.reasons),
                "data_order": None if self.data_order is None else {str(k): v for k, v in self.data_order.items()}}

    def _restore_progress(self, progress: dict) -> None:
        self.loss_state = progress["loss"]  # applied once Trainer has set its own up (on_train_begin)
        self.real_tokens = self.resumed_tokens = progress["real_tokens"]
        self.padded_tokens = progress["padded_tokens"]
        self.fully_masked_samples = progress["fully_masked_samples"]
        self.samples_seen = progress["samples_seen"]
        self.bad_at_encode.reasons = dict(progress.get("bad_records", {}))
        if self.data_order is not None and progress["data_order"] is not None:
            self.data_order = {int(k): v for k, v in progress["data_order"].items()}

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        if resume_from_checkpoint is not None:
            self._restore_progress(checkpoints.load_progress(Path(resume_from_checkpoint), self.args.process_index))
            log.info("resuming from %s (step %s)", resume_from_checkpoint,
                     checkpoints.step_of(Path(resume_from_checkpoint)))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The plan's artifacts back into the model (DeepSpeed and FSDP restore their own engine state)."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_artifacts(self.model, self.plan, resume_from_checkpoint)

    # --- saving ----------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        folder = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        checkpoints.save_progress(folder, self.args.process_index, self.progress())
        dist.barrier()  # every rank's RNG state and progress are on disk before the mark
        if self.args.should_save:
            checkpoints.mark_complete(folder, self.state.global_step)
            checkpoints.rotate(folder.parent, self.keep_checkpoints)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not is_deepspeed_zero3_enabled():
            return super().save_model(output_dir, _internal_call)
        # ZeRO-3 partitions every parameter (shape [0] on each rank): gather what the plan trains on all
        # ranks (small: projector, LoRA; the whole model for a full fine-tune), then rank 0 writes it.
        import deepspeed

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            self._save(output_dir)
        dist.barrier()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints keep what the plan trains (see `artifacts.py`), not a copy of frozen weights."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        # Under FSDP Trainer passes the gathered full state dict (the parameters themselves are shards).
        model = self.accelerator.unwrap_model(self.model) if state_dict is not None else self.model
        self.saved_artifacts = save_artifacts(model, self.plan, output_dir, processor=self.processing_class,
                                              plan_record=self.plan_record, state_dict=state_dict,
                                              trainable=self.trainable_names)
        if Path(output_dir).parent == Path(self.args.output_dir):  # a checkpoint; final/ keeps the artifacts only
            torch.save(self.args, f"{output_dir}/training_args.bin")
