"""Tests for model loading: pretrained folders, tiny_random, compose, and bitsandbytes quantization.

Every checkpoint is built here with the same transformers classes the hub checkpoints use and saved
to a temporary folder, once per module; nothing is downloaded.
"""

from __future__ import annotations

import json
import os

import bitsandbytes as bnb
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vlmablate.config import ConfigError, ModelConfig, QuantConfig, TinyModelConfig
from vlmablate.data.templates import VICUNA_V1_CHAT_TEMPLATE
from vlmablate.model import load
from vlmablate.model.load import bnb_config, load_model, model_dims, resolve_checkpoint
from vlmablate.model.tiny import TinySpec, save_tiny_checkpoint

GOOD_SKIP = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
BARE_SKIP = ["vision_tower", "multi_modal_projector", "lm_head"]
NO_QUANT = QuantConfig(mode="none")
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)


def _load(cfg: ModelConfig, projector_type: str = "mlp2x_gelu", quant: QuantConfig = NO_QUANT, skip=GOOD_SKIP):
    return load_model(cfg, projector_type=projector_type, quant=quant, skip_modules=skip,
                      compute_dtype=torch.float32)


def _pretrained(folder, **kwargs) -> ModelConfig:
    return ModelConfig(name="test", source="pretrained", checkpoint=str(folder), **kwargs)


def _plain_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer like a text-only LLM's: no `<image>`, no pad token, no chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["a picture of a red circle", "USER: what is it? ASSISTANT: a cat"] * 5, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# --- module fixtures: tiny checkpoints built once --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llava"), TinySpec(arch="llava"))


@pytest.fixture(scope="module")
def tiny_next(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_next"), TinySpec(arch="llava_next", text_hidden=48))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Source folders for compose: a CLIPVisionModel, a CLIPModel (with image processor) and a Llama LM."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(1)
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(root / "vision")
    SiglipVisionModel(SiglipVisionConfig(**VISION)).save_pretrained(root / "siglip")
    clip = CLIPModel(CLIPConfig(vision_config=VISION, text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100,
        bos_token_id=0, eos_token_id=1, pad_token_id=1)))
    clip.save_pretrained(root / "clip")
    # The dual encoder ships an image processor; the vision-only folder does not (built from its config).
    load.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip")
    tokenizer = _plain_tokenizer()
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=False))
    lm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    return root


def _compose_cfg(parts, cache, vision="vision") -> ModelConfig:
    return ModelConfig(name="composed", source="compose", vision_checkpoint=str(parts / vision),
                       llm_checkpoint=str(parts / "llm"), cache_dir=str(cache))


# --- pretrained and tiny_random -----------------------------------------------------------------------


@pytest.mark.parametrize("which, model_cls, processor_cls, arch", [
    ("tiny_llava", LlavaForConditionalGeneration, LlavaProcessor, "llava"),
    ("tiny_next", LlavaNextForConditionalGeneration, LlavaNextProcessor, "llava_next"),
])
def test_load_pretrained_folder(request, which, model_cls, processor_cls, arch):
    folder = request.getfixturevalue(which)
    loaded = _load(_pretrained(folder))
    assert type(loaded.model) is model_cls
    assert type(loaded.processor) is processor_cls
    assert loaded.arch == arch
    assert loaded.checkpoint == str(folder)
    assert loaded.model.dtype == torch.float32  # "auto" = the checkpoint's dtype


def _real_dims(model) -> dict:
    """The shapes model_dims promises, read from the modules themselves."""
    tower = model.model.vision_tower
    patch = next(m for m in tower.modules() if isinstance(m, torch.nn.Conv2d))
    layers = [m for m in tower.modules() if type(m).__name__.endswith("EncoderLayer")]
    linear_1 = model.model.multi_modal_projector.linear_1
    return {"vision_hidden": patch.out_channels, "text_hidden": model.get_input_embeddings().embedding_dim,
            "vision_layers": len(layers), "projector_in": linear_1.in_features,
            "projector_out": linear_1.out_features}


@pytest.mark.parametrize("which", ["tiny_llava", "tiny_next"])
def test_model_dims_pretrained_matches_model(request, which):
    cfg = _pretrained(request.getfixturevalue(which))
    dims, loaded = model_dims(cfg, projector_type="mlp2x_gelu"), _load(cfg)
    real = _real_dims(loaded.model)
    assert dims["arch"] == loaded.arch
    assert dims["projector_in"] == real["projector_in"] == dims["vision_hidden"]
    assert dims["text_hidden"] == real["text_hidden"] == real["projector_out"]
    assert dims["vision_hidden"] == real["vision_hidden"] and dims["vision_layers"] == real["vision_layers"]


def test_tiny_random_source(tmp_path):
    tiny = TinyModelConfig(arch="llava_next", vision_hidden=48, vision_layers=2, text_hidden=32, vocab_size=500)
    cfg = ModelConfig(name="tiny", source="tiny_random", cache_dir=str(tmp_path), vision_feature_layer=-1, tiny=tiny)
    dims = model_dims(cfg, projector_type="mlp2x_gelu")
    assert dims == {"vision_hidden": 48, "text_hidden": 32, "vision_layers": 2, "arch": "llava_next",
                    "projector_in": 48}
    loaded = _load(cfg)
    assert type(loaded.model) is LlavaNextForConditionalGeneration and loaded.arch == "llava_next"
    assert loaded.checkpoint.startswith(str(tmp_path))
    assert loaded.model.config.vision_feature_layer == -1
    real = _real_dims(loaded.model)
    assert (real["vision_hidden"], real["vision_layers"], real["text_hidden"]) == (48, 2, 32)
    assert resolve_checkpoint(cfg, projector_type="mlp2x_gelu") == loaded.checkpoint  # cached


def test_tiny_random_heads_widths_and_positions_follow_the_config(tmp_path):
    """A LLaVA-shaped benchmark model: heads, MLP widths and a position table as long as max_length."""
    tiny = TinyModelConfig(vision_hidden=48, vision_heads=3, vision_intermediate=96, text_hidden=64, text_heads=2,
                           text_kv_heads=1, text_intermediate=160)
    cfg = ModelConfig(name="tiny", source="tiny_random", cache_dir=str(tmp_path), max_length=700, tiny=tiny)
    loaded = _load(cfg)
    vision, text = loaded.model.config.vision_config, loaded.model.config.text_config
    assert (vision.num_attention_heads, vision.intermediate_size) == (3, 96)
    assert (text.num_attention_heads, text.num_key_value_heads, text.intermediate_size) == (2, 1, 160)
    assert text.max_position_embeddings == 700 and loaded.processor.tokenizer.model_max_length == 700
    short = ModelConfig(name="tiny", source="tiny_random", cache_dir=str(tmp_path), max_length=256)
    assert load.tiny_spec(short).max_positions == 512  # never shorter than the default table


def test_cache_dir_falls_back_to_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VLMABLATE_CACHE", str(tmp_path))
    assert load.cache_root(ModelConfig(name="x", source="tiny_random")) == tmp_path
    explicit = ModelConfig(name="x", source="tiny_random", cache_dir="/elsewhere")
    assert load.cache_root(explicit).as_posix() == "/elsewhere"


def test_pretrained_rejects_other_model_types(parts):
    with pytest.raises(ConfigError, match=r"llm.*'llama' checkpoint.*llava, llava_next"):
        model_dims(_pretrained(parts / "llm"), projector_type="mlp2x_gelu")


def test_pretrained_rejects_wrong_projector_type_and_feature_layer(tiny_llava):
    with pytest.raises(ConfigError, match="mlp2x \\(gelu\\) projector but projector=linear"):
        _load(_pretrained(tiny_llava), projector_type="linear")
    with pytest.raises(ConfigError, match="vision_feature_layer=-1 but .* was trained with -2"):
        model_dims(_pretrained(tiny_llava, vision_feature_layer=-1), projector_type="mlp2x_gelu")


# --- compose -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def composed(parts, tmp_path_factory):
    """Both projector types composed from the vision-only tower, loaded through load_model."""
    cache = tmp_path_factory.mktemp("compose_cache")
    return {ptype: _load(_compose_cfg(parts, cache), projector_type=ptype) for ptype in ("mlp2x_gelu", "linear")}


@pytest.mark.parametrize("ptype, act", [("mlp2x_gelu", "gelu"), ("linear", "linear")])
def test_compose_keeps_source_weights(parts, composed, ptype, act):
    loaded = composed[ptype]
    model = loaded.model
    assert type(model) is LlavaForConditionalGeneration and loaded.arch == "llava"
    assert model.config.projector_hidden_act == act
    vision = CLIPVisionModel.from_pretrained(parts / "vision").state_dict()
    tower = model.model.vision_tower.state_dict()
    assert tower.keys() == vision.keys() and all(torch.equal(tower[k], vision[k]) for k in vision)

    lm = LlamaForCausalLM.from_pretrained(parts / "llm")
    vocab = lm.config.vocab_size
    ours = model.model.language_model.state_dict()
    for name, tensor in lm.model.state_dict().items():
        rows = slice(0, vocab) if name == "embed_tokens.weight" else slice(None)
        assert torch.equal(ours[name][rows], tensor), name
    assert torch.equal(model.lm_head.weight[:vocab], lm.lm_head.weight)
    # The added rows start at the mean of the original rows.
    new_embed = model.get_input_embeddings().weight[vocab:]
    assert torch.allclose(new_embed, lm.model.embed_tokens.weight.mean(0).expand_as(new_embed))
    assert torch.allclose(model.lm_head.weight[vocab:], lm.lm_head.weight.mean(0).expand_as(new_embed))


def test_compose_adds_image_token_and_pad(parts, composed):
    source = PreTrainedTokenizerFast.from_pretrained(parts / "llm")
    assert "<image>" not in source.get_vocab() and source.pad_token is None and not source.chat_template
    model, processor = composed["mlp2x_gelu"].model, composed["mlp2x_gelu"].processor
    tokenizer = processor.tokenizer
    assert len(tokenizer) == len(source) + 1
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == len(source) == model.config.image_token_index == processor.image_token_id
    assert tokenizer("x <image> y")["input_ids"].count(image_id) == 1  # one token, never split
    assert model.config.text_config.vocab_size == len(tokenizer) == model.get_input_embeddings().num_embeddings
    assert model.lm_head.out_features == len(tokenizer)
    assert tokenizer.pad_token == "<unk>"
    assert processor.chat_template == VICUNA_V1_CHAT_TEMPLATE
    assert processor.num_additional_image_tokens == 1 and model.config.image_seq_length == 16
    with open(os.path.join(composed["mlp2x_gelu"].checkpoint, "compose.json")) as f:
        meta = json.load(f)
    assert meta["vocab_size"] == {"llm": len(source), "composed": len(source) + 1}
    assert (meta["projector_type"], meta["pad_token"], meta["chat_template"]) == ("mlp2x_gelu", "unk", "vicuna_v1")


def test_compose_linear_projector_is_identity_after_linear_1(composed):
    projector = composed["linear"].model.model.multi_modal_projector
    assert torch.equal(projector.linear_2.weight, torch.eye(64))
    assert torch.equal(projector.linear_2.bias, torch.zeros(64))
    assert isinstance(projector.act, torch.nn.Identity) or projector.act(torch.tensor([-1.0])).item() == -1.0
    features = torch.randn(3, 32)
    assert torch.allclose(projector(features), projector.linear_1(features))


@pytest.mark.parametrize("ptype", ["mlp2x_gelu", "linear"])
def test_composed_folder_loads_with_plain_hf_and_trains(composed, ptype):
    folder = composed[ptype].checkpoint
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor) is LlavaProcessor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]},
                {"role": "assistant", "content": "a red circle"}]
    text = processor.apply_chat_template(messages, tokenize=False)
    batch = processor(images=Image.new("RGB", (40, 30), (200, 20, 20)), text=text, return_tensors="pt")
    image_id = model.config.image_token_index
    assert (batch["input_ids"] == image_id).sum().item() == 16  # (32 / 8)^2 patches, CLS dropped
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == image_id, -100)
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_compose_is_cached_and_seeded(parts, tmp_path, monkeypatch):
    cfg = _compose_cfg(parts, tmp_path / "a")
    folder = resolve_checkpoint(cfg, projector_type="mlp2x_gelu")
    stamp = os.stat(os.path.join(folder, "compose.json")).st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached composed checkpoint was rebuilt")

    with monkeypatch.context() as patch:
        patch.setattr(load, "_build_composed_checkpoint", no_rebuild)
        assert resolve_checkpoint(cfg, projector_type="mlp2x_gelu") == folder
    assert os.stat(os.path.join(folder, "compose.json")).st_mtime_ns == stamp
    assert sorted(os.listdir(tmp_path / "a")) == [os.path.basename(folder)]  # no temporary folders left
    # Another projector type is another folder; a fresh build elsewhere gives the same (seeded) projector.
    assert resolve_checkpoint(cfg, projector_type="linear") != folder
    other = resolve_checkpoint(_compose_cfg(parts, tmp_path / "b"), projector_type="mlp2x_gelu")
    first, second = (LlavaForConditionalGeneration.from_pretrained(f).model.multi_modal_projector.state_dict()
                     for f in (folder, other))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_compose_from_clip_dual_encoder(parts, tmp_path):
    cfg = _compose_cfg(parts, tmp_path, vision="clip")
    assert model_dims(cfg, projector_type="mlp2x_gelu") == {
        "vision_hidden": 32, "text_hidden": 64, "vision_layers": 3, "arch": "llava", "projector_in": 32}
    loaded = _load(cfg)
    clip = CLIPModel.from_pretrained(parts / "clip")
    source, tower = clip.vision_model.state_dict(), loaded.model.model.vision_tower.state_dict()
    assert tower.keys() == source.keys() and all(torch.equal(tower[k], source[k]) for k in source)
    assert loaded.processor.image_processor.crop_size == {"height": 32, "width": 32}


def test_compose_from_siglip_needs_the_full_strategy(parts, tmp_path):
    cfg = _compose_cfg(parts, tmp_path, vision="siglip")
    with pytest.raises(ConfigError, match="no CLS token.*vision_feature_select_strategy=full"):
        model_dims(cfg, projector_type="mlp2x_gelu")  # caught before anything is built
    assert not any(tmp_path.iterdir())
    cfg.vision_feature_select_strategy = "full"
    loaded = _load(cfg)
    assert type(loaded.model.model.vision_tower) is SiglipVisionModel
    assert loaded.processor.num_additional_image_tokens == 0 and loaded.model.config.image_seq_length == 16
    batch = loaded.processor(images=Image.new("RGB", (32, 32)), text="<image>\nhi", return_tensors="pt")
    assert (batch["input_ids"] == loaded.model.config.image_token_index).sum().item() == 16
    assert torch.isfinite(loaded.model(**batch).logits).all()


def test_compose_rejects_out_of_range_feature_layer(parts, tmp_path):
    cfg = _compose_cfg(parts, tmp_path)
    cfg.vision_feature_layer = -5
    with pytest.raises(ConfigError, match=r"out of range .*\(3 encoder blocks: use -4\.\.3\)"):
        model_dims(cfg, projector_type="mlp2x_gelu")


# --- quantization -------------------------------------------------------------------------------------


def _linear_classes(model) -> dict[str, set[type]]:
    """Classes of the nn.Linear modules in each part of a Llava model."""
    found: dict[str, set[type]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            part = name.split(".")[1] if name.startswith("model.") else name
            found.setdefault(part, set()).add(type(module))
    return found


def test_bnb_config_fields():
    assert bnb_config(NO_QUANT, skip_modules=GOOD_SKIP, compute_dtype=torch.bfloat16) is None
    nf4 = bnb_config(QuantConfig(mode="nf4", double_quant=False), skip_modules=GOOD_SKIP, compute_dtype=torch.bfloat16)
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and not nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16 and nf4.llm_int8_skip_modules == GOOD_SKIP
    int8 = bnb_config(QuantConfig(mode="int8"), skip_modules=GOOD_SKIP, compute_dtype=torch.bfloat16)
    assert int8.load_in_8bit and not int8.load_in_4bit and int8.llm_int8_skip_modules == GOOD_SKIP


@pytest.mark.parametrize("mode, quantized", [("nf4", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt)])
def test_quantization_covers_only_the_language_model(tiny_llava, mode, quantized):
    model = _load(_pretrained(tiny_llava), quant=QuantConfig(mode=mode), skip=GOOD_SKIP).model
    classes = _linear_classes(model)
    assert classes["language_model"] == {quantized}
    for part in ("vision_tower", "multi_modal_projector", "lm_head"):
        assert classes[part] == {torch.nn.Linear}, part


def test_composed_model_quantizes_through_from_pretrained(parts, composed):
    cfg = _compose_cfg(parts, os.path.dirname(composed["mlp2x_gelu"].checkpoint))  # the cached folder
    loaded = _load(cfg, quant=QuantConfig(mode="nf4"), skip=GOOD_SKIP)
    assert loaded.checkpoint == composed["mlp2x_gelu"].checkpoint
    classes = _linear_classes(loaded.model)
    assert classes["language_model"] == {bnb.nn.Linear4bit} and classes["multi_modal_projector"] == {torch.nn.Linear}


@pytest.mark.parametrize("mode, quantized", [("nf4", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt)])
def test_bare_skip_names_quantize_vision_and_projector(tiny_llava, mode, quantized):
    """Known transformers 5 behaviour: skip entries must be full paths; bare names skip only lm_head."""
    model = _load(_pretrained(tiny_llava), quant=QuantConfig(mode=mode), skip=BARE_SKIP).model
    classes = _linear_classes(model)
    assert classes["vision_tower"] == classes["multi_modal_projector"] == {quantized}
    assert classes["lm_head"] == {torch.nn.Linear}
