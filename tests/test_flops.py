"""Training FLOPs per freeze plan: hand-derived closed forms on a tiny Llava, the config-only count against
the model's, and torch's FlopCounterMode running one real forward and backward step."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, PhiConfig

from vlmablate.config import FreezeConfig, LoraConfig, ProjectorConfig, QuantConfig, StageConfig, VisionConfig
from vlmablate.model.flops import (
    ComponentFlops,
    flops_from_config,
    format_flops,
    shapes_from_config,
    shapes_from_model,
    training_flops,
)
from vlmablate.model.plan import apply_plan, resolve_plan, unwrap
from vlmablate.model.tiny import TinySpec, build_tiny_llava, train_tiny_tokenizer

SPEC = TinySpec()
LORA = LoraConfig(r=4, alpha=8, dropout=0.0, targets="all-linear")
HUB_CONFIGS = Path(__file__).resolve().parents[1] / "src" / "vlmablate" / "model" / "hub_configs"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(SPEC.vocab_size)


def plan_for(vision="frozen", projector=True, llm="frozen", projector_type="mlp2x_gelu"):
    return resolve_plan(
        VisionConfig(policy=vision, last_n=1 if vision == "last_n" else 0, lora=LORA if vision == "lora" else None),
        ProjectorConfig(type=projector_type, trainable=projector),
        FreezeConfig(name=f"{llm}_llm", policy=llm, lora=LORA if llm == "lora" else None),
        QuantConfig(),
        StageConfig(name="instruct", lr=2e-5),
    )


def tiny(tokenizer, plan, arch="llava"):
    """A tiny model with eager attention (FlopCounterMode sees its QK^T and AV as bmm), the plan applied."""
    model = build_tiny_llava(TinySpec(arch=arch), tokenizer)
    model.set_attn_implementation("eager")
    return apply_plan(model, plan)


def counted_step(model, image_token: int, bos: int = 1) -> FlopCounterMode:
    """One forward and backward of one sample (SEQ tokens, one image) under torch's FLOP counter."""
    ids = torch.tensor([[bos] + [image_token] * PATCHES + [10, 11, 12]])
    pixels = torch.randn(1, 3, SPEC.image_size, SPEC.image_size)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
    return counter


def counted_in(counter: FlopCounterMode, module: str) -> dict[str, int]:
    """What the counter attributes to a module, by op, named by its path in the Llava model."""
    name = next(n for n in counter.get_flop_counts() if n.endswith(".model." + module))
    return {str(op): n for op, n in counter.get_flop_counts()[name].items()}


# --- sizes from TinySpec, written out by hand ---------------------------------------------------------------
V, VI, P = SPEC.vision_hidden, SPEC.vision_intermediate, SPEC.patch_size
USED = SPEC.vision_layers - 1  # vision_feature_layer -2: the last block feeds nothing
PATCHES = (SPEC.image_size // P) ** 2
TOWER = PATCHES + 1  # CLS
T, TI, NT = SPEC.text_hidden, SPEC.text_intermediate, SPEC.text_layers
KV = SPEC.text_kv_heads * (T // SPEC.text_heads)  # GQA: k and v are narrower than q
R = LORA.r
SEQ = 1 + PATCHES + 3  # <s>, the image tokens, three text tokens

# multiply-adds a token meets in the weights
PATCH_W = 3 * P * P * V
VISION_BLOCK_W = 4 * V * V + 2 * V * VI  # q, k, v, out; fc1, fc2
VISION_QKV_W = 3 * V * V
VISION_BLOCK_LORA = R * (4 * (V + V) + (V + VI) + (VI + V))
PROJECTOR_W = V * T + T * T
LLM_BLOCK_W = T * T + 2 * T * KV + T * T + 3 * T * TI  # q, k, v, o; gate, up, down
LLM_QKV_W = T * T + 2 * T * KV
LLM_BLOCK_LORA = R * ((T + T) + 2 * (T + KV) + (T + T) + 2 * (T + TI) + (TI + T))
# attention per block and sample: QK^T and AV, at 2 FLOPs a multiply-add (heads x head_dim = hidden)
VISION_ATTN = 2 * 2 * TOWER * TOWER * V
LLM_ATTN = 2 * 2 * SEQ * SEQ * T
# HF runs every encoder block, but Llava reads hidden_states[-2]: the last block's forward is work nobody
# reads, which the count leaves out by design (it is not part of the model LLaVA trains).
UNUSED_BLOCK_FORWARD = 2 * TOWER * VISION_BLOCK_W + VISION_ATTN


def vision_flops(policy: str) -> ComponentFlops:
    lora = VISION_BLOCK_LORA if policy == "lora" else 0
    forward = 2 * (PATCHES * PATCH_W + TOWER * USED * (VISION_BLOCK_W + lora))
    frozen = ComponentFlops(forward=forward, attention=USED * VISION_ATTN)
    if policy == "frozen":
        return frozen
    if policy == "unfrozen":  # the patch convolution's input is the pixels: no input gradient
        return replace(frozen, backward_activations=2 * TOWER * USED * VISION_BLOCK_W,
                       backward_attention=2 * USED * VISION_ATTN, backward_weights=forward)
    if policy == "last_n":  # block 1 alone trains; its layer_norm1 trains, so its q, k, v need input gradients
        return replace(frozen, backward_activations=2 * TOWER * VISION_BLOCK_W, backward_attention=2 * VISION_ATTN,
                       backward_weights=2 * TOWER * VISION_BLOCK_W)
    # LoRA: block 0's q, k, v (base and A) read the frozen embeddings, whose gradient nobody needs
    return replace(frozen, backward_activations=2 * TOWER * (USED * (VISION_BLOCK_W + lora) - VISION_QKV_W - 3 * R * V),
                   backward_attention=2 * USED * VISION_ATTN, backward_weights=2 * TOWER * USED * lora)


def projector_flops(trainable: bool, tower_trains: bool) -> ComponentFlops:
    forward = 2 * PATCHES * PROJECTOR_W
    if not trainable:
        return ComponentFlops(forward=forward)
    # linear_1's input gradient is needed only when something in the tower trains
    activations = 2 * PATCHES * (PROJECTOR_W if tower_trains else T * T)
    return ComponentFlops(forward=forward, backward_activations=activations, backward_weights=forward)


def llm_flops(policy: str, vocab: int, projector_trains: bool) -> ComponentFlops:
    lora = LLM_BLOCK_LORA if policy == "lora" else 0
    forward = 2 * SEQ * (NT * (LLM_BLOCK_W + lora) + vocab * T)  # lm_head included, embeddings not
    activations = forward
    if not projector_trains:  # LoRA LLM alone: layer 0's q, k, v (base and A) read grad-free embeddings
        activations -= 2 * SEQ * (LLM_QKV_W + 3 * R * T)
    weights = {"frozen": 0, "lora": 2 * SEQ * NT * lora, "full": forward}[policy]
    return ComponentFlops(forward=forward, attention=NT * LLM_ATTN, backward_activations=activations,
                          backward_attention=2 * NT * LLM_ATTN, backward_weights=weights)


# (vision, projector trains, llm): the reference freeze grid first, then the cells where precision matters
CELLS = [
    ("frozen", True, "frozen"),
    ("frozen", True, "lora"),
    ("unfrozen", True, "lora"),
    ("unfrozen", True, "full"),
    ("frozen", False, "lora"),
    ("last_n", True, "frozen"),
    ("lora", True, "frozen"),
]


@pytest.mark.parametrize("vision,projector,llm", CELLS)
def test_counts_equal_closed_forms(tokenizer, vision, projector, llm):
    model = tiny(tokenizer, plan_for(vision, projector, llm))
    vocab = unwrap(model).config.text_config.vocab_size
    flops = training_flops(model, seq_len=SEQ)
    assert flops.vision == vision_flops(vision)
    assert flops.projector == projector_flops(projector, tower_trains=vision != "frozen")
    assert flops.llm == llm_flops(llm, vocab, projector_trains=projector)
    assert flops.total.total == sum(flops.component(c).total for c in ("vision", "projector", "llm"))


@pytest.mark.parametrize("vision,projector,llm", CELLS)
def test_flop_counter_agrees(tokenizer, vision, projector, llm):
    model = tiny(tokenizer, plan_for(vision, projector, llm))
    counter = counted_step(model, unwrap(model).config.image_token_index, tokenizer.bos_token_id)
    # run, never read, no backward
    assert sum(counted_in(counter, f"vision_tower.encoder.layers.{USED}").values()) == UNUSED_BLOCK_FORWARD
    # exact: the count and the counter both see every matmul, conv and bmm; neither sees elementwise work
    assert counter.get_total_flops() - UNUSED_BLOCK_FORWARD == training_flops(model, seq_len=SEQ).total.total


def test_frozen_tower_under_trainable_projector_has_no_backward(tokenizer):
    model = tiny(tokenizer, plan_for("frozen", True, "frozen"))
    flops = training_flops(model, seq_len=SEQ)
    assert flops.vision.backward_total == 0
    # the frozen LLM still carries the gradient back to the projector, and computes no weight gradient
    assert flops.llm.backward_activations > 0 and flops.llm.backward_attention > 0
    assert flops.llm.backward_weights == 0
    tower = counted_in(counted_step(model, model.config.image_token_index, tokenizer.bos_token_id), "vision_tower")
    assert set(tower) == {"aten.convolution", "aten.addmm", "aten.bmm"}  # forward ops only
    assert sum(tower.values()) == flops.vision.forward_total + UNUSED_BLOCK_FORWARD


def test_text_only_sample_has_no_tower_and_no_backward_under_stage_one(tokenizer):
    flops = training_flops(tiny(tokenizer, plan_for("frozen", True, "frozen")), seq_len=SEQ, crops=0)
    assert flops.vision == flops.projector == ComponentFlops()
    assert flops.llm.backward_total == 0  # nothing trainable lies upstream of the LLM without an image


def test_linear_projector_trains_linear_1_only(tokenizer):
    flops = training_flops(tiny(tokenizer, plan_for(projector_type="linear")), seq_len=SEQ)
    # linear_2 is a fixed identity: no weight gradient, but it carries linear_1's gradient back
    assert flops.projector == ComponentFlops(forward=2 * PATCHES * PROJECTOR_W,
                                             backward_activations=2 * PATCHES * T * T,
                                             backward_weights=2 * PATCHES * V * T)


@pytest.mark.parametrize("arch,crops", [("llava", 1), ("llava_next", 5)])
@pytest.mark.parametrize("vision,projector,llm", CELLS)
def test_config_count_equals_model_count(tokenizer, arch, crops, vision, projector, llm):
    plan = plan_for(vision, projector, llm)
    model = tiny(tokenizer, plan, arch)
    config = unwrap(model).config
    assert shapes_from_config(config, plan) == shapes_from_model(model)
    assert flops_from_config(config, plan, seq_len=SEQ, crops=crops) == training_flops(model, seq_len=SEQ, crops=crops)


@pytest.mark.parametrize("vision,projector,llm", [("frozen", False, "lora"), ("unfrozen", True, "full")])
def test_parallel_blocks_of_phi(vision, projector, llm):
    """Phi runs attention and the MLP side by side on one norm's output (phi-2 is a compose preset)."""
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=V, intermediate_size=VI, num_hidden_layers=3, num_attention_heads=4,
                                       image_size=SPEC.image_size, patch_size=P),
        text_config=PhiConfig(vocab_size=100, hidden_size=T, intermediate_size=TI, num_hidden_layers=NT,
                              num_attention_heads=4, num_key_value_heads=2),
        image_token_index=99, image_seq_length=PATCHES,
    )
    plan = plan_for(vision, projector, llm)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    model = apply_plan(model, plan)
    counter = counted_step(model, image_token=99)
    flops = training_flops(model, seq_len=SEQ)
    assert counter.get_total_flops() - UNUSED_BLOCK_FORWARD == flops.total.total
    assert flops_from_config(config, plan, seq_len=SEQ) == flops


def hub_config(name: str):
    data = json.loads((HUB_CONFIGS / name / "config.json").read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


@pytest.mark.parametrize("name,mlp,kv", [("llava-hf--llava-1.5-7b-hf", 11008, 4096),
                                         ("llava-hf--llava-v1.6-mistral-7b-hf", 14336, 1024)])
def test_seven_b_forward_from_config(name, mlp, kv):
    """CLIP ViT-L/14-336 under a 32-layer 4096-wide LLM; Mistral's GQA has 8 k/v heads of 128."""
    flops = flops_from_config(hub_config(name), plan_for("frozen", True, "frozen"), seq_len=2048)
    assert flops.llm.forward == 2 * 2048 * (32 * (2 * 4096 * 4096 + 2 * 4096 * kv + 3 * 4096 * mlp) + 32064 * 4096)
    assert flops.llm.attention == 32 * 2 * 2 * 2048 * 2048 * 4096
    assert flops.vision.forward == 2 * (576 * 3 * 14 * 14 * 1024 + 577 * 23 * (4 * 1024 * 1024 + 2 * 1024 * 4096))
    assert flops.vision.backward_total == 0 and flops.llm.backward_weights == 0


def test_seven_b_config_count_equals_meta_model_count():
    """At real shapes (GQA, LlavaNext, LoRA r=128 on the LLM, unfrozen tower), on the meta device."""
    from transformers import LlavaNextForConditionalGeneration

    config = hub_config("llava-hf--llava-v1.6-mistral-7b-hf")
    plan = plan_for("unfrozen", True, "lora")
    plan = replace(plan, llm=replace(plan.llm, lora=LoraConfig(r=128)))  # LLaVA-1.5's LoRA rank
    with torch.device("meta"):
        model = apply_plan(LlavaNextForConditionalGeneration(config), plan)
    assert flops_from_config(config, plan, seq_len=2048, crops=5) == training_flops(model, seq_len=2048, crops=5)


def test_per_token_and_table(tokenizer):
    flops = training_flops(tiny(tokenizer, plan_for("frozen", True, "lora")), seq_len=SEQ)
    per_token = flops.per_token()
    assert per_token["total"].total == pytest.approx(flops.total.total / SEQ)
    assert per_token["llm"].backward_weights == pytest.approx(2 * NT * LLM_BLOCK_LORA)
    assert flops.per_token(tokens=3)["total"].total == pytest.approx(flops.total.total / 3)
    table = format_flops(flops)
    assert [line.split()[0] for line in table.splitlines()[2:]] == ["vision", "projector", "llm", "total"]
