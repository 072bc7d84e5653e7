"""The tiny world's build: components built once per recipe into the cache as plain HF folders that learnt,
the same components for every `world.seed`, rebuilds on a new generator version, and no half-built
components after a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
from conftest import compose_run
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

from vlmablate.config import ConfigError
from vlmablate.world import build, components, language, pretrain
from vlmablate.world import data as world_data


@pytest.fixture(scope="module")
def world_cfg():
    return compose_run("world=test")[0].world


@pytest.fixture(scope="module")
def built(world_cfg):
    return build.ensure_world(world_cfg, progress=False)


def test_components_are_plain_hf_folders_that_learnt(world_cfg, built):
    meta = built.meta
    # Chance is 1/7 per cell (6 colours or empty); the test-size tower trains for seconds only.
    assert meta["vision"]["colour_acc"] > 0.5 and meta["vision"]["shape_acc"] > 0.5
    history = meta["lm"]["history"]
    assert [h["step"] for h in history] == [20, 40]
    assert history[1]["loss"] < 0.9 * history[0]["loss"]
    assert set(meta["reading_probe"]) == {"image", "blank"}
    # every kind, the ones no reading document asks included, in each answer format of the corpus
    assert meta["config"]["lm"]["reading"]["formats"] == ["short", "choice"]
    assert list(meta["reading_probe"]["image"]) == [*language.CATEGORIES, *(f"{k}@choice" for k in language.CATEGORIES)]
    assert isinstance(CLIPVisionModel.from_pretrained(built.vision), CLIPVisionModel)
    assert AutoImageProcessor.from_pretrained(built.vision).crop_size["height"] == 64
    lm = LlamaForCausalLM.from_pretrained(built.llm)
    assert (lm.config.hidden_size, lm.config.num_hidden_layers) == (64, 4)
    tokenizer = AutoTokenizer.from_pretrained(built.llm)
    assert "<image>" in tokenizer.get_vocab() and "USER:" in tokenizer.chat_template
    for weights in ("vision/model.safetensors", "llm/model.safetensors", "board.safetensors"):
        assert (built.root / weights).is_file()
    assert load_file(str(built.root / "board.safetensors"))["place"].shape == (16, 64)
    assert meta["hash"] == built.root.name == components.config_hash(components.components_config(world_cfg))


def test_second_call_reuses_the_cache(world_cfg, built, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the components were built again")

    monkeypatch.setattr(components, "build_components", fail)
    assert build.ensure_world(world_cfg, progress=False).root == built.root


def test_world_seed_changes_the_data_not_the_components(world_cfg, built):
    other = build.ensure_world(replace(world_cfg, seed=7), progress=False)
    assert other.root == built.root
    assert other.data["caption_json"] != built.data["caption_json"]
    captions = [json.loads(open(w.data["caption_json"]).read())[0]["conversations"][1]["value"] for w in (built, other)]
    assert captions[0] != captions[1]


class Stop(Exception):
    pass


def test_new_generator_version_rebuilds_and_a_failed_build_leaves_nothing(world_cfg, built, monkeypatch):
    monkeypatch.setattr(world_data, "GENERATOR_VERSION", world_data.GENERATOR_VERSION + 100)
    key = components.config_hash(components.components_config(world_cfg))
    assert key != built.root.name

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(pretrain, "pretrain_vision", stop)
    with pytest.raises(Stop):  # the new version is not in the cache, so it is built (and fails here)
        components.ensure_components(world_cfg, progress=False)
    leftovers = [p.name for p in built.root.parent.iterdir() if p.name.startswith(key) and not p.name.endswith(".lock")]
    assert leftovers == []


@pytest.mark.parametrize(("field", "value", "message"), [
    ("vision", {"bogus": 1}, r"world.vision has no field\(s\) \['bogus'\]"),
    ("lm", {"reading": {"kinds": ["colour", "bogus"]}}, r"world.lm.reading: bad reading config: kinds"),
    ("lm", {"reading": {"bogus": 1}}, r"world.lm.reading has no field\(s\) \['bogus'\]"),
    ("lm", {"layers": 2}, r"world.lm: .*name layers or heads a 2-layer, 6-head LM lacks"),
])
def test_bad_component_fields_are_config_errors(world_cfg, field, value, message):
    with pytest.raises(ConfigError, match=message):
        components.components_config(replace(world_cfg, **{field: value}))


def test_shipped_components_take_no_overrides(world_cfg):
    with pytest.raises(ConfigError, match="need world.components=build"):
        components.ensure_components(replace(world_cfg, components="shipped"))
    with pytest.raises(ConfigError, match="world.components is 'shipped' or 'build', not 'bogus'"):
        components.ensure_components(replace(world_cfg, components="bogus"))


@pytest.mark.slow
def test_two_processes_starting_at_once_build_the_components_once(tmp_path):
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
    meta = json.loads((tmp_path / "cache" / "components" / os.path.basename(roots[0]) / "meta.json").read_text())
    assert meta["built_by_pid"] in {p.pid for p in procs}
    assert not [p for p in (tmp_path / "cache" / "components").iterdir() if ".tmp" in p.name]
