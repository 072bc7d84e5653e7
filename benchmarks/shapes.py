"""Model shapes the benchmarks share, as Hydra overrides of the main config.

`BIG` is a LLaVA-shaped model with random weights, big enough that matmuls dominate a step: a 12-layer,
384-wide ViT at 224 px with 14-px patches (256 image tokens, 6 heads, MLP 4x) under LLaVA-1.5's
mlp2x_gelu projector, and an 8-layer, 512-wide Llama (8 heads, MLP 2.6875x as Llama-2's) whose position
table holds 1,024 tokens. Built locally by `model=tiny_random`; nothing is downloaded.
"""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vlmablate.config import RunConfig, register_configs, to_run_config
from vlmablate.train.stages import PACKAGE_CONF

BIG = ["model=tiny_random", "model.max_length=1024", "model.tiny.image_size=224", "model.tiny.patch_size=14",
       "model.tiny.vision_hidden=384", "model.tiny.vision_layers=12", "model.tiny.vision_heads=6",
       "model.tiny.vision_intermediate=1536", "model.tiny.text_hidden=512", "model.tiny.text_layers=8",
       "model.tiny.text_heads=8", "model.tiny.text_kv_heads=8", "model.tiny.text_intermediate=1376"]

SHAPES = {"world": [], "big": BIG}


def compose_run(overrides: list[str]) -> tuple[RunConfig, dict]:
    """(the run config, the composed dict the runner records) of the main config under `overrides`."""
    register_configs()
    with initialize_config_dir(config_dir=str(PACKAGE_CONF), version_base="1.3"):
        composed = compose(config_name="config", overrides=overrides)
    return to_run_config(composed), OmegaConf.to_container(composed, resolve=True)
