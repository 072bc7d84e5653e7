"""Model shapes the benchmarks share, as Hydra overrides of the main config.

`BIG` is a LLaVA-shaped model with random weights, big enough that matmuls dominate a step: a 12-layer,
384-wide ViT at 224 px with 14-px patches (256 image tokens, 6 heads, MLP 4x) under LLaVA-1.5's
mlp2x_gelu projector, and an 8-layer, 512-wide Llama (8 heads, MLP 2.6875x as Llama-2's) whose position
table holds 1,024 tokens. Built locally by `model=tiny_random`; nothing is downloaded.

`training_overrides(shape)` adds what the training benchmarks (runner_overhead.py, peer_trl.py) run each shape
on: `world` trains the default cell on the tiny world's instruct data; `big` trains batch 2 on generated
image conversations of ~600 tokens (256 image tokens and ~350 text tokens). Evaluation is off in both: it runs
after training, outside tokens/s.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vlmablate.config import RunConfig, cache_root, register_configs, to_run_config
from vlmablate.data.synthetic import write_synthetic_llava
from vlmablate.train.stages import PACKAGE_CONF

BIG = ["model=tiny_random", "model.max_length=1024", "model.tiny.image_size=224", "model.tiny.patch_size=14",
       "model.tiny.vision_hidden=384", "model.tiny.vision_layers=12", "model.tiny.vision_heads=6",
       "model.tiny.vision_intermediate=1536", "model.tiny.text_hidden=512", "model.tiny.text_layers=8",
       "model.tiny.text_heads=8", "model.tiny.text_kv_heads=8", "model.tiny.text_intermediate=1376"]

SHAPES = {"world": [], "big": BIG}

BIG_TURNS = 13  # question-answer pairs per conversation: ~350 text tokens with the tiny tokenizer
BIG_RECORDS = 64
BIG_BATCH = 2


def training_overrides(shape: str) -> list[str]:
    """Hydra overrides of a shape's training benchmark run (`big` writes its conversations into the cache first)."""
    if shape == "world":
        return ["eval=none"]
    folder = cache_root() / "benchmarks" / "long-conversations-px224"
    path = long_conversations(folder, records=BIG_RECORDS, turns=BIG_TURNS, image_size=224)
    return [*SHAPES[shape], f"train.per_device_train_batch_size={BIG_BATCH}", "eval=none", "data=llava_json",
            f"data.path={path}", f"data.image_root={folder}"]


def long_conversations(folder: Path, *, records: int, turns: int, image_size: int, seed: int = 0) -> Path:
    """An LLaVA JSON of `records` image conversations of `turns` question-answer pairs each (written once).

    The synthetic instruct set's images and questions: each image record keeps its own questions first, then
    takes questions from the rest of the set in turn until it has `turns` pairs.
    """
    path = folder / f"long-{records}x{turns}.json"
    if path.exists():
        return path
    files = write_synthetic_llava(folder, n_caption=0, n_instruct=2 * records, seed=seed, image_size=image_size)
    source = json.loads(Path(files["instruct_json"]).read_text())
    pool = [(a["value"].removeprefix("<image>\n"), b["value"])
            for r in source for a, b in zip(r["conversations"][::2], r["conversations"][1::2])]
    rng = random.Random(seed)
    long = []
    for record in [r for r in source if "image" in r][:records]:
        turns_of = record["conversations"][:2 * turns]
        while len(turns_of) < 2 * turns:
            question, answer = rng.choice(pool)
            turns_of += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        long.append({**record, "conversations": turns_of})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(long, indent=1))
    os.replace(tmp, path)
    return path


def compose_run(overrides: list[str]) -> tuple[RunConfig, dict]:
    """(the run config, the composed dict the runner records) of the main config under `overrides`."""
    register_configs()
    with initialize_config_dir(config_dir=str(PACKAGE_CONF), version_base="1.3"):
        composed = compose(config_name="config", overrides=overrides)
    return to_run_config(composed), OmegaConf.to_container(composed, resolve=True)
