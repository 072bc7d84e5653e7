"""The tiny world's shipped components: they load, they are what their recipe builds (hash), the LM reads
boards as its metadata says, and a build is deterministic."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

from vlmablate.world import components, language
from vlmablate.world.reader import probe_set
from vlmablate.world.reading import Encoder, reading_probe

TINY = {"vision": {"n_images": 200, "epochs": 1, "n_probe": 50},
        "lm": {"hidden": 32, "layers": 4, "heads": 2, "kv_heads": 2, "intermediate": 64, "steps": 6, "eval_every": 3,
               "probe_per_kind": 2, "reading": {"curriculum_steps": 3}},
        "probe_per_kind": 4}


@pytest.fixture(scope="module")
def shipped():
    return components.shipped_folder()


def test_shipped_components_are_what_their_recipe_builds(shipped):
    meta = json.loads((shipped / "meta.json").read_text())
    assert meta["hash"] == components.config_hash(components.shipped_config())
    assert meta["config"] == json.loads(json.dumps(components.dataclasses.asdict(components.shipped_config())))
    size = sum(p.stat().st_size for p in shipped.rglob("*") if p.is_file())
    assert size <= 25 * 2**20
    vision = CLIPVisionModel.from_pretrained(shipped / "vision")
    lm = LlamaForCausalLM.from_pretrained(shipped / "llm")
    assert vision.config.patch_size == 16 and vision.config.image_size == 64
    assert lm.config.hidden_size == meta["config"]["lm"]["hidden"]
    assert meta["lm"]["params"] == sum(p.numel() for p in lm.parameters())
    assert meta["seconds"] > 0 and meta["vision"]["colour_acc"] > 0.99 and meta["vision"]["shape_acc"] > 0.99


def test_the_shipped_lm_reads_boards_as_its_metadata_says(shipped):
    meta = json.loads((shipped / "meta.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(shipped / "llm")
    lm = LlamaForCausalLM.from_pretrained(shipped / "llm").eval()
    board = components.load_board(shipped)
    enc = Encoder(tokenizer)
    recipe = components.shipped_config().lm
    every_kind = components.dataclasses.replace(
        recipe, reading=components.dataclasses.replace(recipe.reading, kinds=language.CATEGORIES))
    items = probe_set(enc, every_kind, seed=2, n_per_kind=25)  # boards neither the build nor its probe used
    assert list(items) == list(meta["reading_probe"]["image"])
    image = reading_probe(lm, board, enc, items)
    blank = reading_probe(lm, board, enc, items, blank=True)
    for kind in items:  # 25 questions per kind: about +-0.1 around the 200-question figure in the metadata
        assert image[kind] >= meta["reading_probe"]["image"][kind] - 0.2, (kind, image[kind])
    assert sum(image.values()) / len(items) >= sum(meta["reading_probe"]["image"].values()) / len(items) - 0.06
    read = [k for k in items if k.split("@")[0] in recipe.reading.kinds]  # the kinds its corpus asks
    assert sum(image[k] - blank[k] for k in read) >= 0.3 * len(read)


def test_a_test_size_build_is_deterministic(tmp_path):
    cfg = components._replace(components.shipped_config(), TINY, "test")
    metas = [components.build_components(cfg, tmp_path / name, progress=False) for name in ("a", "b")]
    for meta in metas:
        meta.pop("seconds")
        meta["vision"].pop("train_seconds")
        meta["lm"].pop("train_seconds")
        for entry in meta["lm"]["history"]:
            entry.pop("seconds")
    assert metas[0] == metas[1]
    assert [h["step"] for h in metas[0]["lm"]["history"]] == [3, 6]
    for weights in ("vision/model.safetensors", "llm/model.safetensors", "board.safetensors"):
        a, b = (load_file(str(tmp_path / name / weights)) for name in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), weights
    assert metas[0]["hash"] == components.config_hash(cfg) != components.config_hash(components.shipped_config())


def test_the_script_writes_a_folder_its_loaders_read(tmp_path, capsys):
    sets = [f"{part}.{k}={v}" for part in ("vision", "lm") for k, v in TINY[part].items() if k != "reading"]
    sets += ["lm.reading.curriculum_steps=3", "probe_per_kind=4", "lm.reading.kinds=colour,shape"]
    meta = components.main(["--out", str(tmp_path / "out"), *sum((["--set", s] for s in sets), [])])
    # the final probe asks every kind in every format of the corpus, the ones this corpus lacks included
    assert list(meta["reading_probe"]["image"]) == [*language.CATEGORIES, *(f"{k}@choice" for k in language.CATEGORIES)]
    assert f"components {meta['hash']} written to {tmp_path / 'out'}" in capsys.readouterr().out
    board = components.load_board(tmp_path / "out")
    assert board.place.shape == (16, 32) and board.empty.shape == (32,)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_vision_only_rebuilds_the_tower_and_keeps_the_language_model(tmp_path, capsys):
    sets = sum((["--set", f"{part}.{k}={v}"] for part in ("vision", "lm") for k, v in TINY[part].items()
                if k != "reading"), []) + ["--set", "lm.reading.curriculum_steps=3", "--set", "probe_per_kind=4"]
    out = tmp_path / "out"
    first = components.main(["--out", str(out), *sets])
    kept = {name: (out / name).read_bytes() for name in ("llm/model.safetensors", "board.safetensors")}
    tower = (out / "vision" / "model.safetensors").read_bytes()
    second = components.main(["--out", str(out), "--vision-only", *sets, "--set", "vision.seed=1"])
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert (out / "vision" / "model.safetensors").read_bytes() != tower
    assert second["config"]["vision"]["seed"] == 1 and second["hash"] != first["hash"]
    assert second["lm_from"] == {"hash": first["hash"], "seconds": first["seconds"]}
    assert (second["lm"], second["reading_probe"]) == (first["lm"], first["reading_probe"])
    assert json.loads((out / "meta.json").read_text()) == json.loads(json.dumps(second))
    with pytest.raises(components.ConfigError, match="another LM recipe"):
        components.main(["--out", str(out), "--vision-only", *sets, "--set", "lm.steps=7"])
    with pytest.raises(SystemExit, match="there is none there"):
        components.main(["--out", str(tmp_path / "empty"), "--vision-only"])
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_bad_script_settings_are_named():
    with pytest.raises(components.ConfigError, match=r"--set.lm has no field\(s\) \['bogus'\]"):
        components.main(["--set", "lm.bogus=1"])
    with pytest.raises(SystemExit, match="--set wants FIELD=VALUE"):
        components.main(["--set", "lm.steps"])
