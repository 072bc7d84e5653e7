"""Does stage 1 hand the frozen LM the board it learned to read? Image vs transcript vs empty board.

The world's LM was pretrained on board transcripts: 16 cell vectors where `<image>` stands
(`vlmablate.world.board`). Stage 1 trains only the projector, under the frozen LM, to caption images.
This script takes the main job's stage-1 projector (trained first if it is not cached) and measures, on
held-out scenes, what the frozen LM gets from the projected image beside what it gets from the scene's
transcript and from an empty board:

- caption loss (stage 1's `plain` layout, loss on the caption): image / transcript / empty board;
- the reading probe (`reader.probe_set`: one question per board, greedy exact match) per kind and
  answer format ("colour", "colour@choice"): from the image, from the transcript, and from the image of
  an empty board;
- where the projected patches land: for each object cell, the nearest of the 241 vectors a cell at that
  place can be in the LM's embedding space (every size x colour x shape x fill x mark, or empty), and how often
  each attribute of it is the object's own; and `place`: how often, of the object's own cell vector at
  each of the 16 places, the one at its true place is the nearest.

    python benchmarks/world_alignment.py [--captions 200] [--per-kind 50] [override ...]

Overrides are the main job's (`world=test`, `world.seed=1`, ...).
"""

from __future__ import annotations

import argparse
import itertools
import random
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM

from vlmablate.config import QuantConfig, cache_root, register_configs
from vlmablate.model.load import load_model
from vlmablate.model.plan import resolve_plan
from vlmablate.model.projector_io import load_projector
from vlmablate.train.runner import prepare_model, run
from vlmablate.train.stages import compose_config, ensure_stage1
from vlmablate.world.board import ATTRIBUTE_VALUES, ATTRIBUTES, EMPTY, N_CELLS, embed_inputs
from vlmablate.world.build import ensure_world
from vlmablate.world.components import components_config, load_board
from vlmablate.world.language import CATEGORIES
from vlmablate.world.reader import caption_document, probe_set
from vlmablate.world.reading import IGNORE_INDEX, Encoder, collate, score_answers
from vlmablate.world.scenes import Scene, render, sample_scene, scene_rng

EMPTY_BOARD = Scene(())


class Views:
    """The three ways the frozen LM can be shown a scene: the projected image, the transcript, an empty board."""

    def __init__(self, llava, processor, lm, board, enc: Encoder):
        self.llava, self.processor, self.lm, self.board, self.enc = llava, processor, lm, board, enc

    def pixels(self, scenes) -> torch.Tensor:
        return self.processor.image_processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def logits(self, view: str, docs, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if view == "transcript":
            cells = torch.stack([self.enc.vocab.cells(d.scene) for d in docs])
            embeds = embed_inputs(self.lm, self.board, ids, cells, self.enc.image_token_id)
            return self.lm(inputs_embeds=embeds, attention_mask=mask).logits
        scenes = [d.scene if view == "image" else EMPTY_BOARD for d in docs]
        return self.llava(input_ids=ids, pixel_values=self.pixels(scenes), attention_mask=mask).logits

    def caption_loss(self, view: str, docs) -> float:
        ids, labels, mask = collate(docs, self.enc.tokenizer.pad_token_id)
        logits = self.logits(view, docs, ids, mask)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX).item()

    @torch.no_grad()
    def nearest_cells(self, scenes) -> dict[str, float]:
        """Per attribute, how often the candidate cell vector nearest to an object's projected patch has it."""
        combos = list(itertools.product(*(ATTRIBUTE_VALUES[a] for a in ATTRIBUTES)))
        words = torch.tensor([[self.enc.vocab.ids[w] for w in combo] for combo in combos] + [[EMPTY] * len(ATTRIBUTES)])
        embed = self.lm.get_input_embeddings()
        projected = torch.stack(self.llava.model.get_image_features(pixel_values=self.pixels(scenes)).pooler_output)
        # every candidate at every place: entry [p, c] is candidate c at place p
        cells = torch.full((N_CELLS, len(words), N_CELLS, len(ATTRIBUTES)), EMPTY, dtype=torch.long)
        for p in range(N_CELLS):
            cells[p, :, p] = words
        everywhere = torch.stack([self.board(embed, cells[p])[:, p] for p in range(N_CELLS)])
        hits = {a: 0 for a in ("cell", *ATTRIBUTES, "place")}
        n = 0
        for scene, patches in zip(scenes, projected):
            for o in scene.objects:
                place = o.row * 4 + o.col
                candidates = everywhere[place]  # the object's place: which cell vector is it?
                best = torch.cdist(patches[place][None].float(), candidates.float())[0].argmin().item()
                # among every place's vectors of the object's own cell: is its place the nearest?
                own = everywhere[:, combos.index(tuple(getattr(o, a) for a in ATTRIBUTES))]
                hits["place"] += torch.cdist(patches[place][None].float(), own.float())[0].argmin().item() == place
                guess = combos[best] if best < len(combos) else (None,) * len(ATTRIBUTES)
                truth = tuple(getattr(o, a) for a in ATTRIBUTES)
                hits["cell"] += guess == truth
                for a, g, t in zip(ATTRIBUTES, guess, truth):
                    hits[a] += g == t
                n += 1
        return {k: round(v / max(n, 1), 3) for k, v in hits.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=200, help="held-out captions scored")
    parser.add_argument("--per-kind", type=int, default=50, help="held-out questions per kind")
    parser.add_argument("--batch-size", type=int, default=32)
    args, overrides = parser.parse_known_args(argv)
    register_configs()
    start = time.perf_counter()
    cfg, _ = compose_config(["train.progress=false", *overrides])
    plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage, lr_scale=cfg.train.lr_scale)
    model_cfg = prepare_model(cfg, plan)
    stage1 = ensure_stage1(["train.progress=false", *overrides], cfg.model.stage1_data, cache_root(cfg.data.cache_dir),
                           run=run)
    loaded = load_model(model_cfg, projector_type=plan.projector_type, quant=QuantConfig(mode="none"),
                        skip_modules=[], compute_dtype=torch.float32)
    load_projector(loaded.model, stage1["projector"], projector_type=plan.projector_type)
    paths = ensure_world(cfg.world, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(paths.llm)
    enc = Encoder(tokenizer)
    views = Views(loaded.model.eval(), loaded.processor, LlamaForCausalLM.from_pretrained(paths.llm).eval(),
                  load_board(paths.root), enc)

    rng = random.Random("alignment")
    scenes = [sample_scene(scene_rng(cfg.world.seed, "alignment", i)) for i in range(args.captions)]
    captions = [caption_document(s, rng, enc) for s in scenes]
    chunks = [captions[i: i + args.batch_size] for i in range(0, len(captions), args.batch_size)]
    loss = {view: sum(views.caption_loss(view, c) * len(c) for c in chunks) / len(captions)
            for view in ("image", "transcript", "empty")}
    recipe = components_config(cfg.world).lm
    items = probe_set(enc, replace(recipe, reading=replace(recipe.reading, kinds=CATEGORIES)), seed=3,
                      n_per_kind=args.per_kind)
    kinds = tuple(items)
    reading = {view: score_answers(lambda docs, ids, mask, v=view: views.logits(v, docs, ids, mask), enc, items,
                                   batch_size=args.batch_size)
               for view in ("image", "transcript", "empty")}
    nearest = views.nearest_cells(scenes)

    print(f"\nstage-1 projector {stage1['projector']} ({'cached' if stage1['reused'] else 'trained now'}); "
          f"components {paths.meta['hash']}")
    print(f"caption loss on {args.captions} held-out scenes: image {loss['image']:.3f} | transcript "
          f"{loss['transcript']:.3f} | empty board {loss['empty']:.3f}")
    print(f"reading probe, {args.per_kind} held-out questions per kind (image / transcript / empty board):")
    for kind in kinds:
        print(f"  {kind:>10}  {reading['image'][kind]:.2f} / {reading['transcript'][kind]:.2f} / "
              f"{reading['empty'][kind]:.2f}")
    mean = {v: sum(r.values()) / len(r) for v, r in reading.items()}
    print(f"  {'mean':>10}  {mean['image']:.2f} / {mean['transcript']:.2f} / {mean['empty']:.2f}")
    print("projected object patches, nearest cell vector right in: "
          + ", ".join(f"{k} {v:.2f}" for k, v in nearest.items()))
    print(f"{time.perf_counter() - start:.0f} s")
    return {"caption_loss": loss, "reading": reading, "nearest": nearest, "stage1": stage1["projector"]}


if __name__ == "__main__":
    main()
