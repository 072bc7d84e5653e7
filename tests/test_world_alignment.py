"""benchmarks/world_alignment.py: the three views of a scene score what they should, and the nearest-cell
read-out finds every attribute when the projector hands the LM exactly the transcript's cells."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import compose_run, load_benchmark
from transformers import AutoTokenizer, LlamaForCausalLM

from vlmablate.world.build import ensure_world
from vlmablate.world.components import load_board
from vlmablate.world.reading import Encoder, probe_items, reading_probe, score_answers
from vlmablate.world.scenes import Obj, Scene


@pytest.fixture(scope="module")
def parts():
    paths = ensure_world(compose_run("world=test")[0].world, progress=False)
    enc = Encoder(AutoTokenizer.from_pretrained(paths.llm))
    return LlamaForCausalLM.from_pretrained(paths.llm).eval(), load_board(paths.root), enc


def test_nearest_cells_are_exact_when_the_projector_returns_the_transcript(parts):
    alignment = load_benchmark("world_alignment")
    lm, board, enc = parts
    scenes = [Scene((Obj("diamond", "red", "large", "solid", 0, 1),
                     Obj("circle", "blue", "small", "outline", 3, 3, mark="dotted"))),
              Scene((Obj("cross", "purple", "small", "solid", 2, 0),))]
    with torch.no_grad():
        transcript = board(lm.get_input_embeddings(), torch.stack([enc.vocab.cells(s) for s in scenes]))

    fake = SimpleNamespace(model=SimpleNamespace(
        get_image_features=lambda pixel_values: SimpleNamespace(pooler_output=list(transcript))))
    views = alignment.Views(fake, SimpleNamespace(image_processor=lambda images, return_tensors: {
        "pixel_values": torch.zeros(len(images))}), lm, board, enc)
    assert views.nearest_cells(scenes) == {"cell": 1.0, "size": 1.0, "colour": 1.0, "shape": 1.0, "fill": 1.0,
                                             "mark": 1.0, "place": 1.0}
    # Swapping the two objects' patches: the second scene's cross lands where nothing matches its place.
    fake.model.get_image_features = lambda pixel_values: SimpleNamespace(pooler_output=list(transcript.flip(0)))
    assert views.nearest_cells(scenes)["cell"] < 1.0
    # Each object's patch is its cell vector at the next place: the right objects, at the wrong places.
    moved = [Scene(tuple(Obj(o.shape, o.colour, o.size, o.fill, o.row, (o.col + 1) % 4, mark=o.mark)
                         for o in s.objects))
             for s in scenes]
    with torch.no_grad():
        elsewhere = board(lm.get_input_embeddings(), torch.stack([enc.vocab.cells(s) for s in moved]))
    patches = transcript.clone()
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            patches[i, o.row * 4 + o.col] = elsewhere[i, o.row * 4 + (o.col + 1) % 4]
    fake.model.get_image_features = lambda pixel_values: SimpleNamespace(pooler_output=list(patches))
    assert views.nearest_cells(scenes)["place"] == 0.0


def test_the_transcript_view_is_the_reading_probe(parts):
    alignment = load_benchmark("world_alignment")
    lm, board, enc = parts
    items = probe_items(enc, ("colour", "counting"), 6, seed=3)
    views = alignment.Views(None, None, lm, board, enc)
    scored = score_answers(lambda docs, ids, mask: views.logits("transcript", docs, ids, mask), enc, items)
    assert scored == reading_probe(lm, board, enc, items)


@pytest.mark.slow
def test_main_prints_the_three_views(capsys):
    alignment = load_benchmark("world_alignment")
    result = alignment.main(["--captions", "8", "--per-kind", "2", "world=test"])
    out = capsys.readouterr().out
    assert "caption loss on 8 held-out scenes: image" in out and "nearest cell vector right in: cell" in out
    assert set(result["reading"]) == {"image", "transcript", "empty"}
    assert all(len(r) == 18 for r in result["reading"].values())  # 9 kinds, short and in MMBench's layout
    assert result["stage1"].endswith("final/projector")
