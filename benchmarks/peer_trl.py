"""The peer: tokens/s of the vlmablate runner against TRL's `SFTTrainer` on the same work, side by side.

Both sides train the same cell for the same steps:
- the same model: one checkpoint, the stage-1 projector, the freeze plan applied by `runner.load_cell`
  after the same seed, so the same PEFT LoRA model (TRL is handed that model, not a `peft_config`);
- the same records in the same batches: the runner's sampler order, given to TRL as rows in that order with
  `train_sampling_strategy="sequential"` and the same batch size;
- the same Trainer settings: TRL's `SFTConfig` is made from `runner.training_arguments` (batch, fp32 on the CPU,
  schedule, clipping, seed, logging, workers), plus what only SFT has;
- the same optimizer: AdamW over `parameter_groups` (the plan's per-component learning rates), set on TRL's
  trainer before it builds its own.
What differs is each side's machinery. TRL's vision-language path takes `messages` + `images` rows, renders,
tokenizes and processes the images in its collator (`DataCollatorForVisionLanguageModeling`) at every step, and
computes the loss with its fused LM head (log-probabilities of the labelled positions only, plus entropy and
token accuracy for its logs). The runner encodes each record in its dataset and pads with `LlavaCollator`.

Labels: the runner trains the assistant replies (the text after "ASSISTANT:" and the closing `</s>`). TRL's
`assistant_only_loss` needs `{% generation %}` markers in the chat template; the model's Vicuna v1 template has
none and TRL's automatic patch knows only its own list of templates, so TRL gets the same template with the
markers around exactly that span, and with the BOS the runner puts first (TRL's collator adds no special
tokens). A one-step check on both sides shows the work is the same: equal token counts and first-step losses.

    python benchmarks/peer_trl.py [--shape world|big|all] [--steps N] [--repeats 5] [override ...]

Shapes (`shapes.training_overrides`, as runner_overhead.py): `world` is the default cell (the tiny world's model
on its instruct data, batch 16); `big` is `shapes.BIG` (a LLaVA-shaped model with 256 image tokens), batch 2 on
~600-token conversations.

tokens/s on both sides: non-padding tokens of `input_ids` (image tokens included) over the training loop as the
runner's `TrainTimer` times it (from on_train_begin to the end of the last step, Trainer's one-time set-up left
out), as `summary.json` counts it. Runs alternate (TRL, runner, TRL, ...) in one process and the medians are
compared. Target: runner / TRL >= 1.0 on both shapes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from unittest.mock import patch

import datasets
import peft
import torch
import transformers
import trl
from shapes import compose_run, training_overrides
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from vlmablate.config import RunConfig
from vlmablate.data.sampler import RankBatchSampler
from vlmablate.data.sources import MixedDataset
from vlmablate.data.templates import IMAGE_MARKER, chat_template_of, to_messages
from vlmablate.train import runner
from vlmablate.train import trainer as trainer_module
from vlmablate.train.optim import parameter_groups
from vlmablate.train.trainer import TrainTimer

LOSS_TOLERANCE = 1e-4  # relative: fp32 cross-entropy against TRL's fused log-softmax over the same tokens
# The Vicuna v1 template's assistant turn, and the same turn with the span the runner trains marked for TRL.
VICUNA_REPLY = "{{- 'ASSISTANT: ' + text + eos_token }}"
MARKED_REPLY = "{{- 'ASSISTANT:' }}{% generation %}{{- ' ' + text + eos_token }}{% endgeneration %}"


# Default steps per timed run: ~9 s (world, batch 16) and ~14 s (big, batch 2) of training each on 2 quiet
# cores; with the set-up, the default five repeats of both shapes take ~7 minutes.
STEPS = {"world": 30, "big": 8}


# --- the cell, as the runner builds it ----------------------------------------------------------------------


def load_cell(cfg: RunConfig) -> runner.LoadedCell:
    """The model (plan applied) and processor, in the runner's order: projector, checkpoint, seed, load."""
    plan = runner.plan_of(cfg)
    projector, stage1 = runner.find_stage1(cfg, [])  # the stage-1 run runner.run finds when called without overrides
    model_cfg = runner.prepare_model(cfg, plan)
    set_seed(cfg.train.seed)  # right before LoRA's initial weights are drawn, as in runner.run
    return runner.load_cell(cfg, model_cfg, plan, projector, stage1)


def cell_dataset(cfg: RunConfig, loaded: runner.LoadedCell) -> MixedDataset:
    """The runner's training data (with the LLM frozen, its image samples only)."""
    return runner.build_data(cfg, loaded)[0]


def runner_batches(cfg: RunConfig, dataset: MixedDataset, steps: int) -> list[list[int]]:
    """The first `steps` batches the runner's trainer draws (one process, the first epoch)."""
    sampler = RankBatchSampler(dataset.lengths, kind=cfg.stage.sampler,
                               batch_size=cfg.train.per_device_train_batch_size,
                               grad_accum=runner.gradient_accumulation(cfg), seed=cfg.train.seed)
    batches = list(islice(iter(sampler), steps))
    if len(batches) < steps:
        raise ValueError(f"{steps} steps need more than one epoch of {len(dataset)} records; use fewer steps")
    return batches


# --- TRL's side ---------------------------------------------------------------------------------------------


def trl_messages(conversations: list[dict], ref: str) -> list[dict]:
    """LLaVA turns as TRL's string messages: the image marker leaves the text, as TRL puts the image before
    the first user text itself (which the template renders as "<image>\\n", where the record has it)."""
    messages = to_messages(conversations, ref)
    first = next(m for m in messages if m["role"] == "user")
    for m in messages:
        if IMAGE_MARKER in m["content"] and not (m is first and m["content"].startswith(IMAGE_MARKER + "\n")):
            raise ValueError(f"{ref}: TRL places the image before the first user text; this record has it elsewhere")
    return [{**m, "content": m["content"].removeprefix(IMAGE_MARKER + "\n")} for m in messages]


def trl_rows(dataset: MixedDataset, order: list[int]) -> datasets.Dataset:
    """The samples `order` names, as TRL's vision-language rows: `messages` and `images` (the same PIL image
    the runner's dataset hands its processor, aspect mode applied)."""
    messages, images = [], []
    for k in order:
        p, i = dataset.locate(k)
        part = dataset.parts[p]
        record = part.records[i]
        image = part.load_image(i, record)
        messages.append(trl_messages(record["conversations"], part.record_ref(i, record)))
        images.append([] if image is None else [image])
    return datasets.Dataset.from_dict({"messages": messages, "images": images})


def marked_template(tokenizer) -> str:
    """The tokenizer's chat template with BOS first and `{% generation %}` around the span the runner trains."""
    template, name = chat_template_of(tokenizer)
    if VICUNA_REPLY not in template:
        raise ValueError(f"{name} is not Vicuna v1: this benchmark marks the replies of that template only")
    bos = "{{- bos_token }}" if tokenizer.bos_token else ""
    return bos + template.replace(VICUNA_REPLY, MARKED_REPLY)


class TokenCount:
    """The collator's batches pass through unchanged; their non-padding tokens are counted."""

    def __init__(self, collate):
        self.collate = collate
        self.tokens = 0

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collate(features)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


class StepTimer(TrainTimer):
    """The runner's timer, also noting when each step ends: both sides train the same batches in the same order,
    so their steps pair up by index. The runner's trainer makes its own timer; inside `runner_side` it makes
    this one."""

    made: list["StepTimer"] = []

    def __init__(self):
        super().__init__()
        self.step_ends: list[float] = []
        StepTimer.made.append(self)

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self.step_ends.append(time.perf_counter())

    @property
    def step_seconds(self) -> list[float]:
        """Each step from the end of the one before (the first from train begin): its batch's loading included."""
        ends = [self.start, *self.step_ends]
        return [b - a for a, b in zip(ends, ends[1:])]


def trl_trainer(cfg: RunConfig, loaded: runner.LoadedCell, rows: datasets.Dataset, run_dir: Path) -> SFTTrainer:
    """TRL's trainer on the runner's arguments, its own collator counting tokens, the runner's optimizer groups."""
    model, processor = loaded.model, loaded.processor
    args = runner.training_arguments(cfg, run_dir)
    config = SFTConfig(**{**args.to_dict(), "hub_token": args.hub_token, "train_sampling_strategy": "sequential",
                          "assistant_only_loss": True, "max_length": cfg.model.max_length})
    processor.chat_template = marked_template(processor.tokenizer)
    trainer = SFTTrainer(model=model, args=config, train_dataset=rows, processing_class=processor)
    trainer.data_collator = TokenCount(trainer.data_collator)
    # Set before train(): Trainer builds its own AdamW only when it has none.
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    groups = parameter_groups(trainer.model, loaded.plan, decay_names=decay, weight_decay=config.weight_decay)
    optimizer_cls, optimizer_kwargs = trainer.get_optimizer_cls_and_kwargs(config, trainer.model)
    optimizer_kwargs.pop("lr", None)  # each group carries its component's learning rate
    trainer.optimizer = optimizer_cls(groups, **optimizer_kwargs)
    trainer.timer = StepTimer()
    trainer.add_callback(trainer.timer)
    return trainer


def trl_side(cfg: RunConfig) -> dict:
    steps = cfg.train.max_steps
    loaded = load_cell(cfg)
    dataset = cell_dataset(cfg, loaded)
    rows = trl_rows(dataset, [k for batch in runner_batches(cfg, dataset, steps) for k in batch])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trl_trainer(cfg, loaded, rows, Path(tmp) / "trl")
        output = trainer.train()
    assert trainer.state.global_step == steps
    tokens = trainer.data_collator.tokens
    return {"tokens": tokens, "tokens_per_s": tokens / trainer.timer.seconds, "loss": output.training_loss,
            "step_seconds": trainer.timer.step_seconds}


# --- the runner's side --------------------------------------------------------------------------------------


def runner_side(cfg: RunConfig, composed: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp, patch.object(trainer_module, "TrainTimer", StepTimer):
        train = runner.run(cfg, Path(tmp) / "run", composed=composed)["train"]
    assert train["steps"] == cfg.train.max_steps
    return {"tokens": train["tokens"], "tokens_per_s": train["tokens_per_s"], "loss": train["train_loss"],
            "step_seconds": StepTimer.made[-1].step_seconds}  # the cell's timer: made after any stage-1 run


# --- the comparison -----------------------------------------------------------------------------------------


def first_step(overrides: list[str]) -> dict:
    """One step on each side: the tokens each trained and its loss (the mean over one step is that step's)."""
    cfg, composed = compose_run([*overrides, "train.max_steps=1", "train.logging_steps=1"])
    ours, theirs = runner_side(cfg, composed), trl_side(cfg)
    gap = abs(ours["loss"] - theirs["loss"]) / abs(theirs["loss"])
    return {"runner": ours, "trl": theirs, "relative_gap": gap,
            "agree": ours["tokens"] == theirs["tokens"] and gap <= LOSS_TOLERANCE}


def timed(overrides: list[str], repeats: int) -> dict:
    """Alternating timed runs, TRL first in each pair: the medians of tokens/s and their ratio, and the median
    over paired steps (the same batch on both sides) of TRL's step time over the runner's, which a burst of
    load from other processes moves less than a whole run."""
    cfg, composed = compose_run(overrides)
    rates, step_ratios = {"trl": [], "runner": []}, []
    for i in range(repeats):
        theirs, ours = trl_side(cfg), runner_side(cfg, composed)
        rates["trl"].append(theirs["tokens_per_s"])
        rates["runner"].append(ours["tokens_per_s"])
        step_ratios += [t / r for t, r in zip(theirs["step_seconds"], ours["step_seconds"], strict=True)]
        print(f"  repeat {i + 1}: TRL {rates['trl'][-1]:,.0f} tok/s   runner {rates['runner'][-1]:,.0f} tok/s",
              flush=True)
    median = {side: statistics.median(r) for side, r in rates.items()}
    return {"batch": cfg.train.per_device_train_batch_size, "median": median,
            "ratio": median["runner"] / median["trl"], "step_ratio": statistics.median(step_ratios),
            "step_pairs": len(step_ratios)}


def measure(shape: str, steps: int, repeats: int, extra: list[str]) -> dict:
    overrides = [*training_overrides(shape), f"train.save_steps={10 * steps}", "train.logging_steps=10",
                 "train.progress=false", *extra]
    check = first_step(overrides)
    r, t = check["runner"], check["trl"]
    print(f"shape {shape}: first step: tokens runner {r['tokens']:,} TRL {t['tokens']:,}; loss runner "
          f"{r['loss']:.6f} TRL {t['loss']:.6f} (relative gap {check['relative_gap']:.1e}: "
          f"{'same work' if check['agree'] else 'NOT the same work'})", flush=True)
    speed = timed([*overrides, f"train.max_steps={steps}"], repeats)
    print(f"shape {shape}: {steps} steps x batch {speed['batch']}, {repeats} repeats: median tokens/s TRL "
          f"{speed['median']['trl']:,.0f}, runner {speed['median']['runner']:,.0f}; runner / TRL = "
          f"{speed['ratio']:.3f} (target >= 1.0: {'met' if speed['ratio'] >= 1.0 else 'NOT met'}); paired steps: "
          f"{speed['step_ratio']:.3f} (median of {speed['step_pairs']})\n", flush=True)
    return {"check": check, **speed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*STEPS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=None, help="default: 30 (world), 8 (big)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both shapes, e.g. freeze=full_llm")
    args = parser.parse_args()

    print(f"TRL {trl.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)\n", flush=True)
    shapes = list(STEPS) if args.shape == "all" else [args.shape]
    results = {s: measure(s, args.steps or STEPS[s], args.repeats, args.overrides) for s in shapes}
    print(f"{'shape':<12}{'TRL tok/s':>12}{'runner tok/s':>14}{'runner/TRL':>12}{'paired steps':>14}  "
          "first-step loss runner / TRL")
    for shape, res in results.items():
        r, t = res["check"]["runner"], res["check"]["trl"]
        print(f"{shape:<12}{res['median']['trl']:>12,.0f}{res['median']['runner']:>14,.0f}{res['ratio']:>12.3f}"
              f"{res['step_ratio']:>14.3f}  "
              f"{r['loss']:.6f} / {t['loss']:.6f} ({'agree' if res['check']['agree'] else 'DISAGREE'})")


if __name__ == "__main__":
    sys.exit(main())
