"""The tiny world's text and data files: determinism, the public formats, held-out scenes, caching."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoProcessor

from vlmablate.data.dataset import LlavaJsonDataset, load_llava_json
from vlmablate.data.templates import fully_masked
from vlmablate.model.tiny import TinySpec, save_tiny_checkpoint
from vlmablate.world import data as world_data
from vlmablate.world import language
from vlmablate.world.data import MMBENCH_COLUMNS, WorldSizes, write_world_data
from vlmablate.world.scenes import Scene, position, quadrant, sample_scene, scene_rng

SIZES = WorldSizes(n_caption=200, n_instruct=150, n_bench=40, n_vqa=20)
CATEGORY = {"existence": "existence", "colour": "attribute_recognition", "shape": "shape_recognition",
            "counting": "object_counting", "position": "object_localization",
            "spatial": "spatial_relationship", "size": "size_recognition", "fill": "fill_recognition",
            "mark": "mark_recognition"}
L2 = {"existence": "CP", "attribute_recognition": "FP-S", "shape_recognition": "FP-S",
      "object_localization": "FP-S", "size_recognition": "FP-S", "fill_recognition": "FP-S",
      "spatial_relationship": "FP-C", "object_counting": "FP-C", "mark_recognition": "FP-S"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world_data(tmp_path_factory.mktemp("world") / "w", seed=0, sizes=SIZES, progress=False)


@pytest.fixture(scope="module")
def root(world):
    return Path(world["image_root"])


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), TinySpec(image_size=64, patch_size=16))
    return AutoProcessor.from_pretrained(folder)


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def scene_log(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "scenes.jsonl").read_text().splitlines()]


def bench_rows(root: Path) -> list[dict]:
    with open(root / "mmbench_dev.tsv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        assert tuple(reader.fieldnames) == MMBENCH_COLUMNS
        return list(reader)


def options_of(row: dict) -> list[str]:
    return [row[letter] for letter in "ABCD" if row[letter] != ""]


# --- determinism and caching ------------------------------------------------------------------------


def test_same_seed_gives_identical_files_and_another_seed_differs(world, root, tmp_path):
    again = write_world_data(tmp_path / "again", seed=0, sizes=SIZES, progress=False)
    other = write_world_data(tmp_path / "other", seed=1, sizes=SIZES, progress=False)
    hashes = file_hashes(root)
    assert len(hashes) == 200 + world["meta"]["counts"]["instruct"]["images"] + 20 + 6  # six files beside the images
    assert file_hashes(Path(again["image_root"])) == hashes
    assert Path(other["caption_json"]).read_bytes() != Path(world["caption_json"]).read_bytes()


def test_second_call_reuses_the_folder_and_new_sizes_regenerate(tmp_path):
    folder = tmp_path / "w"
    small = WorldSizes(n_caption=20, n_instruct=10, n_bench=8, n_vqa=8)
    first = write_world_data(folder, seed=3, sizes=small, progress=False)
    stamps = {name: (folder / name).stat().st_mtime_ns for name in ("meta.json", "pretrain.json")}
    second = write_world_data(folder, seed=3, sizes=small, progress=False)
    assert second == first
    assert {name: (folder / name).stat().st_mtime_ns for name in stamps} == stamps
    bigger = write_world_data(folder, seed=3, sizes=WorldSizes(n_caption=30, n_instruct=10, n_bench=8, n_vqa=8),
                              progress=False)
    assert bigger["meta"]["sizes"]["n_caption"] == 30
    assert len(load_llava_json(folder / "pretrain.json")) == 30
    assert len(list((folder / "images" / "train").iterdir())) == 30 + bigger["meta"]["counts"]["instruct"]["images"]
    assert [p.name for p in tmp_path.iterdir()] == ["w"]  # no building or old folders left behind


def test_a_failed_run_leaves_no_folder(tmp_path, monkeypatch):
    def broken(scene):
        raise RuntimeError("killed half way")

    monkeypatch.setattr(language, "describe", broken)
    with pytest.raises(RuntimeError, match="half way"):
        write_world_data(tmp_path / "w", seed=0, sizes=SIZES, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_folder_that_is_not_a_world(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_world_data(tmp_path / "w", seed=0, sizes=WorldSizes(10, 10, 8, 8), progress=False)
    assert (tmp_path / "w" / "precious.txt").read_text() == "keep me"


# --- LLaVA JSON ---------------------------------------------------------------------------------------


def test_pretrain_json_is_llava_layout_and_encodes_plain(world, root, processor):
    records = load_llava_json(world["caption_json"])
    assert records == json.loads(Path(world["caption_json"]).read_text())
    assert len(records) == 200 and len({r["id"] for r in records}) == 200
    log = {entry["image"]: Scene.from_dict(entry["scene"]) for entry in scene_log(root)}
    for r in records:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert all(language.colour_shape(o) in gpt["value"] for o in log[r["image"]].objects)
    dataset = LlavaJsonDataset(records, source_path=world["caption_json"], image_root=root,
                               processor=processor, template="plain", max_length=512)
    encoded = [dataset[i] for i in range(len(dataset))]
    assert all(e["n_image_tokens"] == 16 and not fully_masked(e["labels"]) for e in encoded)


def test_instruct_json_mixes_kinds_and_encodes_chat(world, root, processor):
    records = load_llava_json(world["instruct_json"])
    counts = world["meta"]["counts"]["instruct"]
    assert len(records) == 150 and len({r["id"] for r in records}) == 150
    text_only = [r for r in records if "image" not in r]
    multi = [r for r in records if "image" in r and len(r["conversations"]) >= 4]
    assert len(text_only) == world["meta"]["n_text_only"] > 0 and len(multi) >= counts["multi_turn"] > 0
    for r in records:
        markers = [turn["value"].count("<image>") for turn in r["conversations"]]
        assert markers == ([1] + [0] * (len(markers) - 1) if "image" in r else [0] * len(markers))
        assert "image" not in r or r["conversations"][0]["value"].startswith("<image>\n")
    dataset = LlavaJsonDataset(records, source_path=world["instruct_json"], image_root=root,
                               processor=processor, template="chat", max_length=512)
    encoded = [dataset[i] for i in range(len(dataset))]
    assert all(not fully_masked(e["labels"]) for e in encoded)
    assert sum(e["pixel_values"] is None for e in encoded) == len(text_only)


def test_instruct_questions_are_balanced_and_images_disjoint_from_pretrain(world):
    per_category = world["meta"]["counts"]["instruct"]["questions_per_category"]
    assert set(per_category) == set(language.CATEGORIES)
    mean = sum(per_category.values()) / len(per_category)
    assert all(0.75 * mean <= n <= 1.25 * mean for n in per_category.values()), per_category
    pretrain = {r["image"] for r in load_llava_json(world["caption_json"])}
    instruct = {r["image"] for r in load_llava_json(world["instruct_json"]) if "image" in r}
    assert not pretrain & instruct and len(instruct) == world["meta"]["counts"]["instruct"]["images"]


# --- MMBench TSV --------------------------------------------------------------------------------------


def test_mmbench_tsv_has_the_schema_and_circular_copies(root):
    rows = bench_rows(root)
    mains = {int(r["index"]): r for r in rows if int(r["index"]) < 1_000_000}
    assert sorted(mains) == list(range(40))
    assert len(rows) == sum(len(options_of(r)) for r in mains.values())
    for row in rows:
        q, k = int(row["index"]) % 1_000_000, int(row["index"]) // 1_000_000
        main = mains[q]
        options = options_of(main)
        assert len(options) in (2, 4) and (len(options) == 4 or row["C"] == row["D"] == "")
        assert 0 <= k < len(options)
        assert options_of(row) == options[k:] + options[:k]
        assert row[row["answer"]] == main[main["answer"]]
        assert (row["question"], row["hint"], row["category"]) == (main["question"], main["hint"], main["category"])
        assert row["l2-category"] == L2[row["category"]] and row["split"] == "dev"
        if k:
            assert row["image"] == str(q)
    for row in mains.values():
        image = Image.open(io.BytesIO(base64.b64decode(row["image"])))
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)
    # categories in turn: 40 questions over 9 categories, the first four get a fifth
    assert Counter(r["category"] for r in mains.values()) == {CATEGORY[c]: 5 if i < 4 else 4
                                                              for i, c in enumerate(language.CATEGORIES)}
    assert len({r["answer"] for r in mains.values()}) > 1  # the correct option moves around
    assert 0 < sum(r["hint"] != "" for r in mains.values()) < 40


def test_mmbench_answers_agree_with_the_scene(root):
    """Check the questions whose wording names one object against the scene behind the image."""
    scenes = {entry["image"]: Scene.from_dict(entry["scene"]) for entry in scene_log(root)}
    checked = 0
    for row in bench_rows(root):
        if int(row["index"]) >= 1_000_000:
            continue
        scene = scenes[f"mmbench_dev.tsv#{row['index']}"]
        by_name = {language.colour_shape(o): o for o in scene.objects}
        answer = row[row["answer"]]
        named = [by_name[m] for m in re.findall(r"the (\w+ \w+)\b", row["question"]) if m in by_name]
        o = named[0] if named else None
        if row["category"] == "size_recognition":
            assert answer == o.size
        elif row["category"] == "fill_recognition":
            assert answer == o.fill
        elif row["category"] == "mark_recognition":
            assert answer == o.mark
        elif row["category"] == "object_localization":
            assert answer == quadrant(o)
        elif row["question"] in ("How many shapes are there?", "How many shapes are in the image?"):
            assert answer == str(len(scene.objects))
        else:
            continue
        checked += 1
    assert checked >= 15


# --- held out and TextVQA ------------------------------------------------------------------------------


def test_benchmark_scenes_never_appear_in_training(root):
    log = scene_log(root)
    keys = {split: [Scene.from_dict(e["scene"]).key for e in log if e["split"] == split]
            for split in ("train", "bench", "vqa")}
    assert (len(keys["train"]), len(keys["bench"]), len(keys["vqa"])) == (len(log) - 60, 40, 20)
    assert not set(keys["train"]) & (set(keys["bench"]) | set(keys["vqa"]))
    assert len(set(keys["bench"])) == 40 and len(set(keys["vqa"])) == 20


def vqa_normalise(answer: str) -> str:
    """The parts of the standard VQA normalisation that the generated answers exercise."""
    words = answer.lower().replace(".", " ").split()
    digits = {w: str(i) for i, w in enumerate(language.NUMBER_WORDS)}
    return " ".join(digits.get(w, w) for w in words if w not in ("a", "an", "the"))


def test_textvqa_json_has_ten_answers_with_the_canonical_majority(world, root):
    doc = json.loads(Path(world["vqa_json"]).read_text())
    assert (doc["dataset_type"], doc["dataset_name"], len(doc["data"])) == ("val", "tiny_world_vqa", 20)
    disagreeing = 0
    for item in doc["data"]:
        assert item["image"] == f"images/vqa/{item['image_id']}.png" and (root / item["image"]).is_file()
        assert len(item["answers"]) == 10 and item["ocr_tokens"] == []
        raw_top = Counter(item["answers"]).most_common(2)
        assert raw_top[0][0] == item["canonical_answer"] and (len(raw_top) == 1 or raw_top[1][1] < raw_top[0][1])
        normalised = Counter(vqa_normalise(a) for a in item["answers"])
        canonical = vqa_normalise(item["canonical_answer"])
        assert normalised.most_common(1)[0][0] == canonical and normalised[canonical] >= 7
        disagreeing += len(normalised) > 1
    assert [item["question_id"] for item in doc["data"]] == list(range(20))
    assert 0 < disagreeing < 20


# --- language ---------------------------------------------------------------------------------------------


def test_questions_are_consistent_with_their_scenes():
    for i in range(300):
        scene = sample_scene(scene_rng(7, "test", i))
        items = language.questions(scene, random.Random(i))
        assert [it["category"] for it in items] == [c for c in language.CATEGORIES
                                                    if c != "spatial" or len(scene.objects) > 1]
        for it in items:
            assert it["answer"] in it["options"] and len(set(it["options"])) == len(it["options"])
            two = it["category"] in ("existence", "size", "fill", "mark") or it["answer"] in ("yes", "no")
            assert len(it["options"]) == (2 if two else 4), it
        counting = next(it for it in items if it["category"] == "counting")
        if counting["question"].startswith("How many shapes"):
            assert counting["answer"] == str(len(scene.objects))
        mark = next(it for it in items if it["category"] == "mark")
        (o,) = [o for o in scene.objects if language.cell(o) in mark["cells"]]
        assert mark["answer"] == o.mark and f"the {language.colour_shape(o)}" in mark["question"]
        existence = next(it for it in items if it["category"] == "existence")
        thing = re.search(r"\ban? (\w+ \w+)", existence["question"]).group(1)
        present = thing in {language.colour_shape(o) for o in scene.objects}
        assert existence["answer"] == ("yes" if present else "no")


def test_description_names_every_attribute_and_the_count():
    scene = sample_scene(scene_rng(0, "test", 0))
    text = language.describe(scene)
    assert language.count_phrase(len(scene.objects), "shape") in text
    assert {o.mark for o in scene.objects} == {"plain", "dotted"}  # this scene has both
    for o in scene.objects:
        dot = " with a dot in the middle" if o.mark == "dotted" else ""
        assert f"{language.full_name(o)}{dot} is at the {position(o)}, in the {quadrant(o)} quarter" in text


def test_text_only_facts_are_true():
    words = {w: i for i, w in enumerate(language.NUMBER_WORDS)}
    ops = {"plus": lambda x, y: x + y, "minus": lambda x, y: x - y, "times": lambda x, y: x * y}
    checked = 0
    for i in range(400):
        for question, answer in language.text_only_dialogue(random.Random(i)):
            match = re.fullmatch(r"What is (\w+) (plus|minus|times) (\w+)\?", question)
            if match:
                result = ops[match.group(2)](words[match.group(1)], words[match.group(3)])
                assert answer.rstrip(".").split()[-1].lower() == language.NUMBER_WORDS[result]
                checked += 1
    assert checked > 20
    assert language.text_only_dialogue(random.Random(5)) == language.text_only_dialogue(random.Random(5))


def test_unknown_category_is_an_error():
    with pytest.raises(ValueError, match="unknown question category"):
        language.question(sample_scene(scene_rng(0, "test", 0)), "colour_of_sky", random.Random(0))
    assert world_data.MMBENCH_CATEGORY == CATEGORY


# --- stage 2's question weights ------------------------------------------------------------------------


def test_question_weights_shift_stage_two_and_leave_the_benchmarks_alone(tmp_path, world):
    weighted = write_world_data(tmp_path / "w", seed=0, sizes=SIZES, progress=False,
                                weights={"mark": 3, "counting": 3})
    plain_counts = world["meta"]["counts"]["instruct"]["questions_per_category"]
    counts = weighted["meta"]["counts"]["instruct"]["questions_per_category"]
    assert sum(counts.values()) == sum(plain_counts.values())  # the same records, other questions
    # each weighted kind is asked three times as often as an unweighted one that every scene can carry
    for kind in ("mark", "counting"):
        assert counts[kind] == pytest.approx(3 * counts["colour"], abs=3)
    assert max(plain_counts.values()) - min(plain_counts[c] for c in plain_counts if c != "spatial") <= 1
    assert weighted["meta"]["question_weights"] == {**{c: 1.0 for c in language.CATEGORIES}, "mark": 3.0,
                                                    "counting": 3.0}
    folder = Path(weighted["image_root"])
    for name in ("mmbench_dev.tsv", "textvqa_val.json", "pretrain.json"):
        assert (folder / name).read_bytes() == (Path(world["image_root"]) / name).read_bytes(), name
    # the default weights are the world as it was: the cached meta matches, nothing is rebuilt
    assert write_world_data(Path(world["image_root"]), seed=0, sizes=SIZES, progress=False,
                            weights={c: 1 for c in language.CATEGORIES})["meta"] == world["meta"]


def test_question_weights_are_checked():
    from conftest import compose_run

    from vlmablate.config import ConfigError, validate

    with pytest.raises(ValueError, match="unknown categories \\['marks'\\]"):
        world_data.question_weights({"marks": 2})
    with pytest.raises(ValueError, match="positive"):
        world_data.question_weights({"mark": 0})
    from vlmablate.config import QUESTION_WEIGHTS

    assert tuple(QUESTION_WEIGHTS) == language.CATEGORIES and set(QUESTION_WEIGHTS.values()) == {1.0}
    cfg, _ = compose_run("world.question_weights.mark=0")
    with pytest.raises(ConfigError, match="world.question_weights: weights must be > 0, got \\{'mark': 0.0\\}"):
        validate(cfg)
    cfg, _ = compose_run("world.question_weights={counting:3,mark:3}")
    validate(cfg)
    assert dict(cfg.world.question_weights) == {**QUESTION_WEIGHTS, "counting": 3.0, "mark": 3.0}
    with pytest.raises(Exception, match="marks"):  # a category that does not exist fails at compose time
        compose_run("world.question_weights.marks=2")
