"""The LM head on the labelled positions only (`train.labelled_logits_only`) against the full logits: peak memory
of a training step and the runner's tokens/s, side by side, in one run.

    python benchmarks/labelled_logits.py [--shapes world big big_vocab32k] [--repeats 3] [--memory-only]

Shapes (`shapes.training_overrides`, as runner_overhead.py): `world` is the default cell on the tiny world's
instruct data, batch 16; `big` is `shapes.BIG`, batch 2 on ~600-token image conversations (256 image tokens).
Both use the tiny tokenizer's 600-token vocabulary, so their logits are small beside the rest of a step.
`big_vocab32k` is `big` with the embeddings and LM head resized to 32,064 rows (LLaVA-1.6 Mistral's
vocabulary), where the logits weigh as they do on a real model; memory only (the runner loads its own model).

Memory: one training step (forward and backward of the cell's trainable parameters, on the runner's first
batch) under torch's `MemTracker`, which counts every live tensor's bytes as it is allocated and freed, as
`torch.cuda.max_memory_allocated` does on a GPU: its peak over the step, and that peak above what was live
before the step (the weights). The step is what `VlmTrainer.compute_loss` hands the model: the batch, or the
batch with `logits_to_keep` and `shift_labels` (`train/loss.py`).

Speed: tokens/s from `summary.json` of the whole runner, the setting on and off, runs alternating, medians
compared. Target: on / off >= 1.0 on `world` and `big`.

Beside them: `python -m vlmablate.plan`'s logits term and total for llava16_mistral_7b, nf4, rtx4090_qlora, on
and off.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import weakref
from pathlib import Path

import torch
from shapes import compose_run, training_overrides
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader

from vlmablate.config import cache_root
from vlmablate.data.collator import LlavaCollator
from vlmablate.data.sampler import RankBatchSampler
from vlmablate.data.sources import build_dataset
from vlmablate.model.plan import resolve_plan, unwrap
from vlmablate.train import runner
from vlmablate.train.loss import with_labelled_logits_only

MIB = 2**20
STEPS = {"world": 40, "big": 8}
VOCAB_32K = 32_064
SHAPE_OF = {"world": "world", "big": "big", "big_vocab32k": "big"}


def first_batch(shape: str):
    """(model, batch): the cell's model as the runner loads it, and its first training batch."""
    cfg, _ = compose_run(training_overrides(SHAPE_OF[shape]))
    torch.manual_seed(cfg.train.seed)
    plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage, lr_scale=cfg.train.lr_scale)
    model, processor, _ = runner.load_cell_model(cfg, runner.prepare_model(cfg, plan), plan, None)
    if shape == "big_vocab32k":
        base = unwrap(model)
        trainable = base.lm_head.weight.requires_grad
        base.resize_token_embeddings(VOCAB_32K, mean_resizing=False)
        base.lm_head.weight.requires_grad_(trainable)
    dataset = build_dataset(cfg.data, processor=processor, template=cfg.stage.template,
                            max_length=cfg.model.max_length, image_aspect=runner.image_aspect_of(cfg),
                            cache_dir=cache_root(cfg.data.cache_dir), image_size=runner.image_size_of(processor),
                            image_tokens=runner.image_tokens_of(model), world=cfg.world, progress=False)
    sampler = RankBatchSampler(dataset.lengths, kind=cfg.stage.sampler,
                               batch_size=cfg.train.per_device_train_batch_size, seed=cfg.train.seed)
    loader = DataLoader(dataset, batch_sampler=sampler,
                        collate_fn=LlavaCollator(pad_token_id=processor.tokenizer.pad_token_id))
    batch = next(iter(loader))
    batch.pop("sample_index", None)
    return model, batch


class LiveBytes(TorchDispatchMode):
    """The bytes of every tensor storage allocated inside it, until it is freed: current and peak, as a GPU's
    allocator counts them (`torch.cuda.max_memory_allocated`), on any device."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, weakref.ref] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._allocated(leaf.untyped_storage())
        return out

    def _allocated(self, storage) -> None:
        key = storage._cdata  # the storage itself, not its Python wrapper
        if key in self.live:
            return
        size = storage.nbytes()
        self.live[key] = weakref.ref(storage, lambda _, key=key, size=size: self._freed(key, size))
        self.current += size
        self.peak = max(self.peak, self.current)

    def _freed(self, key: int, size: int) -> None:
        self.live.pop(key, None)
        self.current -= size


def step_memory(model, batch: dict, labelled_only: bool) -> tuple[float, float]:
    """(peak MiB of live tensors over one forward and backward, weights included; that peak above the weights)."""
    inputs = with_labelled_logits_only(batch) if labelled_only else batch
    model.train()
    model.zero_grad(set_to_none=True)
    before = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    tracker = LiveBytes()  # what the step allocates: activations, temporaries, gradients
    with tracker:
        model(**inputs).loss.backward()
    step = tracker.peak
    model.zero_grad(set_to_none=True)
    return (before + step) / MIB, step / MIB


def runner_tokens_per_s(shape: str, labelled_only: bool) -> float:
    steps = STEPS[shape]
    cfg, composed = compose_run([*training_overrides(shape), f"train.max_steps={steps}",
                                 f"train.save_steps={10 * steps}", "train.logging_steps=10", "train.progress=false",
                                 f"train.labelled_logits_only={str(labelled_only).lower()}"])
    with tempfile.TemporaryDirectory() as tmp:
        summary = runner.run(cfg, Path(tmp) / "run", composed=composed)
    assert summary["train"]["steps"] == steps
    return summary["train"]["tokens_per_s"]


def plan_logits() -> dict[bool, dict]:
    """plan's memory estimate for llava16_mistral_7b (nf4, rtx4090_qlora, LoRA LLM), the setting on and off."""
    from vlmablate.plan import plan_cell

    out = {}
    for on in (True, False):
        cfg, _ = compose_run(["model=llava16_mistral_7b", "freeze=lora_llm", "quant=nf4", "train=rtx4090_qlora",
                              "eval=none", f"train.labelled_logits_only={str(on).lower()}"])
        out[on] = plan_cell(cfg)["memory_gib"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPE_OF), default=["world", "big", "big_vocab32k"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-only", action="store_true")
    args = parser.parse_args()

    print(f"{'shape':<13} {'tokens':>6} {'labelled':>8}  {'peak MiB off':>12} {'on':>8} {'on/off':>6}  "
          f"{'step MiB off':>12} {'on':>8} {'on/off':>6}")
    for shape in args.shapes:
        model, batch = first_batch(shape)
        off, on = step_memory(model, batch, False), step_memory(model, batch, True)
        labelled = int((batch["labels"][:, 1:] != -100).sum())
        print(f"{shape:<13} {batch['input_ids'].numel():>6} {labelled:>8}  {off[0]:>12.1f} {on[0]:>8.1f} "
              f"{on[0] / off[0]:>6.3f}  {off[1]:>12.1f} {on[1]:>8.1f} {on[1] / off[1]:>6.3f}", flush=True)
        del model

    if not args.memory_only:
        print(f"\ntokens/s of the runner, {args.repeats} alternating repeats, medians:")
        for shape in [s for s in args.shapes if s in STEPS]:
            speeds = {True: [], False: []}
            for _ in range(args.repeats):
                for on in (False, True):
                    speeds[on].append(runner_tokens_per_s(shape, on))
            off, on = statistics.median(speeds[False]), statistics.median(speeds[True])
            verdict = "met" if on >= off else "NOT met"
            print(f"{shape:<6} off {off:>9,.0f}  on {on:>9,.0f}  on/off = {on / off:.3f}  (target >= 1.0: {verdict}; "
                  f"runs off {[round(s) for s in speeds[False]]}, on {[round(s) for s in speeds[True]]})", flush=True)

    plan = plan_logits()
    ratio = plan[True]["total"] / plan[False]["total"]
    print(f"\nplan, llava16_mistral_7b nf4 rtx4090_qlora (batch {plan[True]['batch']} × {plan[True]['seq_len']}): "
          f"logits {plan[False]['logits']:.2f} → {plan[True]['logits']:.2f} GiB "
          f"({plan[True]['logit_rows']} labelled tokens a sample, plan.labelled_tokens); peak "
          f"{plan[False]['total']:.1f} → {plan[True]['total']:.1f} GiB (on/off = {ratio:.3f})")


if __name__ == "__main__":
    sys.exit(main())
