"""The mark: a dot of ink at an object's centre that the vision tower is never taught. Its pixels are exactly
where the object's centre is, sampled scenes draw it half the time, it travels with the scene's record, a
frozen test-size tower barely reads it, and the benchmark that sets frozen against taught runs."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import load_benchmark

from vlmablate.world.pretrain import TaughtReadingConfig, VisionPretrainConfig, pretrain_vision, taught_reading
from vlmablate.world.scenes import (
    BACKGROUND,
    CELL,
    COLOURS,
    FILLS,
    MARK_INK,
    MARKS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    render,
    sample_scene,
    scene_rng,
)


@pytest.fixture
def one_thread():
    """Training on one thread: on a busy 2-core machine a second thread costs more than it gives."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pixels(obj: Obj) -> np.ndarray:
    return np.asarray(render(Scene((obj,))))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("fill", FILLS)
def test_the_mark_is_two_by_two_pixels_of_ink_at_the_centre(shape, size, fill):
    plain = Obj(shape, "purple", size, fill, row=1, col=2, dx=-1, dy=1)
    marked = Obj(shape, "purple", size, fill, row=1, col=2, dx=-1, dy=1, mark="dotted")
    before, after = _pixels(plain), _pixels(marked)
    changed = np.argwhere((before != after).any(-1))
    cx, cy = 2 * CELL + CELL // 2 - 1, 1 * CELL + CELL // 2 + 1  # the object's centre pixel
    assert sorted(map(tuple, changed)) == [(cy - 1, cx - 1), (cy - 1, cx), (cy, cx - 1), (cy, cx)]  # (row, col)
    assert (after[cy - 1 : cy + 1, cx - 1 : cx + 1] == MARK_INK).all()
    # Visible whatever the fill: on the colour of a solid object, on the white inside an outline one.
    expected_under = COLOURS["purple"] if fill == "solid" else BACKGROUND
    assert (before[cy - 1 : cy + 1, cx - 1 : cx + 1] == expected_under).all()


def test_unmarked_is_the_default_and_draws_nothing_new():
    obj = Obj("circle", "red", "large", "solid", 0, 0)
    assert obj.mark == "plain" and MARKS[0] == "plain"
    assert not (_pixels(obj) == MARK_INK).all(-1).any()


def test_sample_scene_draws_both_marks_about_evenly():
    marks = Counter(o.mark for i in range(600) for o in sample_scene(scene_rng(0, "mark", i)).objects)
    assert set(marks) == set(MARKS)
    assert 0.45 < marks["dotted"] / sum(marks.values()) < 0.55


def test_the_mark_travels_with_the_scene_record_and_its_key():
    scene = sample_scene(random.Random(3), min_objects=3, max_objects=3)
    assert Scene.from_dict(scene.to_dict()) == scene
    flipped = Scene(
        tuple(Obj(**{**o.__dict__, "mark": "plain" if o.mark == "dotted" else "dotted"}) for o in scene.objects)
    )
    assert flipped.key != scene.key  # a scene differing only in its marks is another scene


@pytest.fixture(scope="module")
def tower():
    """A test-size tower (seconds) and its metrics."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine a second thread costs more than it gives
    cfg = VisionPretrainConfig(
        hidden=48, layers=2, heads=2, intermediate=96, n_images=1500, epochs=3, batch_size=32, lr=3e-3, n_probe=150
    )
    yield pretrain_vision(cfg, world_seed=0, progress=False)
    torch.set_num_threads(before)


def test_a_frozen_tower_barely_reads_the_mark(tower):
    # Size, never taught either, is read almost perfectly; the mark near chance (0.5; 0.60 when written).
    metrics = tower[2]
    assert metrics["size_probe_acc"] > 0.95
    assert 0.4 < metrics["mark_probe_acc"] < 0.7


def test_teaching_the_mark_leaves_the_given_tower_alone(tower):
    model, processor, _ = tower
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TaughtReadingConfig(n_images=64, steps=3, batch_size=16, n_eval=20)
    metrics = taught_reading(model, processor, cfg, world_seed=0, progress=False)
    assert set(metrics) == {"mark_taught_acc", "object_acc", "train_seconds"}
    assert 0 <= metrics["mark_taught_acc"] <= 1
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # a copy was taught
    with pytest.raises(ValueError, match="one of"):
        taught_reading(model, processor, cfg, world_seed=0, attribute="colour", progress=False)


def test_the_benchmark_runs_fast(one_thread, capsys):
    bench = load_benchmark("world_vision_mark")
    rows = bench.main(["--fast", "--seeds", "0,1"])
    assert [row["seed"] for row in rows] == [0, 1]
    for row in rows:
        for key in ("size_probe_acc", "fill_probe_acc", "mark_probe_acc", "mark_taught_acc"):
            assert 0 <= row[key] <= 1
    lines = capsys.readouterr().out.splitlines()
    assert "mark frozen" in lines[0] and "mark taught" in lines[0]
    assert [line.split("|")[0].strip() for line in lines[1:3]] == ["0", "1"]  # one line per seed, under one header


def test_the_shipped_towers_probes_are_its_recorded_ones(one_thread):
    # untaught_probes is the components' own frozen probe: on the shipped tower it gives what meta.json records
    import json

    from transformers import AutoImageProcessor, CLIPVisionModel

    from vlmablate.world.components import shipped_folder
    from vlmablate.world.pretrain import untaught_probes

    folder = shipped_folder()
    recorded = json.loads((folder / "meta.json").read_text())["vision"]
    tower = CLIPVisionModel.from_pretrained(folder / "vision")
    probes = untaught_probes(tower, AutoImageProcessor.from_pretrained(folder / "vision"), world_seed=0)
    for name in ("size_probe_acc", "fill_probe_acc", "mark_probe_acc"):
        assert probes[name] == pytest.approx(recorded[name], abs=0.005), name


def test_the_tower_probe_benchmark_reads_a_runs_trained_tower(tmp_path, one_thread, capsys):
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel

    from vlmablate.world.components import shipped_folder

    probe = load_benchmark("world_tower_probe")
    base = CLIPVisionModel.from_pretrained(shipped_folder() / "vision")
    # a LoRA run keeps its tower among its non-LoRA trainables, under the Llava model's prefix
    weights = {"model.vision_tower." + k: v * (1.5 if k == "post_layernorm.weight" else 1.0)
               for k, v in base.state_dict().items()}
    weights["model.multi_modal_projector.linear_1.weight"] = torch.zeros(2, 2)
    (tmp_path / "run" / "final").mkdir(parents=True)
    save_file(weights, tmp_path / "run" / "final" / "non_lora_trainables.safetensors")
    tower, moved = probe.trained_tower(base, tmp_path / "run")
    assert moved["tensors"] == len(base.state_dict()) and moved["median_change"] == 0.0
    assert moved["max_change"] == pytest.approx(0.5)
    assert torch.equal(tower.post_layernorm.weight, 1.5 * base.post_layernorm.weight)
    (tmp_path / "frozen" / "final").mkdir(parents=True)  # a frozen-tower run keeps no tower
    assert probe.trained_tower(base, tmp_path / "frozen") is None
