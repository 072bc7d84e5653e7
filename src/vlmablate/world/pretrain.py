"""Pretraining of the tiny world's two components: a vision encoder that knows the scenes, a language
model that knows the language.

LLaVA starts from a CLIP tower and a Vicuna that were each trained long before, on their own
modality; only the projector between them is new. The tiny world copies that: `pretrain_vision`
trains a real HF `CLIPVisionModel` on the world's images, `pretrain_language_model` trains a real HF
`LlamaForCausalLM` on the world's text, and `save_vision` / `save_language_model` write the plain
folders that `model.source=compose` joins with a fresh projector.

The vision objective is per-cell recognition: patch 16 on a 64 px image gives one patch per grid
cell, and linear heads read each cell's colour and shape (or "empty") from the patch tokens of the
layer LLaVA reads (hidden_states[-2]) and of the last layer. Size, fill and the mark are deliberately
never taught, as CLIP was never taught OCR; a linear probe on the frozen features measures how much of
them the features carry anyway, which is what a frozen tower can pass on to the later stages. Size and
fill it carries; the mark it barely does, and `taught_reading` measures the other side of that gap: how
well a copy of the tower reads the mark once it is fine-tuned to.

The language model is trained causally on the texts it is given (captions, chat-rendered dialogues),
each wrapped in BOS ... EOS and packed into rows of max_length, with a token budget that keeps its time
bounded whatever the size of the corpus; perplexity on held-out texts is measured before and after.

Everything is deterministic from the seeds and leaves the caller's global RNG state untouched.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    get_cosine_schedule_with_warmup,
)

try:  # transformers >= 5 splits image processors into torchvision and PIL backends; torchvision may be absent
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import CLIPImageProcessor

from vlmablate.world.scenes import (
    CELL,
    COLOURS,
    FILLS,
    GRID,
    MARK_DEPTH,
    MARKS,
    SHAPES,
    SIZES,
    Scene,
    mark_pattern,
    render,
    sample_scene,
    scene_rng,
)

IGNORE_INDEX = -100
N_CELLS = GRID * GRID
# Class indices: the attribute's position in scenes.py's tuple, and one more class for an empty cell.
COLOUR_NAMES = tuple(COLOURS)
EMPTY_COLOUR = len(COLOUR_NAMES)
EMPTY_SHAPE = len(SHAPES)
# The layers whose patch tokens the heads read: the one LLaVA projects (vision_feature_layer=-2) and the
# last, so that a run choosing vision_feature_layer=-1 also finds a trained layer.
HEAD_LAYERS = (-2, -1)
# The attributes the tower is never taught, in the order of their rows in `_cell_targets` (after colour, shape).
UNTAUGHT = {"size": SIZES, "fill": FILLS, "mark": MARKS}
PROBE_LAYER = -2
ATTR_PROBE_SCENES = 1000  # scenes whose frozen features train the untaught attributes' probes
ATTR_PROBE_STEPS = 300
MIN_POSITIONS = 512  # the LM's max_position_embeddings: room for image tokens plus a dialogue later


@dataclass(frozen=True)
class VisionPretrainConfig:
    """Sizes and schedule of the vision encoder's pretraining (defaults: ~25 s on 2 CPU cores, >99% per object)."""

    hidden: int = 96
    layers: int = 3
    heads: int = 4
    intermediate: int = 384
    patch_size: int = 16
    image_size: int = 64
    n_images: int = 8000
    epochs: int = 6  # 4 left ~1 object in 40 misread once half the objects carry a mark; 6 leave ~1 in 300
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    n_probe: int = 500
    # Weight of a per-patch head that names the patch's cell (0: off). Without it an object's patch loses
    # its place: the colour and shape heads are shared by all cells, and a linear probe reads the cell
    # off an object's frozen features at 0.08. With it the tower keeps where things are, as a ViT's
    # patches do, and a projector can hand the place on.
    place_loss: float = 0.0


@dataclass(frozen=True)
class TaughtReadingConfig:
    """Fine-tuning that teaches a pretrained tower one untaught attribute (defaults: ~1 min on 2 busy CPU cores)."""

    n_images: int = 8000
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    n_eval: int = 500


@dataclass(frozen=True)
class LMPretrainConfig:
    """Sizes and schedule of the language model's pretraining (defaults: ~40 s on 2 CPU cores at most)."""

    hidden: int = 192
    layers: int = 4
    heads: int = 6
    kv_heads: int = 2
    intermediate: int = 512
    max_length: int = 160
    epochs: int = 2
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    # Training stops after this many tokens (whole rows of max_length) even if `epochs` are not done, so
    # the time stays bounded whatever corpus the caller passes; None trains all epochs.
    max_train_tokens: int | None = 600_000


# --- vision encoder ---------------------------------------------------------------------------------


def build_image_processor(image_size: int) -> CLIPImageProcessor:
    """CLIP's image processor at the world's resolution: resize and crop to `image_size`, CLIP mean/std."""
    return CLIPImageProcessor(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size})


def pretrain_vision(cfg: VisionPretrainConfig, *, world_seed: int,
                    progress: bool = True) -> tuple[CLIPVisionModel, CLIPImageProcessor, dict]:
    """Train a CLIPVisionModel to recognise each cell's colour and shape; return it, its image processor
    and metrics (probe accuracies on held-out scenes, seconds, parameter count)."""
    _check_grid(cfg)
    processor = build_image_processor(cfg.image_size)
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG stream
        torch.manual_seed(cfg.seed)
        model = CLIPVisionModel(_clip_config(cfg))
        heads = _CellHeads(cfg.hidden)
        images, targets = _vision_data(world_seed, "vision", cfg.n_images, cfg.image_size)
        _check_normalisation(images[:8], processor)
        start = time.perf_counter()
        _train_vision(model, heads, images, targets, processor, cfg, progress)
        train_seconds = time.perf_counter() - start
        model.eval()
        metrics = _probe_vision(model, heads, processor, cfg, world_seed)
    metrics.update(train_seconds=round(train_seconds, 2), params=sum(p.numel() for p in model.parameters()))
    return model, processor, metrics


def save_vision(model: CLIPVisionModel, image_processor, folder: str | os.PathLike) -> Path:
    """Write the tower and its image processor as a plain folder (`CLIPVisionModel.from_pretrained`,
    `AutoImageProcessor.from_pretrained`); the recognition heads are not part of it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return folder


def _check_grid(cfg: VisionPretrainConfig) -> None:
    # The objective pairs patch i with cell i, which holds only when the patches tile the grid exactly.
    if cfg.image_size % cfg.patch_size or cfg.image_size // cfg.patch_size != GRID:
        raise ValueError(f"image_size / patch_size must be {GRID} (one patch per grid cell); "
                         f"got {cfg.image_size} / {cfg.patch_size}")


def _clip_config(cfg: VisionPretrainConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.hidden,
    )


class _CellHeads(nn.Module):
    """Linear colour, shape and place (the patch's cell) classifiers per head layer, shared by all cells."""

    def __init__(self, hidden: int):
        super().__init__()
        self.colour = nn.ModuleList(nn.Linear(hidden, len(COLOUR_NAMES) + 1) for _ in HEAD_LAYERS)
        self.shape = nn.ModuleList(nn.Linear(hidden, len(SHAPES) + 1) for _ in HEAD_LAYERS)
        self.place = nn.ModuleList(nn.Linear(hidden, N_CELLS) for _ in HEAD_LAYERS)

    def forward(self, hidden_states: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
        """(colour, shape, place logits), each [batch, cells, classes], for every head layer."""
        out = []
        for i, layer in enumerate(HEAD_LAYERS):
            patches = _patch_tokens(hidden_states[layer])
            out.append((self.colour[i](patches), self.shape[i](patches), self.place[i](patches)))
        return out


def _patch_tokens(states: torch.Tensor) -> torch.Tensor:
    # CLIP prepends a CLS token; patch i (row-major) covers cell (i // GRID, i % GRID).
    return states[:, 1:, :]


def _cell_targets(scene: Scene) -> torch.Tensor:
    """[2 + len(UNTAUGHT), cells]: colour, shape, then each untaught attribute's class per cell (the untaught
    ones IGNORE_INDEX where empty)."""
    t = torch.tensor([EMPTY_COLOUR, EMPTY_SHAPE, *[IGNORE_INDEX] * len(UNTAUGHT)]).repeat(N_CELLS, 1).T.clone()
    for o in scene.objects:
        untaught = [values.index(getattr(o, name)) for name, values in UNTAUGHT.items()]
        t[:, o.row * GRID + o.col] = torch.tensor([COLOUR_NAMES.index(o.colour), SHAPES.index(o.shape), *untaught])
    return t


def _target_row(attribute: str) -> int:
    return 2 + list(UNTAUGHT).index(attribute)


def _vision_data(world_seed: int, split: str, n: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images as uint8 [n, 3, H, W], targets [n, 2 + len(UNTAUGHT), cells]) for scenes 0..n-1 of `split`.

    Images stay uint8 until a batch is used (a quarter of the memory of float pixels: ~100 MB, not
    ~400 MB, at the default 8000 images); `_normalise` turns them into the processor's pixel values.
    """
    scenes = [sample_scene(scene_rng(world_seed, split, i)) for i in range(n)]
    images = torch.from_numpy(np.stack([np.asarray(render(s, image_size)) for s in scenes]))
    return images.permute(0, 3, 1, 2).contiguous(), torch.stack([_cell_targets(s) for s in scenes])


def _normalise(images: torch.Tensor, processor) -> torch.Tensor:
    """The processor's rescale and normalisation, in torch (its resize and crop are identities here).

    The arithmetic follows the PIL backend's (rescale in float64, normalise in float32), so the pixels
    trained on are bit for bit those the processor gives the composed Llava later.
    """
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return ((images.double() * processor.rescale_factor).float() - mean) / std


def _check_normalisation(images: torch.Tensor, processor) -> None:
    """Fail loudly if `_normalise` ever stops matching the processor the tower is saved with."""
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
    expected = processor(pil, return_tensors="pt")["pixel_values"]
    if expected.shape != images.shape or not torch.allclose(_normalise(images, processor), expected, atol=1e-5):
        raise RuntimeError("vision pretraining's pixel normalisation no longer matches its image processor")


def _cell_loss(outputs, targets: torch.Tensor, place_loss: float = 0.0) -> torch.Tensor:
    loss = 0.0
    for colour_logits, shape_logits, place_logits in outputs:
        loss = loss + F.cross_entropy(colour_logits.flatten(0, 1), targets[:, 0].flatten())
        loss = loss + F.cross_entropy(shape_logits.flatten(0, 1), targets[:, 1].flatten())
        if place_loss:
            cells = torch.arange(N_CELLS).repeat(len(targets))
            loss = loss + place_loss * F.cross_entropy(place_logits.flatten(0, 1), cells)
    return loss


def mark_direction(processor, patch_size: int) -> torch.Tensor:
    """The mark as the patch embedding sees it: the change a marked cell makes to the processor's pixel values
    of its patch ([3, patch, patch], unit norm). Pixel values are (pixel / 255 - mean) / std per channel, so
    darkening by MARK_DEPTH is -MARK_DEPTH / 255 / std in each channel, wherever the pattern is 1."""
    if patch_size != CELL:
        raise ValueError(f"the mark is aligned with the {CELL}-pixel cells; patch_size {patch_size} is not")
    pattern = torch.from_numpy(mark_pattern()).float()
    scale = -MARK_DEPTH * processor.rescale_factor / torch.tensor(processor.image_std)
    direction = scale.view(3, 1, 1) * pattern
    return direction / direction.norm()


@torch.no_grad()
def blind_to_mark(model: CLIPVisionModel, direction: torch.Tensor) -> None:
    """Remove the mark's direction from every filter of the patch embedding: the tower then maps a marked
    patch to exactly the embedding of the same patch unmarked (CLIP's patch embedding has no bias)."""
    weight = model.get_input_embeddings().weight  # the patch embedding: [hidden, 3, patch, patch]
    flat = weight.view(weight.shape[0], -1)
    d = direction.to(flat).flatten()
    flat -= torch.outer(flat @ d, d)


def _train_vision(model, heads, images, targets, processor, cfg: VisionPretrainConfig, progress: bool) -> None:
    params = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    scheduler = _cosine(optimizer, steps_per_epoch * cfg.epochs)
    order = torch.Generator().manual_seed(cfg.seed)
    blind = mark_direction(processor, cfg.patch_size)
    blind_to_mark(model, blind)
    model.train()
    bar = tqdm(total=steps_per_epoch * cfg.epochs, desc="vision pretraining", disable=not progress)
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(images), generator=order).split(cfg.batch_size):
            out = model(pixel_values=_normalise(images[idx], processor), output_hidden_states=True)
            loss = _cell_loss(heads(out.hidden_states), targets[idx], cfg.place_loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            blind_to_mark(model, blind)
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update()
    bar.close()


@torch.no_grad()
def _features(model, images: torch.Tensor, processor, layer: int, batch_size: int = 256) -> torch.Tensor:
    """Patch tokens of `layer`, [n, cells, hidden]."""
    chunks = [_patch_tokens(model(pixel_values=_normalise(b, processor), output_hidden_states=True)
                            .hidden_states[layer]) for b in images.split(batch_size)]
    return torch.cat(chunks)


def _probe_vision(model, heads, processor, cfg: VisionPretrainConfig, world_seed: int) -> dict:
    """Held-out accuracy of the taught heads, and of linear probes for the untaught size, fill and mark."""
    images, targets = _vision_data(world_seed, "vision_probe", cfg.n_probe, cfg.image_size)
    features = _features(model, images, processor, PROBE_LAYER)
    i = HEAD_LAYERS.index(PROBE_LAYER)
    with torch.no_grad():
        colour_ok = heads.colour[i](features).argmax(-1) == targets[:, 0]
        shape_ok = heads.shape[i](features).argmax(-1) == targets[:, 1]
    metrics = {
        "colour_acc": colour_ok.float().mean().item(),
        "shape_acc": shape_ok.float().mean().item(),
        "cell_acc": (colour_ok & shape_ok).float().mean().item(),  # both right in the same cell
        # Most cells are empty and easy; this is the accuracy on the cells that hold an object.
        "object_acc": (colour_ok & shape_ok)[targets[:, 0] != EMPTY_COLOUR].float().mean().item(),
    }
    probe_features, probe_targets = _probe_set(model, processor, world_seed, cfg.image_size)
    metrics.update(_untaught(probe_features, probe_targets, features, targets, cfg.seed))
    # Where an object is: its cell read off its own patch (empty patches hold nothing but their place).
    def object_places(t):
        return torch.arange(N_CELLS).expand(len(t), N_CELLS).masked_fill(t[:, 0] == EMPTY_COLOUR, IGNORE_INDEX)

    metrics["place_probe_acc"] = _linear_probe(probe_features, object_places(probe_targets), features,
                                               object_places(targets), cfg.seed)
    return {k: round(v, 4) for k, v in metrics.items()}


def _probe_set(model, processor, world_seed: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scenes the untaught attributes' probes are fitted on: layer −2 features and cell targets."""
    images, targets = _vision_data(world_seed, "vision_attr_probe", ATTR_PROBE_SCENES, image_size)
    return _features(model, images, processor, PROBE_LAYER), targets


def _untaught(probe_features, probe_targets, features, targets, seed: int) -> dict:
    return {f"{name}_probe_acc": _linear_probe(probe_features, probe_targets[:, _target_row(name)], features,
                                               targets[:, _target_row(name)], seed) for name in UNTAUGHT}


def untaught_probes(model: CLIPVisionModel, processor, *, world_seed: int, n_probe: int = 500, seed: int = 0) -> dict:
    """What a tower carries of the attributes it was never taught: held-out accuracy of linear probes for size,
    fill and the mark on its layer −2 patch features (cells that hold an object; chance 0.5 each), fitted as the
    components' own frozen probes are. Run on a tower after stage 2, it shows how far training moved it."""
    images, targets = _vision_data(world_seed, "vision_probe", n_probe, model.config.image_size)
    features = _features(model, images, processor, PROBE_LAYER)
    probe_features, probe_targets = _probe_set(model, processor, world_seed, model.config.image_size)
    return {k: round(v, 4) for k, v in _untaught(probe_features, probe_targets, features, targets, seed).items()}


def _linear_probe(train_x, train_y, test_x, test_y, seed: int) -> float:
    """Accuracy on non-empty test cells of a logistic regression fitted on non-empty train cells."""
    train_x, train_y = train_x[train_y != IGNORE_INDEX], train_y[train_y != IGNORE_INDEX]
    test_x, test_y = test_x[test_y != IGNORE_INDEX], test_y[test_y != IGNORE_INDEX]
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6  # standardised, so one learning rate suits every run
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(seed)
    probe = nn.Linear(train_x.shape[1], int(train_y.max()) + 1)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(ATTR_PROBE_STEPS):  # full batch: a few thousand cells
        loss = F.cross_entropy(probe(train_x), train_y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (probe(test_x).argmax(-1) == test_y).float().mean().item()


def taught_reading(model: CLIPVisionModel, processor, cfg: TaughtReadingConfig, *, world_seed: int,
                   attribute: str = "mark", progress: bool = True) -> dict:
    """How well the tower reads `attribute` once it is taught it: a copy of the tower is fine-tuned end to end
    with fresh linear colour, shape and `attribute` heads on the probe layer; returns held-out accuracies (the
    attribute's on cells with an object) and seconds. The frozen probe of `pretrain_vision` is the other side.
    """
    if attribute not in UNTAUGHT:
        raise ValueError(f"taught_reading teaches one of {tuple(UNTAUGHT)}; got {attribute!r}")
    values = UNTAUGHT[attribute]
    image_size, hidden = model.config.image_size, model.config.hidden_size
    images, targets = _vision_data(world_seed, "vision_taught", cfg.n_images, image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        tower = copy.deepcopy(model)
        heads = _CellHeads(hidden)
        reader = nn.Linear(hidden, len(values))
        start = time.perf_counter()
        _teach(tower, heads, reader, images, targets[:, [0, 1, _target_row(attribute)]], processor, cfg, progress)
        seconds = time.perf_counter() - start
    tower.eval()
    test_images, test_targets = _vision_data(world_seed, "vision_probe", cfg.n_eval, image_size)
    features = _features(tower, test_images, processor, PROBE_LAYER)
    i = HEAD_LAYERS.index(PROBE_LAYER)
    with torch.no_grad():
        colour_ok = heads.colour[i](features).argmax(-1) == test_targets[:, 0]
        shape_ok = heads.shape[i](features).argmax(-1) == test_targets[:, 1]
        truth = test_targets[:, _target_row(attribute)]
        read_ok = (reader(features).argmax(-1) == truth)[truth != IGNORE_INDEX]
    occupied = test_targets[:, 0] != EMPTY_COLOUR
    return {f"{attribute}_taught_acc": round(read_ok.float().mean().item(), 4),
            "object_acc": round((colour_ok & shape_ok)[occupied].float().mean().item(), 4),
            "train_seconds": round(seconds, 2)}


def _teach(tower, heads, reader, images, targets, processor, cfg: TaughtReadingConfig, progress: bool) -> None:
    """`cfg.steps` steps on colour, shape (targets rows 0, 1) and the attribute (row 2), all parameters trained."""
    params = [*tower.parameters(), *heads.parameters(), *reader.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    scheduler = _cosine(optimizer, cfg.steps)
    order = torch.Generator().manual_seed(cfg.seed)
    batches = [idx for _ in range(math.ceil(cfg.steps * cfg.batch_size / len(images)))
               for idx in torch.randperm(len(images), generator=order).split(cfg.batch_size)][: cfg.steps]
    tower.train()
    for idx in tqdm(batches, desc="teaching the tower", disable=not progress):
        states = tower(pixel_values=_normalise(images[idx], processor), output_hidden_states=True).hidden_states
        read = reader(_patch_tokens(states[PROBE_LAYER]))
        loss = _cell_loss(heads(states), targets[idx]) + \
            F.cross_entropy(read.flatten(0, 1), targets[idx, 2].flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()


def _cosine(optimizer, total_steps: int):
    """Cosine decay after a 5% linear warm-up."""
    return get_cosine_schedule_with_warmup(optimizer, max(1, total_steps // 20), total_steps)


# --- language model ---------------------------------------------------------------------------------


def pretrain_language_model(train_texts: list[str], held_out_texts: list[str], tokenizer, cfg: LMPretrainConfig,
                            *, progress: bool = True) -> tuple[LlamaForCausalLM, dict]:
    """Train a LlamaForCausalLM on `train_texts` (packed into max_length rows, loss on every real token);
    return it and metrics (held-out perplexity before and after, seconds, parameters, tokens trained on)."""
    if not train_texts or not held_out_texts:
        raise ValueError("pretrain_language_model needs non-empty train_texts and held_out_texts")
    pad_id = tokenizer.pad_token_id
    texts = list(train_texts)
    random.Random(cfg.seed).shuffle(texts)  # neighbours in a packed row come from anywhere in the corpus
    rows = _pack(_encode(texts, tokenizer), cfg.max_length, pad_id)
    held_out = [ids[: cfg.max_length] for ids in _encode(held_out_texts, tokenizer)]
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG stream
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(_llama_config(cfg, tokenizer))
        ppl_before = perplexity(model, held_out, pad_id, cfg.batch_size)
        batches = _lm_batches(rows, cfg)
        start = time.perf_counter()
        _train_lm(model, rows, batches, pad_id, cfg, progress)
        train_seconds = time.perf_counter() - start
        model.eval()
        ppl_after = perplexity(model, held_out, pad_id, cfg.batch_size)
    metrics = {
        "ppl_before": round(ppl_before, 3),
        "ppl_after": round(ppl_after, 3),
        "train_seconds": round(train_seconds, 2),
        "params": sum(p.numel() for p in model.parameters()),
        "train_tokens": sum(int((rows[idx] != pad_id).sum()) for idx in batches),  # real tokens trained on
    }
    return model, metrics


def save_language_model(model: LlamaForCausalLM, tokenizer, folder: str | os.PathLike) -> Path:
    """Write the LM and its tokenizer as a plain causal-LM folder (what `model.source=compose` takes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _llama_config(cfg: LMPretrainConfig, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=max(MIN_POSITIONS, cfg.max_length),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _encode(texts: list[str], tokenizer) -> list[list[int]]:
    """Token ids with BOS first and EOS last, each exactly once.

    BOS follows the rule of data/templates.py (prefixed unless the text starts with it). EOS is appended
    unless the text ends with it (a chat rendering already does), so the model learns where texts stop.
    """
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    texts = [t if bos is None or t.startswith(bos) else bos + t for t in texts]
    texts = [t if eos is None or t.endswith(eos) else t + eos for t in texts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _pack(seqs: list[list[int]], max_length: int, pad_id: int) -> torch.Tensor:
    """Concatenate all sequences and cut into rows of max_length; the last row is padded."""
    flat = [t for s in seqs for t in s]
    n_rows = math.ceil(len(flat) / max_length)
    rows = torch.full((n_rows * max_length,), pad_id, dtype=torch.long)
    rows[: len(flat)] = torch.tensor(flat, dtype=torch.long)
    return rows.view(n_rows, max_length)


def _labels(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    # Padding only ever trails real tokens, so causal attention alone keeps it out of their context;
    # masking its labels keeps it out of the loss.
    return input_ids.masked_fill(input_ids == pad_id, IGNORE_INDEX)


def _lm_batches(rows: torch.Tensor, cfg: LMPretrainConfig) -> list[torch.Tensor]:
    """Row indices of every training step: shuffled epochs, cut at max_train_tokens."""
    order = torch.Generator().manual_seed(cfg.seed)
    batches = [idx for _ in range(cfg.epochs)
               for idx in torch.randperm(len(rows), generator=order).split(cfg.batch_size)]
    if cfg.max_train_tokens is None:
        return batches
    max_rows, kept, seen = max(1, cfg.max_train_tokens // cfg.max_length), [], 0
    for idx in batches:
        if seen >= max_rows:
            break
        kept.append(idx[: max_rows - seen])
        seen += len(kept[-1])
    return kept


def _train_lm(model, rows: torch.Tensor, batches: list[torch.Tensor], pad_id: int, cfg: LMPretrainConfig,
              progress: bool) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    scheduler = _cosine(optimizer, len(batches))
    model.train()
    bar = tqdm(batches, desc="language model pretraining", disable=not progress)
    for idx in bar:
        batch = rows[idx]
        loss = model(input_ids=batch, labels=_labels(batch, pad_id)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


@torch.inference_mode()
def perplexity(model, seqs: list[list[int]], pad_id: int, batch_size: int = 32) -> float:
    """exp(mean next-token NLL) over all predicted tokens of `seqs`, each scored on its own (right-padded)."""
    total_nll, total_tokens = 0.0, 0
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: little padding
    for start in range(0, len(order), batch_size):
        batch = [seqs[i] for i in order[start: start + batch_size]]
        width = max(len(s) for s in batch)
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in batch], dtype=torch.long)
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = _labels(ids, pad_id)[:, 1:]
        total_nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
    return math.exp(total_nll / max(1, total_tokens))
