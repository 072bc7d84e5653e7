"""Runner overhead: tokens/s of the full vlmablate runner against a minimal hand-written PyTorch loop.

Both train the same model (same checkpoint, same freeze plan, same optimizer groups) for the same
number of steps on the same data pipeline (dataset, collator, batch size); the hand-written loop is
what a user would write without a framework: DataLoader → forward → backward → clip → step.
Runs alternate (loop, runner, loop, runner, ...) and the medians are compared.

    python benchmarks/runner_overhead.py [--shape world|big] [--steps N] [--repeats 3] [override ...]

Shapes (`shapes.training_overrides`): `world` is the default cell, the tiny world's model (~2.8M parameters) on
its instruct data, where framework overhead is not hidden behind a large forward; `big` is `shapes.BIG`, a
LLaVA-shaped model big enough that matmuls dominate (random weights, built locally: a 12-layer 384-wide ViT at
224 px / patch 14, 256 image tokens, and an 8-layer 512-wide Llama), batch 2 on generated conversations of
~600 tokens.

Target (DESIGN.md): runner tokens/s >= 0.95 x the loop's, on both shapes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from shapes import compose_run, training_overrides
from torch.utils.data import DataLoader

from vlmablate.config import cache_root
from vlmablate.data.collator import LlavaCollator
from vlmablate.data.sampler import RankBatchSampler
from vlmablate.data.sources import build_dataset
from vlmablate.model.plan import resolve_plan
from vlmablate.train import runner
from vlmablate.train.optim import parameter_groups

DEFAULT_STEPS = {"world": 40, "big": 8}


def hand_written_loop(cfg, steps: int) -> float:
    """tokens/s of the plain loop: same model, plan, optimizer groups, data pipeline and batch size."""
    torch.manual_seed(cfg.train.seed)
    plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage,
                        lr_scale=cfg.train.lr_scale)
    model, processor, _ = runner.load_cell_model(cfg, runner.prepare_model(cfg, plan), plan, None)
    dataset = build_dataset(cfg.data, processor=processor, template=cfg.stage.template,
                            max_length=cfg.model.max_length, image_aspect=runner.image_aspect_of(cfg),
                            cache_dir=cache_root(cfg.data.cache_dir), image_size=runner.image_size_of(processor),
                            image_tokens=runner.image_tokens_of(model), world=cfg.world, progress=False)
    # the runner's own batches (same sampler, same order), so both sides pad the same way
    sampler = RankBatchSampler(dataset.lengths, kind=cfg.stage.sampler,
                               batch_size=cfg.train.per_device_train_batch_size, seed=cfg.train.seed)
    loader = DataLoader(dataset, batch_sampler=sampler,
                        collate_fn=LlavaCollator(pad_token_id=processor.tokenizer.pad_token_id))
    decay = {n for n, _ in model.named_parameters() if "bias" not in n and "norm" not in n}
    optimizer = torch.optim.AdamW(parameter_groups(model, plan, decay_names=decay, weight_decay=0.0))
    model.train()
    tokens, step, start = 0, 0, time.perf_counter()
    while step < steps:
        for batch in loader:
            batch.pop("sample_index", None)  # bookkeeping the runner's trainer takes out, as here
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum())
            step += 1
            if step == steps:
                break
    return tokens / (time.perf_counter() - start)


def full_runner(cfg, composed: dict, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        summary = runner.run(cfg, Path(tmp) / "run", composed=composed)
    assert summary["train"]["steps"] == steps
    return summary["train"]["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(DEFAULT_STEPS), default="world")
    parser.add_argument("--steps", type=int, default=None, help="default: 40 (world), 8 (big)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. freeze=full_llm")
    args = parser.parse_args()
    args.steps = args.steps or DEFAULT_STEPS[args.shape]

    overrides = [*training_overrides(args.shape), f"train.max_steps={args.steps}",
                 f"train.save_steps={10 * args.steps}", "train.logging_steps=10", *args.overrides]
    cfg, composed = compose_run(overrides)

    loop, framework = [], []
    for i in range(args.repeats):
        loop.append(hand_written_loop(cfg, args.steps))
        framework.append(full_runner(cfg, composed, args.steps))
        print(f"repeat {i + 1}: loop {loop[-1]:,.0f} tok/s   runner {framework[-1]:,.0f} tok/s", flush=True)
    ratio = statistics.median(framework) / statistics.median(loop)
    print(f"\nshape {args.shape}; overrides: {' '.join(args.overrides) or '(defaults)'}; {args.steps} steps x batch "
          f"{cfg.train.per_device_train_batch_size}, {args.repeats} repeats")
    print(f"median tokens/s  loop {statistics.median(loop):,.0f}  runner {statistics.median(framework):,.0f}")
    print(f"runner / loop = {ratio:.3f}  (target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")


if __name__ == "__main__":
    sys.exit(main())
