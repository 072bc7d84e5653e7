"""Shared fixtures: one cache folder per test session (tiny checkpoints and synthetic data are built once)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from vlmablate.config import RunConfig, register_configs, to_run_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "src" / "vlmablate" / "conf"
register_configs()


@pytest.fixture(scope="session", autouse=True)
def vlmablate_cache(tmp_path_factory):
    """Point the project's cache at a session folder unless CI already chose one."""
    if "VLMABLATE_CACHE" in os.environ:
        yield Path(os.environ["VLMABLATE_CACHE"])
        return
    folder = tmp_path_factory.mktemp("vlmablate-cache")
    os.environ["VLMABLATE_CACHE"] = str(folder)
    yield folder
    del os.environ["VLMABLATE_CACHE"]


def compose_run(*overrides: str) -> tuple[RunConfig, dict]:
    """Compose exactly as `python -m vlmablate OVERRIDES` does; return the typed config and the plain one."""
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return to_run_config(cfg), OmegaConf.to_container(cfg, resolve=True)


def load_benchmark(name: str):
    """benchmarks/NAME.py imported as a module (the benchmarks are scripts, not a package), with its folder on
    the path as when it runs as a script, so that it finds its siblings (shapes.py)."""
    import importlib.util

    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Unless a test says otherwise: the tiny random Llava, a few steps, on the test-size tiny world's data.
TEST_DEFAULTS = ("world=test", "model=tiny_random", "train=cpu_tiny", "train.progress=false")


@pytest.fixture
def run_cell(tmp_path):
    """Run one training job in-process into tmp_path/<name>; return its summary."""
    from vlmablate.train.runner import run

    def _run(*overrides: str, name: str = "run") -> dict:
        overrides = (*TEST_DEFAULTS, *overrides)
        cfg, composed = compose_run(*overrides)
        return run(cfg, tmp_path / name, composed=composed, overrides=list(overrides))

    return _run


# The tiny Llava (64 px, 16 px patches) and the test world's files, shared by the evaluation tests.
@pytest.fixture(scope="module")
def world_files():
    from vlmablate.world.build import ensure_world_data

    return ensure_world_data(compose_run("world=test")[0].world, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmablate.model.tiny import TinySpec, save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), TinySpec(image_size=64, patch_size=16))
    return LlavaForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
