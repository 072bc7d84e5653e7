"""Find the tiny world: its data files (built once per `world.seed` and sizes) and its two components.

The components (a pretrained vision tower and language model, `components.py`) are the same for every
seed, as CLIP and Vicuna are for every LLaVA experiment; `world.seed` varies only the data sets the
recipe uses (stage-1 captions, stage-2 conversations, the MMBench-style benchmark, the VQA set).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from vlmablate.config import WorldConfig, cache_root
from vlmablate.world import data as world_data
from vlmablate.world import language
from vlmablate.world.components import ensure_components
from vlmablate.world.scenes import sample_scene, scene_rng


@dataclass(frozen=True)
class WorldPaths:
    root: Path  # the components folder
    data: dict  # write_world_data's result: image_root, caption_json, instruct_json, bench_tsv, vqa_json

    @property
    def vision(self) -> Path:
        return self.root / "vision"

    @property
    def llm(self) -> Path:
        return self.root / "llm"

    @property
    def meta(self) -> dict:
        """The components' metadata: recipe, hash, probes, time."""
        return json.loads((self.root / "meta.json").read_text())


def sizes(world: WorldConfig) -> world_data.WorldSizes:
    return world_data.WorldSizes(n_caption=world.n_caption, n_instruct=world.n_instruct, n_bench=world.n_bench,
                                 n_vqa=world.n_vqa, image_size=world.image_size)


def data_key(world: WorldConfig) -> str:
    """Generator version + seed + sizes (+ stage 2's question weights where any is set): what changes the
    data files."""
    material = dataclasses.asdict(sizes(world))
    weights = world_data.question_weights(world.question_weights)
    if weights != world_data.question_weights(None):
        material["question_weights"] = weights
    digest = hashlib.sha256(json.dumps(material).encode()).hexdigest()[:10]
    return f"v{world_data.GENERATOR_VERSION}-seed{world.seed}-{digest}"


def ensure_world_data(world: WorldConfig, *, progress: bool = True) -> dict:
    """Only the data files (no components): what `data=tiny_world_*` needs for any model."""
    folder = cache_root(world.cache_dir) / "world-data" / data_key(world)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        return world_data.write_world_data(folder, seed=world.seed, sizes=sizes(world), progress=progress,
                                           weights=dict(world.question_weights))


def ensure_world(world: WorldConfig, *, progress: bool = True) -> WorldPaths:
    """The world for `world`: its data for `world.seed`, and the components (shipped, or built once)."""
    data = ensure_world_data(world, progress=progress)
    return WorldPaths(ensure_components(world, progress=progress), data)


def world_text(data: dict) -> tuple[list[str], list[list[dict]]]:
    """Stage-1 captions and the text-only dialogues of the instruction set (never the benchmark)."""
    captions = [r["conversations"][1]["value"] for r in json.loads(Path(data["caption_json"]).read_text())]
    dialogues = [r["conversations"] for r in json.loads(Path(data["instruct_json"]).read_text()) if "image" not in r]
    return captions, dialogues


def render_dialogue(tokenizer, turns: list[dict]) -> str:
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def lm_texts(world: WorldConfig, data: dict, tokenizer) -> tuple[list[str], list[str]]:
    """A text corpus of the world (captions, and text-only dialogues in the chat template) with held-out
    texts from scenes and dialogues of a split of their own: what `benchmarks/world_lm_copy.py` trains a
    plain text LM on for comparison."""
    captions, dialogues = world_text(data)
    rng = scene_rng(world.seed, "lm_heldout", 0)
    held_out = [language.caption(sample_scene(scene_rng(world.seed, "lm_heldout", i)), rng) for i in range(200)]
    for _ in range(100):
        turns = [t for q, a in language.text_only_dialogue(rng)
                 for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        held_out.append(render_dialogue(tokenizer, turns))
    return captions + [render_dialogue(tokenizer, d) for d in dialogues], held_out
