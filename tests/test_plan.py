"""Freeze plans on tiny Llava / LlavaNext: exact trainable counts computed from module shapes alone."""

from __future__ import annotations

import pytest
import torch

from vlmablate.config import FreezeConfig, LoraConfig, ProjectorConfig, QuantConfig, StageConfig, VisionConfig
from vlmablate.model.plan import (
    apply_plan,
    component_of,
    format_table,
    lora_target_pattern,
    parameter_table,
    resolve_plan,
    unused_vision_parameters,
)
from vlmablate.model.tiny import TinySpec, build_tiny_llava, train_tiny_tokenizer
from vlmablate.train.optim import parameter_groups

SPEC = TinySpec()
LORA = LoraConfig(r=4, alpha=8, dropout=0.0, targets="all-linear")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(SPEC.vocab_size)


def fresh(tokenizer, arch="llava"):
    return build_tiny_llava(TinySpec(arch=arch), tokenizer)


def plan_for(vision="frozen", llm="frozen", projector=True, last_n=0, projector_type="mlp2x_gelu", quant="none"):
    return resolve_plan(
        VisionConfig(policy=vision, last_n=last_n, lora=LORA if vision == "lora" else None),
        ProjectorConfig(type=projector_type, trainable=projector),
        FreezeConfig(name=f"{llm}_llm", policy=llm, lora=LORA if llm == "lora" else None),
        QuantConfig(mode=quant),
        StageConfig(name="instruct", lr=2e-5),
    )


# --- counts from the shapes in TinySpec, written out by hand --------------------------------------
V, P, VI, NV = SPEC.vision_hidden, SPEC.patch_size, SPEC.vision_intermediate, SPEC.vision_layers
T, TI, NT, KV = SPEC.text_hidden, SPEC.text_intermediate, SPEC.text_layers, SPEC.text_kv_heads * (SPEC.text_hidden // SPEC.text_heads)
N_PATCH = (SPEC.image_size // P) ** 2

VISION_BLOCK = 4 * (V * V + V) + 2 * (2 * V) + (V * VI + VI) + (VI * V + V)
VISION_TOTAL = 3 * P * P * V + V + (N_PATCH + 1) * V + 2 * V + NV * VISION_BLOCK + 2 * V
VISION_USED = VISION_TOTAL - VISION_BLOCK - 2 * V  # feature layer -2: last block and post-layernorm unused
PROJECTOR = (V * T + T) + (T * T + T)


def llm_total(vocab):
    block = T * T + 2 * T * KV + T * T + 3 * T * TI + 2 * T
    return vocab * T + NT * block + T + vocab * T  # embeddings, blocks, final norm, lm_head


LLM_LORA = NT * 4 * ((T + T) + 2 * (T + KV) + (T + T) + 2 * (T + TI) + (TI + T))  # r=4 on q,k,v,o,gate,up,down
VISION_LORA_PER_BLOCK = 4 * (4 * (V + V) + (V + VI) + (VI + V))


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
@pytest.mark.parametrize(
    "vision,llm,expected",
    [
        ("frozen", "frozen", {"vision": 0, "projector": PROJECTOR, "llm": 0}),
        ("frozen", "lora", {"vision": 0, "projector": PROJECTOR, "llm": LLM_LORA}),
        ("unfrozen", "lora", {"vision": VISION_USED, "projector": PROJECTOR, "llm": LLM_LORA}),
        ("lora", "lora", {"vision": 2 * VISION_LORA_PER_BLOCK, "projector": PROJECTOR, "llm": LLM_LORA}),
        ("last_n", "frozen", {"vision": VISION_BLOCK, "projector": PROJECTOR, "llm": 0}),
        ("unfrozen", "full", {"vision": VISION_USED, "projector": PROJECTOR, "llm": None}),
    ],
)
def test_exact_trainable_counts(tokenizer, arch, vision, llm, expected):
    model = fresh(tokenizer, arch)
    vocab = model.config.text_config.vocab_size
    plan = plan_for(vision=vision, llm=llm, last_n=1 if vision == "last_n" else 0)
    model = apply_plan(model, plan)
    table = parameter_table(model, plan)
    expected = dict(expected)
    if expected["llm"] is None:
        expected["llm"] = llm_total(vocab)
    newline = T if arch == "llava_next" else 0  # LlavaNext's image_newline belongs to the connector
    expected["projector"] += newline
    assert {c: table["trainable"][c] for c in ("vision", "projector", "llm")} == expected
    assert table["trainable"]["total"] == sum(expected.values())
    assert table["components"]["vision"]["total"] == VISION_TOTAL
    assert table["components"]["vision"]["unused"] == VISION_BLOCK + 2 * V
    assert table["components"]["projector"]["total"] == PROJECTOR + newline
    assert table["components"]["llm"]["total"] == llm_total(vocab)
    assert table["total"] == VISION_TOTAL + PROJECTOR + newline + llm_total(vocab)
    assert "[TRAINABLE]" in format_table(table, plan)


def test_lora_stays_in_the_language_model(tokenizer):
    model = apply_plan(fresh(tokenizer), plan_for(llm="lora"))
    lora_modules = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert len(lora_modules) == NT * 7
    assert all(".model.language_model." in n for n in lora_modules)
    assert not any("vision_tower" in n or "lm_head" in n or "projector" in n for n in lora_modules)


def test_vision_lora_only_on_blocks_that_feed_the_projector(tokenizer):
    model = fresh(tokenizer)
    pattern = lora_target_pattern(model, "vision", "all-linear")
    model = apply_plan(model, plan_for(vision="lora", llm="frozen"))
    lora = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert len(lora) == 2 * 6  # blocks 0 and 1; q,k,v,out_proj,fc1,fc2
    assert all("encoder.layers.2." not in n and "vision_tower" in n for n in lora)
    assert pattern.startswith(r"model\.vision_tower")


def test_explicit_targets_are_checked(tokenizer):
    model = fresh(tokenizer)
    assert lora_target_pattern(model, "llm", ["q_proj", "v_proj"]).endswith("(?:q_proj|v_proj)")
    with pytest.raises(ValueError, match="match no linear layer"):
        lora_target_pattern(model, "llm", ["qkv_proj"])


def test_unused_vision_parameters_follow_feature_layer(tokenizer):
    model = fresh(tokenizer)
    unused = unused_vision_parameters(model)
    assert all(".layers.2." in n or "post_layernorm" in n for n in unused)
    model.config.vision_feature_layer = -1
    assert [n for n in unused_vision_parameters(model)] == [n for n in unused if "post_layernorm" in n]


def test_linear_projector_keeps_identity_fixed(tokenizer):
    model = fresh(tokenizer)
    plan = plan_for(projector_type="linear")
    model = apply_plan(model, plan)
    table = parameter_table(model, plan)
    assert table["trainable"]["projector"] == V * T + T
    assert table["components"]["projector"]["fixed"] == T * T + T


def test_backward_gives_gradients_exactly_to_trainable(tokenizer):
    model = apply_plan(fresh(tokenizer), plan_for(vision="unfrozen", llm="lora"))
    ids = torch.tensor([[tokenizer.bos_token_id] + [model.config.image_token_index] * N_PATCH + [10, 11, 12]])
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, SPEC.image_size, SPEC.image_size), labels=ids)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    lora_b = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert all(g.abs().sum() > 0 for g in lora_b)


def test_component_of_every_parameter(tokenizer):
    model = apply_plan(fresh(tokenizer, "llava_next"), plan_for(llm="lora"))
    assert {component_of(n) for n, _ in model.named_parameters()} == {"vision", "projector", "llm"}
    with pytest.raises(ValueError, match="no component"):
        component_of("model.something_else.weight")


def test_optimizer_groups_carry_component_lrs(tokenizer):
    plan = resolve_plan(
        VisionConfig(policy="unfrozen", lr=1e-6),
        ProjectorConfig(lr=1e-3),
        FreezeConfig(name="lora_llm", policy="lora", lr=2e-4, lora=LORA),
        QuantConfig(),
        StageConfig(name="instruct", lr=2e-5),
    )
    model = apply_plan(fresh(tokenizer), plan)
    decay = {n for n, _ in model.named_parameters() if "bias" not in n and "norm" not in n}
    groups = parameter_groups(model, plan, decay_names=decay, weight_decay=0.1)
    lrs = {g["name"]: (g["lr"], g["weight_decay"]) for g in groups}
    assert lrs == {
        "vision/decay": (1e-6, 0.1), "vision/no_decay": (1e-6, 0.0),
        "projector/decay": (1e-3, 0.1), "projector/no_decay": (1e-3, 0.0),
        "llm/decay": (2e-4, 0.1),
    }
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_stage_lr_is_the_fallback():
    plan = plan_for(vision="unfrozen", llm="full")
    assert (plan.vision.lr, plan.projector.lr, plan.llm.lr) == (2e-5, 2e-5, 2e-5)
    assert plan_for().llm.lr is None
    assert plan_for(quant="nf4", llm="lora").skip_modules() == [
        "model.vision_tower", "model.multi_modal_projector", "lm_head"]


def test_lr_scale_multiplies_every_component_lr_and_keeps_ratios():
    cfgs = (VisionConfig(policy="unfrozen", lr=2e-6), ProjectorConfig(), FreezeConfig(name="lora_llm", policy="lora",
            lr=2e-4, lora=LORA), QuantConfig(), StageConfig(name="instruct", lr=2e-5))
    base, scaled = resolve_plan(*cfgs), resolve_plan(*cfgs, lr_scale=10)
    for c in ("vision", "projector", "llm"):
        assert scaled.component(c).lr == pytest.approx(10 * base.component(c).lr)
    assert (scaled.vision.lr, scaled.projector.lr, scaled.llm.lr) == pytest.approx((2e-5, 2e-4, 2e-3))


def test_gradient_audit_waits_for_an_image_before_checking_the_image_path(tokenizer):
    from types import SimpleNamespace

    from vlmablate.train.audit import GradientAudit, PlanViolation

    model = apply_plan(fresh(tokenizer), plan_for(llm="lora"))
    had_images = {"value": False}
    audit = GradientAudit(step_had_images=lambda: had_images["value"])
    audit.on_train_begin(None, None, None, model=model)
    ids = torch.tensor([[tokenizer.bos_token_id, 10, 11, 12]])
    model(input_ids=ids, labels=ids).loss.backward()  # text only: the projector gets no gradient
    state = SimpleNamespace(global_step=0)
    audit.on_pre_optimizer_step(None, state, None, model=model)  # waived, not an error
    audit.on_optimizer_step(None, state, None, model=model)
    assert not audit.done
    had_images["value"], state.global_step = True, 1  # a step with an image, still no projector gradient
    with pytest.raises(PlanViolation, match="multi_modal_projector"):
        audit.on_pre_optimizer_step(None, state, None, model=model)
