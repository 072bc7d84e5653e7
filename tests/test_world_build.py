"""The tiny world's build: pretrained components that measurably learnt, one build per cache, rebuilds on
a new generator version, and no half-built world after a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

from vlmablate.config import ConfigError
from vlmablate.world import build, pretrain
from vlmablate.world import data as world_data

from conftest import compose_run


@pytest.fixture(scope="module")
def world_cfg():
    return compose_run("world=test")[0].world


@pytest.fixture(scope="module")
def built(world_cfg):
    return build.ensure_world(world_cfg, progress=False)


def test_components_are_plain_hf_folders_that_learnt(built):
    meta = built.meta
    vision = meta["vision"]["metrics"]
    # Chance is 1/7 per cell (6 colours or empty); the test-size world trains for seconds only.
    assert vision["colour_acc"] > 0.5 and vision["shape_acc"] > 0.5
    lm = meta["lm"]["metrics"]
    assert lm["ppl_after"] < 0.8 * lm["ppl_before"]
    assert isinstance(CLIPVisionModel.from_pretrained(built.vision), CLIPVisionModel)
    assert AutoImageProcessor.from_pretrained(built.vision).crop_size["height"] == 64
    assert isinstance(LlamaForCausalLM.from_pretrained(built.llm), LlamaForCausalLM)
    tokenizer = AutoTokenizer.from_pretrained(built.llm)
    assert "<image>" in tokenizer.get_vocab() and "USER:" in tokenizer.chat_template
    assert meta["key"] == built.root.name


def test_second_call_reuses_the_cache(world_cfg, built, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("pretraining ran again")

    monkeypatch.setattr(pretrain, "pretrain_vision", fail)
    monkeypatch.setattr(pretrain, "pretrain_language_model", fail)
    assert build.ensure_world(world_cfg, progress=False).root == built.root


class Stop(Exception):
    pass


def test_new_generator_version_rebuilds_and_a_failed_build_leaves_nothing(world_cfg, built, monkeypatch):
    monkeypatch.setattr(world_data, "GENERATOR_VERSION", world_data.GENERATOR_VERSION + 100)
    key = build.world_key(world_cfg)
    assert key != built.root.name

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(pretrain, "pretrain_vision", stop)
    with pytest.raises(Stop):  # the new version is not in the cache, so it is built (and fails here)
        build.ensure_world(world_cfg, progress=False)
    leftovers = [p.name for p in built.root.parent.iterdir() if p.name.startswith(key) and not p.name.endswith(".lock")]
    assert leftovers == []


def test_unknown_pretraining_field_is_a_config_error(world_cfg):
    from dataclasses import replace

    with pytest.raises(ConfigError, match=r"world.vision has no field\(s\) \['bogus'\]"):
        build.world_key(replace(world_cfg, vision={"bogus": 1}))


@pytest.mark.slow
def test_two_processes_starting_at_once_build_the_world_once(tmp_path):
    script = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, sys.argv[1])
        from conftest import compose_run
        from vlmablate.world.build import ensure_world
        world = compose_run("world=test", "world.seed=7")[0].world
        print(json.dumps({"root": str(ensure_world(world, progress=False).root)}))
    """)
    env = {**os.environ, "VLMABLATE_CACHE": str(tmp_path / "cache")}
    tests_dir = os.path.dirname(__file__)
    procs = [subprocess.Popen([sys.executable, "-c", script, tests_dir], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    roots = [json.loads(p.communicate()[0].strip().splitlines()[-1])["root"] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert roots[0] == roots[1]
    meta = json.loads((tmp_path / "cache" / "world" / os.path.basename(roots[0]) / "meta.json").read_text())
    assert meta["built_by_pid"] in {p.pid for p in procs}
    assert not [p for p in (tmp_path / "cache" / "world").iterdir() if ".tmp" in p.name]
