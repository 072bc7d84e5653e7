"""The gradient audit: after the first optimizer step, did the plan hold?

Users of other tools cannot tell whether the projector trains, whether "unfrozen" vision gets any
gradient (a `no_grad` forward), or whether LoRA plus freeze flags silently became full
fine-tuning. This callback checks it once, on the first optimizer step: every trainable parameter
has a gradient, no frozen one has one, and no frozen weight changed.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)


class PlanViolation(RuntimeError):
    """Training does not do what the freeze plan says."""


def _fingerprint(t: torch.Tensor) -> tuple[float, float]:
    data = t.detach().float()
    return float(data.sum()), float(data.abs().sum())


class GradientAudit(TrainerCallback):
    def __init__(self, max_names: int = 8):
        self.max_names = max_names
        self.frozen: dict[str, tuple[float, float]] = {}
        self.done = False
        self.report: dict = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # A fingerprint (sum, sum of |x|) instead of a copy: a 7B model has no room for a second one.
        self.frozen = {n: _fingerprint(p) for n, p in model.named_parameters() if not p.requires_grad}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.done or state.global_step != 0:
            return
        no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        if no_grad:
            raise PlanViolation(
                f"{len(no_grad)} trainable parameters received no gradient on the first step (the forward "
                f"never used them, or ran under no_grad): {self._names(no_grad)}"
            )
        if frozen_with_grad:
            raise PlanViolation(f"frozen parameters received gradients: {self._names(frozen_with_grad)}")

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.done:
            return
        changed = [n for n, p in model.named_parameters() if n in self.frozen and _fingerprint(p) != self.frozen[n]]
        if changed:
            raise PlanViolation(f"frozen parameters changed in the first optimizer step: {self._names(changed)}")
        n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
        self.report = {"checked_step": 1, "trainable_tensors_with_grad": n_trainable, "frozen_tensors_unchanged": len(self.frozen)}
        log.info("gradient audit passed: %d trainable tensors got gradients, %d frozen tensors unchanged",
                 n_trainable, len(self.frozen))
        self.frozen = {}
        self.done = True

    def _names(self, names: list[str]) -> str:
        shown = ", ".join(names[: self.max_names])
        return shown + (f" ... (+{len(names) - self.max_names} more)" if len(names) > self.max_names else "")
