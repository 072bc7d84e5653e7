"""Load the model a run trains: a Llava / LlavaNext checkpoint, a tiny random one, or a composed one.

The three `ModelConfig.source` values all end in the same `from_pretrained` call on a checkpoint
folder (or hub id), so dtype, quantization and device placement behave the same for each:

- `pretrained`: a llava-hf style checkpoint with its processor, loaded as is;
- `tiny_random`: a tiny checkpoint built locally by `model/tiny.py` and cached;
- `compose`: a vision encoder (CLIP or SigLIP) + a causal LM + a fresh projector, assembled once into
  a Llava checkpoint folder in the cache (the LLaVA-Phi / LLaVA-LLaMA-3.1 recipe).

`model_dims` answers shape questions from configs alone, so a run is validated (for instance against
a stage-1 projector) before any weights load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

try:  # transformers >= 5 splits image processors into torchvision and PIL backends; torchvision may be absent
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    from transformers import SiglipImageProcessorPil as SiglipImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import CLIPImageProcessor, SiglipImageProcessor

from vlmablate.config import ConfigError, ModelConfig, QuantConfig
from vlmablate.config import cache_root as config_cache_root
from vlmablate.data.templates import VICUNA_V1_CHAT_TEMPLATE
from vlmablate.model.tiny import IMAGE_TOKEN, TinySpec, ensure_tiny_checkpoint

log = logging.getLogger(__name__)

MODEL_CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
# projector type -> the `projector_hidden_act` that HF's two-layer LlavaMultiModalProjector runs with
PROJECTOR_ACTS = {"mlp2x_gelu": "gelu", "linear": "linear"}
COMPOSE_META = "compose.json"
COMPOSE_VERSION = 1  # bump when the composed folder changes, so cached folders are rebuilt
# Vision encoders `compose` accepts: dual encoders (keep the image tower) and image towers alone.
# The value is the number of non-patch tokens the tower prepends (CLIP's CLS; SigLIP has none).
DUAL_ENCODERS = {"clip": 1, "siglip": 0}
VISION_TOWERS = {"clip_vision_model": 1, "siglip_vision_model": 0}


@dataclass
class LoadedModel:
    """A loaded HF model with its processor and where it came from."""

    model: PreTrainedModel  # LlavaForConditionalGeneration or LlavaNextForConditionalGeneration
    processor: ProcessorMixin  # its LlavaProcessor / LlavaNextProcessor
    checkpoint: str  # the folder or hub id actually loaded (for compose / tiny_random: the built folder)
    arch: str  # "llava" | "llava_next"


# --- public API -----------------------------------------------------------------------------------


def cache_root(cfg: ModelConfig) -> Path:
    """Where tiny and composed checkpoints are built: cfg.cache_dir, $VLMABLATE_CACHE or ~/.cache/vlmablate."""
    return config_cache_root(cfg.cache_dir)


def tiny_spec(cfg: ModelConfig) -> TinySpec:
    """The TinySpec that `model=tiny_random` builds."""
    t = cfg.tiny
    return TinySpec(
        arch=t.arch, image_size=t.image_size, patch_size=t.patch_size, vision_hidden=t.vision_hidden,
        vision_layers=t.vision_layers, vision_heads=t.vision_heads, vision_intermediate=t.vision_intermediate,
        text_hidden=t.text_hidden, text_layers=t.text_layers, text_heads=t.text_heads,
        text_kv_heads=t.text_kv_heads, text_intermediate=t.text_intermediate, vocab_size=t.vocab_size,
        vision_feature_layer=cfg.vision_feature_layer, max_positions=max(TinySpec.max_positions, cfg.max_length),
    )


def resolve_checkpoint(cfg: ModelConfig, *, projector_type: str) -> str:
    """The checkpoint folder or hub id to load, building the tiny or composed one first if needed."""
    if cfg.source == "pretrained":
        if not cfg.checkpoint:
            raise ConfigError("model.source=pretrained needs model.checkpoint (a hub id or a local folder)")
        return cfg.checkpoint
    if cfg.source == "tiny_random":
        return str(ensure_tiny_checkpoint(cache_root(cfg), tiny_spec(cfg)))
    if cfg.source == "compose":
        return str(ensure_composed_checkpoint(cfg, projector_type=projector_type))
    raise ConfigError(f"model.source={cfg.source!r} is not one of pretrained, compose, tiny_random")


def model_dims(cfg: ModelConfig, *, projector_type: str) -> dict:
    """Shapes that decide whether a projector fits, read from configs only (no weights are loaded)."""
    if projector_type not in PROJECTOR_ACTS:
        raise ConfigError(f"projector type {projector_type!r} is not one of {', '.join(PROJECTOR_ACTS)}")
    if cfg.source == "tiny_random":
        _check_projector_act(TinySpec.projector_hidden_act, projector_type, "model=tiny_random")
        _check_feature_layer(cfg.vision_feature_layer, cfg.tiny.vision_layers, "model=tiny_random")
        return _dims(cfg.tiny.vision_hidden, cfg.tiny.text_hidden, cfg.tiny.vision_layers, cfg.tiny.arch,
                     cfg.vision_feature_layer)
    if cfg.source == "compose":
        vision_config, _ = _vision_config_of(cfg.vision_checkpoint, cfg.trust_remote_code)
        text_config = AutoConfig.from_pretrained(cfg.llm_checkpoint, trust_remote_code=cfg.trust_remote_code)
        _check_compose_features(cfg, vision_config)
        return _dims(vision_config.hidden_size, text_config.hidden_size, vision_config.num_hidden_layers, "llava",
                     cfg.vision_feature_layer)
    checkpoint = resolve_checkpoint(cfg, projector_type=projector_type)
    config = _checkpoint_config(checkpoint, cfg, projector_type)
    return _dims(config.vision_config.hidden_size, config.text_config.hidden_size,
                 config.vision_config.num_hidden_layers, config.model_type, config.vision_feature_layer)


def bnb_config(quant: QuantConfig, *, skip_modules: list[str], compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """The bitsandbytes config for `quant`; `skip_modules` is used verbatim.

    Entries must be full module paths ("model.vision_tower"): transformers 5 quantizes a module unless
    a skip entry matches its path, and a bare "vision_tower" does not match "model.vision_tower".
    """
    if quant.mode == "none":
        return None
    if quant.mode == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=quant.storage,  # None: uint8; FSDP-QLoRA: the model's float dtype
            llm_int8_skip_modules=list(skip_modules),
        )
    if quant.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))
    raise ConfigError(f"quant.mode={quant.mode!r} is not one of none, nf4, int8")


def load_model(cfg: ModelConfig, *, projector_type: str, quant: QuantConfig, skip_modules: list[str],
               compute_dtype: torch.dtype, device_map=None) -> LoadedModel:
    """Load model + processor for any source through `from_pretrained` (quantized when `quant` says so)."""
    checkpoint = resolve_checkpoint(cfg, projector_type=projector_type)
    config = _checkpoint_config(checkpoint, cfg, projector_type)
    kwargs = dict(
        config=config,
        dtype=_torch_dtype(cfg.torch_dtype),  # transformers 5 name; `torch_dtype` is deprecated
        quantization_config=bnb_config(quant, skip_modules=skip_modules, compute_dtype=compute_dtype),
        trust_remote_code=cfg.trust_remote_code,
    )
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = MODEL_CLASSES[config.model_type].from_pretrained(checkpoint, **kwargs)
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=cfg.trust_remote_code)
    log.info("loaded %s (%s, %s, quant=%s) from %s", type(model).__name__, config.model_type, model.dtype,
             quant.mode, checkpoint)
    return LoadedModel(model=model, processor=processor, checkpoint=checkpoint, arch=config.model_type)


# --- checks shared by model_dims and load_model -----------------------------------------------------


def _dims(vision_hidden: int, text_hidden: int, vision_layers: int, arch: str, feature_layer) -> dict:
    n_layers = 1 if isinstance(feature_layer, int) else len(feature_layer)
    return {"vision_hidden": vision_hidden, "text_hidden": text_hidden, "vision_layers": vision_layers,
            "arch": arch, "projector_in": vision_hidden * n_layers}


def _checkpoint_config(checkpoint: str, cfg: ModelConfig, projector_type: str) -> PretrainedConfig:
    """The checkpoint's config, after checking its architecture and projector against the run's config."""
    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=cfg.trust_remote_code)
    if config.model_type not in MODEL_CLASSES:
        raise ConfigError(
            f"{checkpoint} is a {config.model_type!r} checkpoint; vlmablate loads "
            f"{', '.join(MODEL_CLASSES)} checkpoints (LlavaForConditionalGeneration, "
            "LlavaNextForConditionalGeneration). For a separate vision encoder and LLM use model.source=compose."
        )
    _check_projector_act(config.projector_hidden_act, projector_type, checkpoint)
    if cfg.source == "pretrained":
        _check_feature_settings(config, cfg, checkpoint)
    return config


def _check_projector_act(act: str, projector_type: str, where: str) -> None:
    expected = PROJECTOR_ACTS.get(projector_type)
    if expected is None:
        raise ConfigError(f"projector type {projector_type!r} is not one of {', '.join(PROJECTOR_ACTS)}")
    # Any GELU variant ("gelu", "gelu_pytorch_tanh") is an mlp2x_gelu projector.
    matches = act == "linear" if expected == "linear" else act.startswith(expected)
    if not matches:
        found = "linear" if act == "linear" else f"mlp2x ({act})"
        raise ConfigError(
            f"{where} has a {found} projector but projector={projector_type}; set projector to match the checkpoint"
        )


def _check_feature_settings(config: PretrainedConfig, cfg: ModelConfig, checkpoint: str) -> None:
    """A pretrained projector was trained on one vision layer and token selection; never change them silently."""
    for key in ("vision_feature_layer", "vision_feature_select_strategy"):
        ours, theirs = getattr(cfg, key), getattr(config, key)
        if ours != theirs:
            raise ConfigError(
                f"model.{key}={ours!r} but {checkpoint} was trained with {theirs!r}; a pretrained checkpoint keeps "
                f"its own. Set model.{key}={theirs!r}, or use model.source=compose to train a new projector."
            )


def _check_feature_layer(layer, num_layers: int, where: str) -> None:
    # hidden_states holds the embeddings plus one entry per block: num_layers + 1 entries
    for idx in [layer] if isinstance(layer, int) else layer:
        if not -(num_layers + 1) <= idx <= num_layers:
            raise ConfigError(
                f"model.vision_feature_layer={layer} is out of range for {where} ({num_layers} encoder blocks: "
                f"use -{num_layers + 1}..{num_layers})"
            )


def _torch_dtype(name: str):
    if name == "auto":
        return "auto"  # the checkpoint's own dtype
    if name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.torch_dtype={name!r} is not one of auto, float32, bfloat16, float16")
    return getattr(torch, name)


# --- compose: vision encoder + causal LM + fresh projector -> a Llava checkpoint folder ----------------


def ensure_composed_checkpoint(cfg: ModelConfig, *, projector_type: str) -> Path:
    """Return the cached composed folder for these inputs, building it once (atomically) if missing."""
    if not (cfg.vision_checkpoint and cfg.llm_checkpoint):
        raise ConfigError("model.source=compose needs model.vision_checkpoint and model.llm_checkpoint")
    if projector_type not in PROJECTOR_ACTS:
        raise ConfigError(f"projector type {projector_type!r} is not one of {', '.join(PROJECTOR_ACTS)}")
    inputs = _compose_inputs(cfg, projector_type)
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    name = f"composed-{_short(cfg.vision_checkpoint)}-{_short(cfg.llm_checkpoint)}-{projector_type}-{digest}"
    folder = cache_root(cfg) / name
    if (folder / COMPOSE_META).exists():  # written last, so its presence means the folder is complete
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a crashed build in a process with our pid
    try:
        _build_composed_checkpoint(tmp, cfg, projector_type, inputs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race; its folder is complete
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _short(checkpoint: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(checkpoint).name)[:40]


def _compose_inputs(cfg: ModelConfig, projector_type: str) -> dict:
    """Everything the composed folder depends on; its hash names the cache folder."""
    return {
        "version": COMPOSE_VERSION,
        "vision_checkpoint": cfg.vision_checkpoint,
        "llm_checkpoint": cfg.llm_checkpoint,
        "vision_files": _fingerprint(cfg.vision_checkpoint),
        "llm_files": _fingerprint(cfg.llm_checkpoint),
        "projector_type": projector_type,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "transformers": transformers.__version__,  # the saved layout follows the library version
    }


def _fingerprint(checkpoint: str) -> list | None:
    """Names, sizes and mtimes of a local folder's files, so a rebuilt source folder is not served stale."""
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        return None  # a hub id: the id names it
    return sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in path.iterdir() if p.is_file())


def _build_composed_checkpoint(folder: Path, cfg: ModelConfig, projector_type: str, inputs: dict) -> None:
    """Assemble vision tower + LM + projector into a Llava model and save it with its processor."""
    trust = cfg.trust_remote_code
    log.info("composing %s + %s (%s projector) into %s", cfg.vision_checkpoint, cfg.llm_checkpoint,
             projector_type, folder)
    tokenizer, notes = _compose_tokenizer(cfg.llm_checkpoint, trust)
    lm = AutoModelForCausalLM.from_pretrained(cfg.llm_checkpoint, dtype="auto", trust_remote_code=trust)
    dtype = lm.dtype  # the whole model is saved in the LLM's dtype
    vision_config, vision_state, n_extra = _load_vision_part(cfg.vision_checkpoint, dtype, trust)
    config = composed_llava_config(vision_config, lm.config, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), cfg,
                                   projector_type, n_extra)
    model, head_bias = _assemble(config, vision_state, lm, _fresh_projector(config, projector_type, dtype))
    del lm, vision_state
    original_vocab = model.get_input_embeddings().weight.shape[0]
    _resize_vocab(model, max(len(tokenizer), original_vocab))
    processor = _compose_processor(cfg, tokenizer, vision_config, n_extra)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    meta = {
        "inputs": inputs,
        "projector_type": projector_type,
        "image_token_index": config.image_token_index,
        "vocab_size": {"llm": original_vocab, "composed": model.get_input_embeddings().weight.shape[0]},
        "dtype": str(dtype).removeprefix("torch."),
        "dropped_lm_head_bias": head_bias,
        **notes,
    }
    (folder / COMPOSE_META).write_text(json.dumps(meta, indent=2))


def _compose_tokenizer(checkpoint: str, trust: bool):
    """The LLM's tokenizer with `<image>` added, a pad token, and a chat template."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust)
    notes = {"added_image_token": IMAGE_TOKEN not in tokenizer.get_vocab()}
    if notes["added_image_token"]:
        # Extend, not replace, the tokenizer's own extra special tokens.
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    notes["pad_token"] = "own"
    if tokenizer.pad_token is None:
        # Llama-style tokenizers ship no pad token. Padded positions are masked (attention 0, label -100),
        # so any existing token serves; unk first so that eos keeps one meaning, eos when there is no unk
        # (Llama 3). The LM config's pad_token_id is left alone: it sets nn.Embedding.padding_idx, which
        # would freeze that token's embedding row.
        if tokenizer.unk_token is None and tokenizer.eos_token is None:
            raise ConfigError(f"{checkpoint}: the tokenizer has no pad, unk or eos token to pad with")
        notes["pad_token"] = "unk" if tokenizer.unk_token is not None else "eos"
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    notes["chat_template"] = "llm" if tokenizer.chat_template else "vicuna_v1"
    if not tokenizer.chat_template:
        tokenizer.chat_template = VICUNA_V1_CHAT_TEMPLATE
    return tokenizer, notes


def _vision_config_of(checkpoint: str, trust: bool) -> tuple[PretrainedConfig, bool]:
    """(image tower config, whether the checkpoint is a dual encoder) for a CLIP / SigLIP checkpoint."""
    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust)
    if config.model_type in DUAL_ENCODERS:
        return config.vision_config, True
    if config.model_type in VISION_TOWERS:
        return config, False
    raise ConfigError(
        f"model.vision_checkpoint={checkpoint} is a {config.model_type!r} checkpoint; compose takes "
        f"{', '.join([*DUAL_ENCODERS, *VISION_TOWERS])} checkpoints"
    )


def _load_vision_part(checkpoint: str, dtype: torch.dtype, trust: bool):
    """(vision config, image tower state dict, number of non-patch tokens the tower prepends)."""
    vision_config, dual = _vision_config_of(checkpoint, trust)
    model = AutoModel.from_pretrained(checkpoint, dtype=dtype, trust_remote_code=trust)
    # A dual encoder's `vision_model` has the same parameter names as the stand-alone image tower.
    state = (model.vision_model if dual else model).state_dict()
    n_extra = VISION_TOWERS[vision_config.model_type]
    return vision_config, state, n_extra


def _check_compose_features(cfg: ModelConfig, vision_config) -> None:
    """The vision layer and token selection asked for must exist in the vision tower."""
    _check_feature_layer(cfg.vision_feature_layer, vision_config.num_hidden_layers, cfg.vision_checkpoint)
    if cfg.vision_feature_select_strategy == "default" and VISION_TOWERS[vision_config.model_type] == 0:
        raise ConfigError(
            f"{cfg.vision_checkpoint} has no CLS token, so vision_feature_select_strategy=default would drop a "
            "real image patch; set model.vision_feature_select_strategy=full"
        )


def composed_llava_config(vision_config, text_config, image_token_index: int, cfg: ModelConfig,
                          projector_type: str, n_extra: int) -> LlavaConfig:
    """The Llava config of vision tower + LM + projector (what compose builds, and what `plan` counts)."""
    _check_compose_features(cfg, vision_config)
    strategy = cfg.vision_feature_select_strategy
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,  # vocab_size is updated when the embeddings are resized
        image_token_index=image_token_index,
        projector_hidden_act=PROJECTOR_ACTS[projector_type],
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=patches + (n_extra if strategy == "full" else 0),
    )


def _fresh_projector(config: LlavaConfig, projector_type: str, dtype: torch.dtype) -> dict:
    """A newly initialised projector (seed 0); `linear` is linear_1 followed by an identity linear_2."""
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG stream
        torch.manual_seed(0)
        projector = LlavaMultiModalProjector(config)
    if projector_type == "linear":
        # HF's projector always has two layers; an identity second layer (kept frozen by the freeze plan)
        # makes it the single linear map of LLaVA-1.
        with torch.no_grad():
            torch.nn.init.eye_(projector.linear_2.weight)
            if projector.linear_2.bias is not None:
                projector.linear_2.bias.zero_()
    return {k: v.to(dtype) for k, v in projector.state_dict().items()}


def _assemble(config: LlavaConfig, vision_state: dict, lm: PreTrainedModel, projector_state: dict):
    """A Llava model whose parameters are the given tensors (no second copy): meta init, then assign."""
    with init_empty_weights():  # parameters on the meta device; buffers (rotary, position ids) real
        model = LlavaForConditionalGeneration(config)
    head = lm.get_output_embeddings()
    parts = [
        (model.model.vision_tower, vision_state, "vision tower"),
        (model.model.language_model, lm.base_model.state_dict(), "language model"),
        (model.model.multi_modal_projector, projector_state, "projector"),
        (model.lm_head, {"weight": head.weight}, "lm_head"),
    ]
    for module, state, what in parts:
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            raise ConfigError(f"cannot compose the {what}: its weights do not fit Llava's {what}:\n{err}") from err
    model.tie_weights()  # re-tie lm_head to the input embeddings when the LLM ties them
    head_bias = getattr(head, "bias", None) is not None
    if head_bias:
        log.warning(
            "%s's output layer has a bias (e.g. Phi-2); Llava's lm_head has none, so the bias is dropped "
            "(recorded as dropped_lm_head_bias in %s)", lm.config.name_or_path, COMPOSE_META,
        )
    meta_params = [n for n, p in model.named_parameters() if p.is_meta]
    if meta_params:
        raise ConfigError(f"composed model is missing weights for {meta_params[:5]}")
    return model, head_bias


def _resize_vocab(model: LlavaForConditionalGeneration, vocab: int) -> None:
    """Grow the embeddings and lm_head to `vocab` rows; new rows start at the mean of the old ones."""
    old = model.get_input_embeddings().weight.shape[0]
    if vocab == old:
        return
    model.resize_token_embeddings(vocab, mean_resizing=False)  # HF's mean_resizing samples; we want the mean
    with torch.no_grad():
        for weight in {id(w): w for w in (model.get_input_embeddings().weight, model.lm_head.weight)}.values():
            weight[old:] = weight[:old].float().mean(dim=0).to(weight.dtype)


def _compose_processor(cfg: ModelConfig, tokenizer, vision_config, n_extra: int) -> LlavaProcessor:
    """A LlavaProcessor from the vision checkpoint's image processor (or one built from its config)."""
    image_cls = CLIPImageProcessor if vision_config.model_type == "clip_vision_model" else SiglipImageProcessor
    try:
        image_processor = image_cls.from_pretrained(cfg.vision_checkpoint)
    except OSError:  # no preprocessor_config.json: the tower's own resolution with the family's defaults
        size = vision_config.image_size
        if image_cls is CLIPImageProcessor:
            image_processor = image_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        else:
            image_processor = image_cls(size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        chat_template=tokenizer.chat_template,
        num_additional_image_tokens=n_extra,
        image_token=IMAGE_TOKEN,
    )
