"""Tiny random Llava / LlavaNext checkpoints built locally: tokenizer, processor and model.

Nothing here downloads anything. A byte-level BPE tokenizer is trained with `tokenizers` on a small
built-in corpus, wrapped as a `PreTrainedTokenizerFast` with the Vicuna v1 chat template and the
`<image>` token, and saved together with a CLIP image processor so that
`AutoProcessor.from_pretrained(folder)` and `AutoModelForImageTextToText.from_pretrained(folder)`
work exactly as they do for llava-hf checkpoints. Tests and `model=tiny_random` load these folders
through the same code path as the real presets.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

try:  # transformers >= 5 splits image processors into torchvision and PIL backends
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    from transformers import LlavaNextImageProcessorPil as LlavaNextImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor

from vlmablate.data.templates import VICUNA_V1_CHAT_TEMPLATE

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# A corpus wide enough that every word the synthetic data, the chat templates and the tests use
# is a handful of tokens at most.
_CORPUS_WORDS = (
    "a an the one two three four five six seven eight nine ten zero is are there how many what "
    "which where colour color shape shapes image picture photo shows contains left right top bottom "
    "middle centre center above below next to of in on and or with small large big tiny red green "
    "blue yellow purple orange white black grey gray circle square triangle star cross ring "
    "describe the image in detail answer question option letter from given choices directly "
    "yes no a chat between curious human artificial intelligence assistant gives helpful detailed "
    "polite answers to human's questions user assistant system hello thanks you please tell me "
    "about count objects object scene word phrase single using reference ocr token caption "
    "USER: ASSISTANT: USER ASSISTANT A. B. C. D. A B C D "
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny random Llava; the defaults make a ~0.5M-parameter model that trains in seconds."""

    arch: str = "llava"  # "llava" | "llava_next"
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate: int = 64
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    vocab_size: int = 600
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -2
    max_positions: int = 512  # the LM's position table and the tokenizer's model_max_length
    seed: int = 0


def train_tiny_tokenizer(vocab_size: int = 600, extra_text: str = "") -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (no unknown tokens) with the Vicuna v1 chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = (_CORPUS_WORDS + " " + extra_text).split()
    lines = [" ".join(corpus[i : i + 12]) for i in range(0, len(corpus), 12)]
    lines += [w.capitalize() + "." for w in corpus] + [w + "?" for w in corpus]
    tok.train_from_iterator(lines * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=512,
        padding_side="right",
    )
    fast.chat_template = VICUNA_V1_CHAT_TEMPLATE
    return fast


def _vision_config(spec: TinySpec) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )


def _text_config(spec: TinySpec, vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_llava(spec: TinySpec, tokenizer: PreTrainedTokenizerFast):
    """A randomly initialised Llava or LlavaNext model at tiny size (deterministic in `spec.seed`)."""
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    common = dict(
        vision_config=_vision_config(spec),
        text_config=_text_config(spec, len(tokenizer), tokenizer),
        image_token_index=image_token_id,
        projector_hidden_act=spec.projector_hidden_act,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy="default",
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
    )
    torch.manual_seed(spec.seed)
    if spec.arch == "llava":
        return LlavaForConditionalGeneration(LlavaConfig(**common))
    if spec.arch == "llava_next":
        pinpoints = [[spec.image_size, spec.image_size * 2], [spec.image_size * 2, spec.image_size],
                     [spec.image_size * 2, spec.image_size * 2]]
        return LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=pinpoints, **common))
    raise ValueError(f"unknown tiny arch {spec.arch!r}; expected 'llava' or 'llava_next'")


def build_tiny_processor(spec: TinySpec, tokenizer: PreTrainedTokenizerFast):
    """The HF processor a llava-hf checkpoint ships, at tiny size."""
    size = {"shortest_edge": spec.image_size}
    crop = {"height": spec.image_size, "width": spec.image_size}
    kwargs = dict(
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=VICUNA_V1_CHAT_TEMPLATE,
    )
    if spec.arch == "llava":
        return LlavaProcessor(image_processor=CLIPImageProcessor(size=size, crop_size=crop), **kwargs)
    pinpoints = [[spec.image_size, spec.image_size * 2], [spec.image_size * 2, spec.image_size],
                 [spec.image_size * 2, spec.image_size * 2]]
    image_processor = LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=pinpoints)
    return LlavaNextProcessor(image_processor=image_processor, **kwargs)


def save_tiny_checkpoint(folder: str | os.PathLike, spec: TinySpec = TinySpec()) -> Path:
    """Build and save a tiny checkpoint (model + processor) into `folder`; return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer(spec.vocab_size)
    tokenizer.model_max_length = spec.max_positions
    model = build_tiny_llava(spec, tokenizer)
    processor = build_tiny_processor(spec, tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return folder


def ensure_tiny_checkpoint(cache_dir: str | os.PathLike, spec: TinySpec = TinySpec()) -> Path:
    """Return a cached tiny checkpoint for `spec`, building it once (atomically) if missing."""
    key = "-".join(f"{v}" for v in asdict(spec).values())
    folder = Path(cache_dir) / f"tiny_random-{key}"
    if (folder / "tiny_spec.json").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    save_tiny_checkpoint(tmp, spec)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race; its folder is complete
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder
