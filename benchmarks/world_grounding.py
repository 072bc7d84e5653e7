"""How many steps before the tiny world's composed model reads the image? Image vs blank, side by side.

The main job's benchmark sits at its blank-image baseline. This script measures why in isolation: it
composes the world's frozen vision tower, a fresh projector and a language model, trains the
projector and the whole LM (no LoRA, a constant learning rate) on short-answer questions about
freshly drawn scenes, and every `--eval-every` steps scores greedy answers on held-out scenes twice,
with the image and with a blank one. The gap between the two is what the model takes from the
image. It runs twice from the same projector initialisation: with the world's pretrained LM and with
the same LM re-initialised, so an LM that cannot learn to read the image shows up against one that
starts from nothing. `--projector stage1` starts both from the main job's stage-1 projector instead,
which measures the head start stage 1 gives. `--vision-lr` trains the tower too (the unfrozen-vision
policy's question, in isolation), `--freeze-lm` trains the projector (and the tower, if asked) with the LM
frozen (the frozen-LLM policy's question), `--answers choice` asks in MMBench's layout for the option's
letter, and `--answers sentence` for the instruct data's full sentence ("The triangle is red.") instead of
LLaVA-1.5's one-word short answer.

    python benchmarks/world_grounding.py [--categories colour|all|...] [--max-objects 5] [--steps 300]
                                         [--eval-every 100] [--lr 1e-3] [--vision-lr 0] [--lms world,fresh]
                                         [--freeze-lm] [--projector fresh|stage1] [--answers short|choice|sentence]
                                         [override ...]

Overrides are the main job's (`world=test`, `world.seed=1`, ...); the world is built first if missing.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from transformers import LlamaForCausalLM

from vlmablate.config import QuantConfig, cache_root, register_configs
from vlmablate.data.templates import IGNORE_INDEX
from vlmablate.eval.run import chat_prompt
from vlmablate.model.load import load_model
from vlmablate.model.plan import resolve_plan
from vlmablate.model.projector_io import load_projector
from vlmablate.train.runner import prepare_model, run
from vlmablate.train.stages import compose_config, ensure_stage1
from vlmablate.world import language
from vlmablate.world.data import CHOICE_PROMPT, LETTERS, SHORT_ANSWER_PROMPT
from vlmablate.world.scenes import Scene, render, sample_scene, scene_rng


class Task:
    """Questions of `categories` about scenes of 1..max_objects objects, answered in a word after the
    short-answer prompt (`answers="short"`) or in the instruct data's sentence (`answers="sentence"`)."""

    def __init__(self, processor, categories: list[str], max_objects: int, seed: int, answers: str = "short"):
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.categories, self.max_objects, self.seed = categories, max_objects, seed
        # "short": a word after LLaVA-1.5's short-answer prompt; "choice": the option's letter after its MMBench
        # prompt (options shuffled per question); "sentence": the instruct data's sentence
        self.answers = answers

    def example(self, split: str, index: int, blank: bool = False) -> tuple[str, str, object, str]:
        rng = scene_rng(self.seed, f"grounding-{split}", index)
        scene = sample_scene(rng, min_objects=1, max_objects=self.max_objects)
        item = None
        while item is None:  # a spatial question needs two objects
            item = language.question(scene, rng.choice(self.categories), rng)
        if self.answers == "short":
            prompt, answer = chat_prompt(self.processor, f"{item['question']}\n{SHORT_ANSWER_PROMPT}"), item["answer"]
        elif self.answers == "choice":  # MMBench's layout: the options, then the letter of the right one
            options = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, item["options"]))
            prompt = chat_prompt(self.processor, f"{item['question']}\n{options}\n{CHOICE_PROMPT}")
            answer = LETTERS[item["options"].index(item["answer"])]
        else:  # the sentence names the object again before the answer word: "The triangle is red."
            prompt, answer = chat_prompt(self.processor, item["question"]), item["sentence"]
        image = render(Scene(()) if blank else scene)
        return self.tokenizer.bos_token + prompt, answer, image, item["category"]

    def batch(self, start: int, size: int) -> dict:
        examples = [self.example("train", start + j) for j in range(size)]
        self.tokenizer.padding_side = "right"
        images = [e[2] for e in examples]
        prompts = self.processor(text=[e[0] for e in examples], images=images, return_tensors="pt", padding=True,
                                 add_special_tokens=False)["attention_mask"].sum(1)
        texts = [f"{e[0]} {e[1]}{self.tokenizer.eos_token}" for e in examples]
        enc = self.processor(text=texts, images=images, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE_INDEX)
        for row, n_prompt in enumerate(prompts.tolist()):
            labels[row, :n_prompt] = IGNORE_INDEX  # the loss is on the answer only
        return {**enc, "labels": labels}

    @torch.no_grad()
    def accuracy(self, model, n: int, blank: bool) -> dict[str, float]:
        """Exact-match accuracy of greedy answers on n held-out questions: overall ("all") and per category."""
        model.eval()
        self.tokenizer.padding_side = "left"
        hits, counts = Counter(), Counter()
        for start in range(0, n, 50):
            examples = [self.example("eval", start + j, blank) for j in range(min(50, n - start))]
            enc = self.processor(text=[e[0] for e in examples], images=[e[2] for e in examples],
                                 return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=4 if self.answers == "short" else 16, do_sample=False,
                                 pad_token_id=self.tokenizer.pad_token_id)
            for (_, answer, _, category), row in zip(examples, out[:, enc["input_ids"].shape[1]:]):
                reply = self.tokenizer.decode(row, skip_special_tokens=True).strip().rstrip(".").lower()
                for key in ("all", category):
                    hits[key] += reply == answer.rstrip(".").lower()
                    counts[key] += 1
        model.train()
        return {key: hits[key] / counts[key] for key in counts}


def curve(loaded, task: Task, *, fresh_lm: bool, args) -> list[tuple[int, dict, dict, float]]:
    model = loaded.model
    torch.manual_seed(args.seed)
    if fresh_lm:  # the same architecture, weights drawn anew
        fresh = LlamaForCausalLM(model.config.text_config)
        model.model.language_model.load_state_dict(fresh.model.state_dict())
        model.lm_head.load_state_dict(fresh.lm_head.state_dict())
    tower, rest = [], []
    for name, param in model.named_parameters():
        if args.freeze_lm and not name.startswith(("model.vision_tower", "model.multi_modal_projector")):
            param.requires_grad = False  # the LM and its head stay as they are
            continue
        (tower if name.startswith("model.vision_tower") else rest).append(param)
    for param in tower:
        param.requires_grad = args.vision_lr > 0
    groups = [{"params": rest, "lr": args.lr}]
    if args.vision_lr > 0:  # the tower at its own LR, as the unfrozen-vision policies give it
        groups.append({"params": tower, "lr": args.vision_lr})
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    rows, start = [], time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        loss = model(**task.batch((step - 1) * args.batch_size, args.batch_size)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            rows.append((step, task.accuracy(model, args.eval_n, False), task.accuracy(model, args.eval_n, True),
                         time.perf_counter() - start))
            image, blank = rows[-1][1], rows[-1][2]
            per = ", ".join(f"{k} {image[k]:.2f}/{blank[k]:.2f}" for k in task.categories if k in image)
            print(f"  {'fresh' if fresh_lm else 'world'} LM, step {step}: image {image['all']:.3f}, blank "
                  f"{blank['all']:.3f}, loss {loss.item():.3f} (image/blank: {per})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", default="colour",
                        help=f"comma-separated, from {', '.join(language.CATEGORIES)}; 'all' for every one")
    parser.add_argument("--max-objects", type=int, default=5)
    parser.add_argument("--answers", choices=("short", "choice", "sentence"), default="short",
                        help="short: one word after LLaVA-1.5's short-answer prompt; choice: the option's letter "
                             "after its MMBench prompt; sentence: the instruct data's full sentence (\"The "
                             "triangle is red.\"); all scored by exact match")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-n", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vision-lr", type=float, default=0.0,
                        help="train the vision tower too, at this LR (0, the default: the tower stays frozen)")
    parser.add_argument("--freeze-lm", action="store_true",
                        help="train the projector (and the tower with --vision-lr) only; the LM stays frozen")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lms", default="world,fresh", help="which LMs to train: world, fresh or both")
    parser.add_argument("--projector", choices=("fresh", "stage1"), default="fresh",
                        help="start from the composed model's fresh projector or the main job's stage-1 one "
                             "(trained first if it is not cached)")
    args, overrides = parser.parse_known_args()
    categories = list(language.CATEGORIES) if args.categories == "all" else args.categories.split(",")
    unknown = sorted(set(categories) - set(language.CATEGORIES))
    if unknown:
        parser.error(f"unknown categories {unknown}; known: {', '.join(language.CATEGORIES)}")

    register_configs()
    cfg, _ = compose_config(["train.progress=false", *overrides])
    plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage, lr_scale=cfg.train.lr_scale)
    model_cfg = prepare_model(cfg, plan)
    stage1 = None
    if args.projector == "stage1":
        stage1 = ensure_stage1(["train.progress=false", *overrides], cfg.model.stage1_data,
                               cache_root(cfg.data.cache_dir), run=run)["projector"]
    curves = {}
    for name in args.lms.split(","):
        if name not in ("world", "fresh"):
            parser.error(f"--lms takes world and/or fresh, got {name!r}")
        fresh_lm = name == "fresh"
        loaded = load_model(model_cfg, projector_type=plan.projector_type, quant=QuantConfig(mode="none"),
                            skip_modules=[], compute_dtype=torch.float32)
        if stage1:
            load_projector(loaded.model, stage1, projector_type=plan.projector_type)
        task = Task(loaded.processor, categories, args.max_objects, cfg.world.seed, args.answers)
        curves[name] = curve(loaded, task, fresh_lm=fresh_lm, args=args)

    print(f"\n{', '.join(categories)} questions, 1-{args.max_objects} objects, batch {args.batch_size}, "
          f"lr {args.lr}, {args.projector} projector"
          + (" trained, LM frozen" if args.freeze_lm else " + whole LM trained")
          + (f" + vision tower at lr {args.vision_lr}" if args.vision_lr > 0 else "")
          + (", answers in full sentences (exact match)" if args.answers == "sentence" else "")
          + f"; accuracy on {args.eval_n} held-out questions")
    print(f"{'step':>6} | " + " | ".join(f"{name + ' LM: image':>15} {'blank':>6} {'gap':>6}" for name in curves))
    for at_step in zip(*curves.values()):
        cells = [f"{image['all']:>15.3f} {blank['all']:>6.3f} {image['all'] - blank['all']:>+6.3f}"
                 for _, image, blank, _ in at_step]
        print(f"{at_step[0][0]:>6} | " + " | ".join(cells))
    print("seconds: " + ", ".join(f"{name} LM {rows[-1][3]:.0f}" for name, rows in curves.items()))


if __name__ == "__main__":
    main()
