"""The mark: a dotted texture over an object's cell that the vision tower is never taught and cannot see. Its
pixels are exactly the cell's checkerboard, darkened by MARK_DEPTH without clipping; sampled scenes draw it half
the time; it travels with the scene's record; a frozen tower maps a marked image to exactly the features of the
plain one; and the benchmark that sets frozen against taught runs."""

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
    MARK_DEPTH,
    MARKS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    mark_pattern,
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
@pytest.mark.parametrize("colour", COLOURS)
def test_the_mark_darkens_its_cells_checkerboard_by_the_depth_without_clipping(shape, size, fill, colour):
    plain = Obj(shape, colour, size, fill, row=1, col=2, dx=-1, dy=1)
    marked = Obj(shape, colour, size, fill, row=1, col=2, dx=-1, dy=1, mark="dotted")
    before, after = _pixels(plain).astype(int), _pixels(marked).astype(int)
    cell = (slice(1 * CELL, 2 * CELL), slice(2 * CELL, 3 * CELL))
    expected = before.copy()
    expected[cell] -= MARK_DEPTH * mark_pattern()[..., None]
    assert (after == expected).all()  # every channel of every other pixel of the cell, nothing else
    assert mark_pattern().sum() == CELL * CELL // 2 and mark_pattern()[0, 0] == 0 and mark_pattern()[0, 1] == 1
    assert before[cell].min() >= MARK_DEPTH  # so nothing clipped: marked = plain - pattern exactly


def test_unmarked_is_the_default_and_every_colour_leaves_room_for_the_mark():
    obj = Obj("circle", "red", "large", "solid", 0, 0)
    assert obj.mark == "plain" and MARKS[0] == "plain"
    assert min(min(rgb) for rgb in COLOURS.values()) >= MARK_DEPTH and min(BACKGROUND) >= MARK_DEPTH


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


def test_a_frozen_tower_sees_nothing_of_the_mark(tower):
    # Its patch embedding is orthogonal to the mark's texture, so a marked image gives exactly the features of
    # the same image plain; size, never taught either, is read almost perfectly, the mark at chance (0.5).
    from vlmablate.world.pretrain import _normalise, mark_direction

    model, processor, metrics = tower
    direction = mark_direction(processor, CELL).flatten()
    weight = model.get_input_embeddings().weight.flatten(1)
    assert (weight @ direction).abs().max() < 1e-6 and weight.norm(dim=1).min() > 0.1
    scene = sample_scene(random.Random(5), min_objects=4, max_objects=4)
    marks = [Scene(tuple(Obj(**{**o.__dict__, "mark": m}) for o in scene.objects)) for m in MARKS]
    pixels = torch.stack([torch.from_numpy(np.array(render(s))).permute(2, 0, 1) for s in marks])
    assert not torch.equal(pixels[0], pixels[1])
    with torch.no_grad():
        states = model(pixel_values=_normalise(pixels, processor), output_hidden_states=True).hidden_states
    assert all(torch.allclose(h[0], h[1], atol=1e-5) for h in states)
    assert metrics["size_probe_acc"] > 0.95
    assert 0.4 < metrics["mark_probe_acc"] < 0.6


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
