"""Where does a question's answer send its gradient? The asked object's cell against the rest, per category.

An unfrozen tower learns only what the LM's answer loss sends back to it. This script measures that
signal on the main job's composed model as stage 2 starts (the world's LM and tower, the stage-1
projector, nothing trained further): for held-out questions of one category, answered in a word after
LLaVA-1.5's short-answer prompt, it backpropagates the answer's loss to the projector's input (the
tower's features) and output (the LM's image tokens) and prints

- the share of the gradient's squared norm at the cells of the objects the question is about
  (uniform would be 1/16 a cell), at the tower's features and at the LM's image tokens;
- the norms of the image tokens at objects and at empty cells beside those of the LM's word
  embeddings, which the LM was pretrained to read.

    python benchmarks/world_answer_gradient.py [--category mark] [--n 64] [override ...]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from vlmablate.config import QuantConfig, cache_root, register_configs
from vlmablate.eval.run import chat_prompt
from vlmablate.model.load import load_model
from vlmablate.model.plan import resolve_plan
from vlmablate.model.projector_io import load_projector
from vlmablate.train.runner import prepare_model, run
from vlmablate.train.stages import compose_config, ensure_stage1
from vlmablate.world import language
from vlmablate.world.data import SHORT_ANSWER_PROMPT
from vlmablate.world.scenes import render, sample_scene, scene_rng


def composed_model(overrides: list[str]):
    """The main job's model as stage 2 starts: composed components with the (cached) stage-1 projector."""
    register_configs()
    cfg, _ = compose_config(["train.progress=false", *overrides])
    plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage, lr_scale=cfg.train.lr_scale)
    loaded = load_model(prepare_model(cfg, plan), projector_type=plan.projector_type, quant=QuantConfig(mode="none"),
                        skip_modules=[], compute_dtype=torch.float32)
    stage1 = ensure_stage1(["train.progress=false", *overrides], cfg.model.stage1_data,
                           cache_root(cfg.data.cache_dir), run=run)
    load_projector(loaded.model, stage1["projector"], projector_type=plan.projector_type)
    for param in loaded.model.parameters():
        param.requires_grad_(False)
    return cfg, loaded


def gradients(model, processor, item: dict, image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(image tokens, their gradient, the tower features' gradient, loss) of one question's answer, [16, d] each."""
    tokenizer = processor.tokenizer
    prompt = tokenizer.bos_token + chat_prompt(processor, f"{item['question']}\n{SHORT_ANSWER_PROMPT}")
    n_prompt = processor(text=[prompt], images=[image], return_tensors="pt",
                         add_special_tokens=False)["input_ids"].shape[1]
    enc = processor(text=[f"{prompt} {item['answer']}{tokenizer.eos_token}"], images=[image], return_tensors="pt",
                    add_special_tokens=False)
    labels = enc["input_ids"].clone()
    labels[:, :n_prompt] = -100  # the loss is on the answer only, as stage 2 scores it
    seen = {}

    def take_input(module, args):
        seen["features"] = args[0].detach().requires_grad_(True)
        return (seen["features"],)

    def keep_output(module, args, output):
        output.retain_grad()
        seen["tokens"] = output

    projector = model.model.multi_modal_projector
    hooks = [projector.register_forward_pre_hook(take_input), projector.register_forward_hook(keep_output)]
    try:
        loss = model(**enc, labels=labels).loss
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    return seen["tokens"][0].detach(), seen["tokens"].grad[0], seen["features"].grad[0], loss.item()


def measure(model, processor, category: str, n: int, world_seed: int) -> dict:
    embeddings = model.get_input_embeddings().weight.detach()
    shares_features, shares_tokens, object_norms, empty_norms, losses = [], [], [], [], []
    for index in range(n):
        rng = scene_rng(world_seed, "answer-gradient", index)
        scene = sample_scene(rng, min_objects=1, max_objects=5)
        item = None
        while item is None:  # a spatial question needs two objects
            item = language.question(scene, category, rng)
        tokens, token_grad, feature_grad, loss = gradients(model, processor, item, render(scene))
        cells = item["cells"]
        shares_features.append(float(feature_grad[cells].pow(2).sum() / feature_grad.pow(2).sum()))
        shares_tokens.append(float(token_grad[cells].pow(2).sum() / token_grad.pow(2).sum()))
        losses.append(loss)
        occupied = [language.cell(o) for o in scene.objects]
        object_norms += tokens[occupied].norm(dim=-1).tolist()
        empty = [c for c in range(tokens.shape[0]) if c not in occupied]
        empty_norms += tokens[empty].norm(dim=-1).tolist()
    return {
        "category": category, "n": n, "loss": statistics.mean(losses),
        "share_features": statistics.mean(shares_features), "share_tokens": statistics.mean(shares_tokens),
        "object_norm": statistics.mean(object_norms), "empty_norm": statistics.mean(empty_norms),
        "word_norm": float(embeddings.norm(dim=-1).mean()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", default="mark", choices=language.CATEGORIES)
    parser.add_argument("--n", type=int, default=64, help="held-out questions")
    args, overrides = parser.parse_known_args(argv)
    cfg, loaded = composed_model(overrides)
    r = measure(loaded.model, loaded.processor, args.category, args.n, cfg.world.seed)
    print(f"{args.category} questions, {r['n']} held out, short answers; mean answer loss {r['loss']:.3f}")
    print(f"share of the answer's squared gradient at the asked objects' cells (1/16 = 0.0625 a cell): "
          f"tower features {r['share_features']:.3f}, image tokens {r['share_tokens']:.3f}")
    print(f"norms: image tokens at objects {r['object_norm']:.1f}, at empty cells {r['empty_norm']:.1f}; "
          f"the LM's word embeddings {r['word_norm']:.3f}")
    return r


if __name__ == "__main__":
    main()
