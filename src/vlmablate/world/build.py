"""Build the tiny world once and find it again: data files, tokenizer, pretrained vision encoder and LM.

The cache folder is keyed by the generator versions, the seed and a hash of the world's settings;
it is built in a temporary folder under a file lock and renamed into place, so two processes that
start at once build it once, and a killed build never leaves a half world behind.

Layout of `<cache>/world/<key>/`:
  data/      stage-1 captions, stage-2 conversations, the MMBench-style TSV, the TextVQA-style JSON
  vision/    a pretrained `CLIPVisionModel` + its image processor
  llm/       a pretrained `LlamaForCausalLM` + the world's tokenizer (Vicuna v1 chat template, `<image>`)
  meta.json  versions, seed, sizes, probe accuracies, perplexities, timings
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from vlmablate.config import ConfigError, WorldConfig, cache_root
from vlmablate.world import data as world_data
from vlmablate.world import language, pretrain
from vlmablate.world.scenes import sample_scene, scene_rng

log = logging.getLogger(__name__)

BUILD_VERSION = 4  # bump when how the components are built changes


@dataclass(frozen=True)
class WorldPaths:
    root: Path
    data: dict  # write_world_data's result: image_root, caption_json, instruct_json, bench_tsv, vqa_json

    @property
    def vision(self) -> Path:
        return self.root / "vision"

    @property
    def llm(self) -> Path:
        return self.root / "llm"

    @property
    def meta(self) -> dict:
        return json.loads((self.root / "meta.json").read_text())


def _sub_config(cls, overrides: dict, seed: int, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"{where} has no field(s) {unknown}; known: {sorted(known)}")
    return cls(**{"seed": seed, **overrides})


def vision_config(world: WorldConfig) -> pretrain.VisionPretrainConfig:
    return _sub_config(pretrain.VisionPretrainConfig, {"image_size": world.image_size, **world.vision}, world.seed,
                       "world.vision")


def lm_config(world: WorldConfig) -> pretrain.LMPretrainConfig:
    return _sub_config(pretrain.LMPretrainConfig, world.lm, world.seed, "world.lm")


def sizes(world: WorldConfig) -> world_data.WorldSizes:
    return world_data.WorldSizes(n_caption=world.n_caption, n_instruct=world.n_instruct, n_bench=world.n_bench,
                                 n_vqa=world.n_vqa, image_size=world.image_size)


def world_key(world: WorldConfig) -> str:
    """Versions + seed + every setting that changes what gets built."""
    settings = {
        "versions": [world_data.GENERATOR_VERSION, BUILD_VERSION],
        "sizes": dataclasses.asdict(sizes(world)),
        "vocab_size": world.vocab_size,
        "vision": dataclasses.asdict(vision_config(world)),
        "lm": dataclasses.asdict(lm_config(world)),
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"v{world_data.GENERATOR_VERSION}.{BUILD_VERSION}-seed{world.seed}-{digest}"


def ensure_world_data(world: WorldConfig, *, progress: bool = True) -> dict:
    """Only the data files (no pretraining): what `data=tiny_world_*` needs for any model."""
    folder = cache_root(world.cache_dir) / "world-data" / f"v{world_data.GENERATOR_VERSION}-seed{world.seed}-" \
        f"{hashlib.sha256(json.dumps(dataclasses.asdict(sizes(world))).encode()).hexdigest()[:10]}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        return world_data.write_world_data(folder, seed=world.seed, sizes=sizes(world), progress=progress)


def world_text(data: dict) -> tuple[list[str], list[list[dict]]]:
    """Stage-1 captions and the text-only dialogues of the instruction set (never the benchmark)."""
    captions = [r["conversations"][1]["value"] for r in json.loads(Path(data["caption_json"]).read_text())]
    dialogues = [r["conversations"] for r in json.loads(Path(data["instruct_json"]).read_text()) if "image" not in r]
    return captions, dialogues


def render_dialogue(tokenizer, turns: list[dict]) -> str:
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def lm_texts(world: WorldConfig, data: dict, tokenizer) -> tuple[list[str], list[str]]:
    """The language model's corpus: captions, and text-only dialogues in the chat template, so the LM
    knows the world's words and the conversation format as Vicuna does. Held-out texts come from
    scenes and dialogues of a split of their own."""
    captions, dialogues = world_text(data)
    rng = scene_rng(world.seed, "lm_heldout", 0)
    held_out = [language.caption(sample_scene(scene_rng(world.seed, "lm_heldout", i)), rng) for i in range(200)]
    for _ in range(100):
        turns = [t for q, a in language.text_only_dialogue(rng)
                 for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        held_out.append(render_dialogue(tokenizer, turns))
    return captions + [render_dialogue(tokenizer, d) for d in dialogues], held_out


def ensure_world(world: WorldConfig, *, progress: bool = True) -> WorldPaths:
    """The built world for `world` (data + pretrained components), building it once if missing."""
    data = ensure_world_data(world, progress=progress)
    root = cache_root(world.cache_dir) / "world" / world_key(world)
    if (root / "meta.json").exists():
        return WorldPaths(root, data)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if (root / "meta.json").exists():  # another process built it while we waited
            return WorldPaths(root, data)
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            meta = _build_components(world, data, tmp, progress=progress)
            (tmp / "meta.json").write_text(json.dumps({**meta, "built_by_pid": os.getpid()}, indent=2))
            os.replace(tmp, root)
        finally:  # a failed or interrupted build leaves nothing that looks like a world
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("tiny world built in %s", root)
    return WorldPaths(root, data)


def _build_components(world: WorldConfig, data: dict, folder: Path, *, progress: bool) -> dict:
    from vlmablate.model.tiny import train_tiny_tokenizer

    start = time.perf_counter()
    captions, dialogues = world_text(data)
    # Option letters as single tokens (" A", " B", ...), as real LLM vocabularies have them: the
    # benchmark's answers are letters, and letter-likelihood scoring then needs one forward.
    corpus = " ".join(captions + [t["value"] for d in dialogues for t in d] + ["A B C D"] * 2000)
    tokenizer = train_tiny_tokenizer(world.vocab_size, extra_text=corpus)
    train_texts, held_out = lm_texts(world, data, tokenizer)
    log.info("tiny world: pretraining the vision encoder")
    vision, image_processor, vision_metrics = pretrain.pretrain_vision(vision_config(world), world_seed=world.seed,
                                                                       progress=progress)
    pretrain.save_vision(vision, image_processor, folder / "vision")
    log.info("tiny world: vision probe %s", vision_metrics)
    log.info("tiny world: pretraining the language model on %d texts", len(train_texts))
    lm, lm_metrics = pretrain.pretrain_language_model(train_texts, held_out, tokenizer, lm_config(world),
                                                      progress=progress)
    pretrain.save_language_model(lm, tokenizer, folder / "llm")
    log.info("tiny world: language model %s", lm_metrics)
    return {
        "key": world_key(world),
        "versions": {"generator": world_data.GENERATOR_VERSION, "build": BUILD_VERSION},
        "seed": world.seed,
        "sizes": dataclasses.asdict(sizes(world)),
        "data": {k: v for k, v in data.items() if k != "meta"},
        "vision": {"config": dataclasses.asdict(vision_config(world)), "metrics": vision_metrics},
        "lm": {"config": dataclasses.asdict(lm_config(world)), "metrics": lm_metrics,
               "train_texts": len(train_texts), "held_out_texts": len(held_out)},
        "build_seconds": round(time.perf_counter() - start, 1),
    }
