"""benchmarks/shapes.py: the shapes the benchmarks share, and the long conversations the big shape trains on."""

from __future__ import annotations

import json

from conftest import load_benchmark

shapes = load_benchmark("shapes")


def test_long_conversations_keep_their_own_turns_first_and_are_written_once(tmp_path):
    path = shapes.long_conversations(tmp_path, records=4, turns=5, image_size=32)
    records = json.loads(path.read_text())
    source = [r for r in json.loads((tmp_path / "instruct.json").read_text()) if "image" in r]
    assert len(records) == 4
    for record, own in zip(records, source):
        turns = record["conversations"]
        assert record["image"] == own["image"] and (tmp_path / record["image"]).is_file()
        assert [t["from"] for t in turns] == ["human", "gpt"] * 5
        kept = own["conversations"][:10]
        assert turns[: len(kept)] == kept  # the record's own questions first
        assert turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in turns) == 1  # borrowed questions leave their marker behind
    written = path.stat().st_mtime_ns
    assert shapes.long_conversations(tmp_path, records=4, turns=5, image_size=32) == path
    assert path.stat().st_mtime_ns == written
    assert [p.name for p in tmp_path.glob(".*tmp*")] == []


def test_training_overrides_compose_each_shape():
    world, _ = shapes.compose_run(shapes.training_overrides("world"))
    assert (world.data.name, world.eval.tasks, world.train.per_device_train_batch_size) == (
        "tiny_world_instruct", [], 16)
    big, _ = shapes.compose_run(shapes.training_overrides("big"))
    tiny = big.model.tiny
    assert (tiny.image_size // tiny.patch_size) ** 2 == 256
    assert (tiny.vision_hidden, tiny.vision_layers, tiny.text_hidden, tiny.text_layers) == (384, 12, 512, 8)
    assert big.train.per_device_train_batch_size == 2 and big.model.max_length == 1024
    records = json.loads(open(big.data.path).read())
    assert len(records) == shapes.BIG_RECORDS
    assert {len(r["conversations"]) for r in records} == {2 * shapes.BIG_TURNS}
