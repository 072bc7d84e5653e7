"""The gradient audit: on the first optimizer step, did the plan hold?

Users of other tools cannot tell whether the projector trains, whether "unfrozen" vision gets any
gradient (a `no_grad` forward), or whether LoRA plus freeze flags silently became full
fine-tuning. This callback checks it on the first optimizer step: every trainable parameter has a
gradient, no frozen one has one, and no frozen weight changed.

A step whose batches held no image (modality grouping makes whole batches text-only) cannot
reach the vision tower or the projector; for those two the check waits for the first step with an
image, while everything else is checked at once.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from transformers import TrainerCallback

from vlmablate.model.plan import component_of

log = logging.getLogger(__name__)

_IMAGE_PATH = ("vision", "projector")


class PlanViolation(RuntimeError):
    """Training does not do what the freeze plan says."""


def _fingerprint(t: torch.Tensor) -> tuple[float, float]:
    data = t.detach().float()
    return float(data.sum()), float(data.abs().sum())


class GradientAudit(TrainerCallback):
    def __init__(self, step_had_images: Callable[[], bool] = lambda: True, max_names: int = 8):
        self.step_had_images = step_had_images
        self.max_names = max_names
        self.frozen: dict[str, tuple[float, float]] = {}
        self.done = False
        self.checked_everything = False
        self.report: dict = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # A fingerprint (sum, sum of |x|) instead of a copy: a 7B model has no room for a second one.
        self.frozen = {n: _fingerprint(p) for n, p in model.named_parameters() if not p.requires_grad}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.done:
            return
        images = self.step_had_images()
        waived = (lambda name: component_of(name) in _IMAGE_PATH) if not images else (lambda name: False)
        if state.global_step > 0:  # after the first step only the image path is still unchecked
            checked = lambda name: component_of(name) in _IMAGE_PATH  # noqa: E731
        else:
            checked = lambda name: True  # noqa: E731
        no_grad = [n for n, p in model.named_parameters()
                   if p.requires_grad and p.grad is None and checked(n) and not waived(n)]
        frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        if no_grad:
            raise PlanViolation(
                f"{len(no_grad)} trainable parameters received no gradient on step {state.global_step + 1} (the "
                f"forward never used them, or ran under no_grad): {self._names(no_grad)}"
            )
        if frozen_with_grad:
            raise PlanViolation(f"frozen parameters received gradients: {self._names(frozen_with_grad)}")
        self.checked_everything = images

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.done:
            return
        changed = [n for n, p in model.named_parameters() if n in self.frozen and _fingerprint(p) != self.frozen[n]]
        if changed:
            raise PlanViolation(f"frozen parameters changed in an optimizer step: {self._names(changed)}")
        if not self.checked_everything:
            return  # a text-only step: the image path is checked on the first step with an image
        n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
        self.report = {"checked_step": state.global_step + 1, "trainable_tensors_with_grad": n_trainable,
                       "frozen_tensors_unchanged": len(self.frozen)}
        log.info("gradient audit passed on step %d: %d trainable tensors got gradients, %d frozen tensors unchanged",
                 state.global_step + 1, n_trainable, len(self.frozen))
        self.frozen = {}
        self.done = True

    def on_train_end(self, args, state, control, **kwargs):
        if not self.done:
            log.warning("gradient audit incomplete: no training step had an image, so the vision tower and the "
                        "projector were never checked")
            self.report = {"checked_step": None, "unchecked": list(_IMAGE_PATH)}

    def _names(self, names: list[str]) -> str:
        shown = ", ".join(names[: self.max_names])
        return shown + (f" ... (+{len(names) - self.max_names} more)" if len(names) > self.max_names else "")
