"""Tests for the tiny world's component pretraining, at test size (seconds): the vision encoder learns the
scenes, the language model learns its texts, both are deterministic, and both save to plain HF folders
that load back identically and that `model.source=compose` joins into a Llava model."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
)

from vlmablate.config import ModelConfig
from vlmablate.model.load import ensure_composed_checkpoint
from vlmablate.model.tiny import train_tiny_tokenizer
from vlmablate.world.pretrain import (
    LMPretrainConfig,
    VisionPretrainConfig,
    pretrain_language_model,
    pretrain_vision,
    save_language_model,
    save_vision,
)
from vlmablate.world.scenes import position, render, sample_scene, scene_rng

VISION = VisionPretrainConfig(hidden=64, layers=2, heads=2, intermediate=128, n_images=2000, epochs=4,
                              batch_size=32, lr=3e-3, n_probe=100)
LM = LMPretrainConfig(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, max_length=64, epochs=8,
                      batch_size=8, lr=5e-3)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- vision encoder ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision():
    rng_before = torch.get_rng_state()
    result = pretrain_vision(VISION, world_seed=0, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG stream is left alone
    return result


def test_vision_learns_colour_and_shape(vision):
    _, _, metrics = vision
    assert set(metrics) >= {"colour_acc", "shape_acc", "cell_acc", "object_acc", "size_probe_acc",
                            "fill_probe_acc", "train_seconds", "params"}
    # Chance is 1/7 for colour and 1/6 for shape, but ~80% of cells are empty and easy; object_acc counts
    # only cells with an object, where chance for both is 1/30.
    assert metrics["colour_acc"] > 0.95
    assert metrics["shape_acc"] > 0.9
    assert metrics["object_acc"] > 0.5
    assert metrics["cell_acc"] <= min(metrics["colour_acc"], metrics["shape_acc"])
    assert 0.5 <= metrics["size_probe_acc"] <= 1 and 0.5 <= metrics["fill_probe_acc"] <= 1  # two classes each


def test_a_place_head_keeps_where_an_object_is(vision):
    """Without the place head an object's patch loses its cell; with it a linear probe reads the cell back."""
    import dataclasses

    _, _, without = vision
    _, _, with_place = pretrain_vision(dataclasses.replace(VISION, place_loss=1.0), world_seed=0, progress=False)
    assert without["place_probe_acc"] < 0.5  # chance is 1/16
    assert with_place["place_probe_acc"] > 0.9
    assert with_place["colour_acc"] > 0.95 and with_place["shape_acc"] > 0.9


def test_vision_is_deterministic(vision):
    again, _, metrics = pretrain_vision(VISION, world_seed=0, progress=False)
    assert _same_weights(vision[0], again)
    assert {k: v for k, v in metrics.items() if k != "train_seconds"} == \
        {k: v for k, v in vision[2].items() if k != "train_seconds"}


def test_vision_rejects_patches_off_the_grid():
    with pytest.raises(ValueError, match="one patch per grid cell"):
        pretrain_vision(VisionPretrainConfig(patch_size=8), world_seed=0, progress=False)


def test_vision_save_round_trip(vision, tmp_path):
    model, processor, _ = vision
    save_vision(model, processor, tmp_path)
    loaded, loaded_processor = CLIPVisionModel.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)
    image = render(sample_scene(scene_rng(0, "test", 0)))
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(loaded_processor(image, return_tensors="pt")["pixel_values"], pixels)
    assert pixels.shape == (1, 3, 64, 64)
    with torch.inference_mode():
        ours = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        theirs = loaded(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


# --- language model ---------------------------------------------------------------------------------


def _caption(seed: int, split: str, i: int) -> str:
    objects = sample_scene(scene_rng(seed, split, i)).objects
    return "a picture of " + " and ".join(f"a {o.name} at the {position(o)}" for o in objects) + "."


@pytest.fixture(scope="module")
def corpus():
    """(tokenizer, ~200 training captions and dialogues, held-out ones) made from scenes."""
    train = [_caption(0, "lm_test", i) for i in range(160)]
    held_out = [_caption(0, "lm_test_held_out", i) for i in range(30)]
    tokenizer = train_tiny_tokenizer(400, " ".join(train[:50]))
    rng = random.Random(0)
    for _ in range(40):  # dialogues as the orchestrator renders them: chat template, ending in EOS
        colour = rng.choice(["red", "green", "blue"])
        messages = [{"role": "user", "content": f"Which colour is the {colour} circle?"},
                    {"role": "assistant", "content": f"The circle is {colour}."}]
        train.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return tokenizer, train, held_out


@pytest.fixture(scope="module")
def lm(corpus):
    tokenizer, train, held_out = corpus
    return pretrain_language_model(train, held_out, tokenizer, LM, progress=False)


def test_lm_learns(lm, corpus):
    model, metrics = lm
    assert set(metrics) >= {"ppl_before", "ppl_after", "train_seconds", "params", "train_tokens"}
    assert metrics["ppl_after"] < metrics["ppl_before"] / 20  # ~400 (a uniform guess) to a few
    assert model.config.vocab_size == len(corpus[0]) and not model.config.tie_word_embeddings


def test_lm_is_deterministic(lm, corpus):
    again, metrics = pretrain_language_model(*corpus[1:], corpus[0], LM, progress=False)
    assert _same_weights(lm[0], again)
    assert metrics["ppl_after"] == lm[1]["ppl_after"]


def test_lm_token_budget_caps_training(corpus):
    tokenizer, train, held_out = corpus
    _, metrics = pretrain_language_model(train, held_out, tokenizer,
                                         dataclasses.replace(LM, max_train_tokens=640), progress=False)
    assert 0 < metrics["train_tokens"] <= 640


def test_lm_save_round_trip(lm, corpus, tmp_path):
    model, tokenizer = lm[0], corpus[0]
    save_language_model(model, tokenizer, tmp_path)
    loaded, loaded_tokenizer = AutoModelForCausalLM.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    ids = loaded_tokenizer(corpus[2][0], return_tensors="pt")["input_ids"]
    assert ids.tolist() == tokenizer(corpus[2][0], return_tensors="pt")["input_ids"].tolist()
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# --- both together ------------------------------------------------------------------------------------


def test_saved_components_compose_into_llava(vision, lm, corpus, tmp_path):
    save_vision(vision[0], vision[1], tmp_path / "vision")
    save_language_model(lm[0], corpus[0], tmp_path / "llm")
    cfg = ModelConfig(name="tiny_world", source="compose", vision_checkpoint=str(tmp_path / "vision"),
                      llm_checkpoint=str(tmp_path / "llm"), cache_dir=str(tmp_path / "cache"))
    folder = ensure_composed_checkpoint(cfg, projector_type="mlp2x_gelu")
    model, processor = LlavaForConditionalGeneration.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(images=render(sample_scene(scene_rng(0, "test", 1))), text=text, return_tensors="pt")
    assert (batch["input_ids"] == model.config.image_token_index).sum().item() == 16  # one token per cell
    with torch.inference_mode():
        assert torch.isfinite(model(**batch).logits).all()
    assert _same_weights(model.model.vision_tower, vision[0])
