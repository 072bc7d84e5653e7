"""Tests for saving and loading the projector alone (the stage-1 artifact), including its checks."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model

from vlmablate.config import ConfigError, ModelConfig, QuantConfig, TinyModelConfig
from vlmablate.model.load import load_model, model_dims
from vlmablate.model.projector_io import (
    PROJECTOR_META,
    PROJECTOR_WEIGHTS,
    check_projector_shapes,
    load_projector,
    projector_state_dict,
    read_projector_meta,
    save_projector,
)
from vlmablate.model.tiny import TinySpec, build_tiny_llava, save_tiny_checkpoint, train_tiny_tokenizer

NAMES = ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


def _model(tokenizer, **spec):
    return build_tiny_llava(TinySpec(**spec), tokenizer)


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    """A projector saved from a tiny Llava (seed 0), with the source model."""
    model = _model(tokenizer, seed=0)
    folder = tmp_path_factory.mktemp("projector")
    meta = save_projector(model, folder, projector_type="mlp2x_gelu", extra={"run": "align-1", "step": 10})
    return model, folder, meta


def test_state_dict_names_are_relative_and_detached(saved):
    model, _, _ = saved
    state = projector_state_dict(model)
    assert sorted(state) == NAMES
    assert state["linear_1.weight"].shape == (64, 32) and state["linear_2.weight"].shape == (64, 64)
    weight = model.model.multi_modal_projector.linear_1.weight
    assert torch.equal(state["linear_1.weight"], weight)
    assert state["linear_1.weight"].data_ptr() != weight.data_ptr() and not state["linear_1.weight"].requires_grad


def test_save_writes_weights_and_meta(saved):
    _, folder, meta = saved
    assert sorted(os.listdir(folder)) == sorted([PROJECTOR_WEIGHTS, PROJECTOR_META])  # no temporary files left
    assert read_projector_meta(folder) == meta
    assert meta["projector_type"] == "mlp2x_gelu" and (meta["run"], meta["step"]) == ("align-1", 10)
    assert meta["shapes"] == {"linear_1.bias": [64], "linear_1.weight": [64, 32], "linear_2.bias": [64],
                              "linear_2.weight": [64, 64]}
    assert len(meta["sha256"]) == 64


def test_round_trip_is_bit_identical(tokenizer, saved):
    source, folder, meta = saved
    target = _model(tokenizer, seed=1)
    assert not torch.equal(target.model.multi_modal_projector.linear_1.weight,
                           source.model.multi_modal_projector.linear_1.weight)
    assert load_projector(target, folder, projector_type="mlp2x_gelu") == meta
    loaded, expected = projector_state_dict(target), projector_state_dict(source)
    assert all(torch.equal(loaded[name], expected[name]) for name in NAMES)


def test_load_casts_to_the_model_dtype(tokenizer, saved):
    source, folder, _ = saved
    target = _model(tokenizer, seed=1).to(torch.bfloat16)
    load_projector(target, folder, projector_type="mlp2x_gelu")
    weight = target.model.multi_modal_projector.linear_2.weight
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, source.model.multi_modal_projector.linear_2.weight.to(torch.bfloat16))


def test_peft_wrapped_model_uses_the_trained_copy(tokenizer, tmp_path):
    """With modules_to_save, PEFT trains a copy of the projector: that copy is saved and loaded."""
    config = LoraConfig(r=4, target_modules=r"model\.language_model\..*\.(q_proj|v_proj)",
                        modules_to_save=["multi_modal_projector"])
    wrapped = get_peft_model(_model(tokenizer, seed=0), config)
    wrapper = wrapped.base_model.model.model.multi_modal_projector
    with torch.no_grad():
        wrapper.modules_to_save["default"].linear_1.weight.fill_(0.5)
    state = projector_state_dict(wrapped)
    assert sorted(state) == NAMES and torch.all(state["linear_1.weight"] == 0.5)
    save_projector(wrapped, tmp_path, projector_type="mlp2x_gelu")

    target = get_peft_model(_model(tokenizer, seed=1), config)
    load_projector(target, tmp_path, projector_type="mlp2x_gelu")
    copy = target.base_model.model.model.multi_modal_projector.modules_to_save["default"]
    assert torch.all(copy.linear_1.weight == 0.5)


def test_shape_mismatch_names_both_shapes(tokenizer, saved):
    _, folder, _ = saved
    other = _model(tokenizer, text_hidden=96, text_intermediate=192)
    with pytest.raises(ConfigError) as err:
        load_projector(other, folder, projector_type="mlp2x_gelu")
    message = str(err.value)
    assert str(folder) in message and "linear_1.bias" in message
    assert "[64]" in message and "[96]" in message
    assert "vision hidden 32 / text hidden 64" in message and "vision hidden 32 / text hidden 96" in message
    # Nothing was copied before the check failed.
    assert other.model.multi_modal_projector.linear_1.weight.shape == (96, 32)


def test_type_mismatch_raises(tokenizer, saved):
    _, folder, _ = saved
    with pytest.raises(ConfigError, match="holds a mlp2x_gelu projector but this run builds a linear one"):
        load_projector(_model(tokenizer), folder, projector_type="linear")


def test_tampered_weights_fail_the_checksum(tokenizer, saved, tmp_path):
    _, folder, _ = saved
    for name in (PROJECTOR_WEIGHTS, PROJECTOR_META):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    data = bytearray((tmp_path / PROJECTOR_WEIGHTS).read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight
    (tmp_path / PROJECTOR_WEIGHTS).write_bytes(bytes(data))
    target = _model(tokenizer, seed=1)
    before = target.model.multi_modal_projector.linear_2.weight.clone()
    with pytest.raises(ConfigError, match="does not match its checksum"):
        load_projector(target, tmp_path, projector_type="mlp2x_gelu")
    assert torch.equal(target.model.multi_modal_projector.linear_2.weight, before)


def test_check_shapes_from_dims_alone(saved, tmp_path):
    _, folder, _ = saved

    def dims(**sizes):
        cfg = ModelConfig(name="tiny", source="tiny_random", cache_dir=str(tmp_path), tiny=TinyModelConfig(**sizes))
        return model_dims(cfg, projector_type="mlp2x_gelu")

    check_projector_shapes(folder, dims(), "mlp2x_gelu")  # the same sizes: fits
    with pytest.raises(ConfigError, match=r"linear_1.bias has shape \[64\] there but the model expects \[128\]"):
        check_projector_shapes(folder, dims(text_hidden=128), "mlp2x_gelu")
    with pytest.raises(ConfigError, match=r"linear_1.weight has shape \[64, 32\] there .* expects \[64, 48\]"):
        check_projector_shapes(folder, dims(vision_hidden=48), "mlp2x_gelu")
    with pytest.raises(ConfigError, match="holds a mlp2x_gelu projector"):
        check_projector_shapes(folder, dims(), "linear")
    assert not any(tmp_path.iterdir())  # dims came from configs: nothing was built


def test_read_meta_rejects_non_projector_folders(tmp_path):
    with pytest.raises(ConfigError, match="not a projector folder"):
        read_projector_meta(tmp_path)
    (tmp_path / PROJECTOR_META).write_text("{not json")
    with pytest.raises(ConfigError, match="not a projector folder"):
        read_projector_meta(tmp_path)
    (tmp_path / PROJECTOR_META).write_text(json.dumps({"projector_type": "linear"}))
    with pytest.raises(ConfigError, match="not a projector folder.*lacks"):
        read_projector_meta(tmp_path)


def test_extra_metadata_cannot_override_the_checksum(saved, tmp_path):
    model, _, _ = saved
    with pytest.raises(ValueError, match="sha256"):
        save_projector(model, tmp_path, projector_type="mlp2x_gelu", extra={"sha256": "0" * 64})


def test_refuses_a_projector_with_lora(tokenizer):
    wrapped = get_peft_model(_model(tokenizer), LoraConfig(r=4, target_modules=r".*multi_modal_projector\.linear_1"))
    with pytest.raises(ConfigError, match="LoRA or quantized tensors"):
        projector_state_dict(wrapped)


def test_refuses_a_quantized_projector(tmp_path):
    """The bare skip names quantize the projector (transformers 5): saving it must fail, not write packed bytes."""
    folder = save_tiny_checkpoint(tmp_path / "tiny")
    cfg = ModelConfig(name="tiny", source="pretrained", checkpoint=str(folder))
    model = load_model(cfg, projector_type="mlp2x_gelu", quant=QuantConfig(mode="nf4"),
                       skip_modules=["vision_tower", "multi_modal_projector", "lm_head"],
                       compute_dtype=torch.float32).model
    with pytest.raises(ConfigError, match="keep 'model.multi_modal_projector' in the quantization skip list"):
        save_projector(model, tmp_path / "projector", projector_type="mlp2x_gelu")
    assert not (tmp_path / "projector" / PROJECTOR_META).exists()
