"""QLoRA and int8 LoRA on the CPU: 4-bit LLM linears only, LoRA gradients flow, base weights stay put."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from vlmablate.config import FreezeConfig, LoraConfig, ModelConfig, ProjectorConfig, QuantConfig, StageConfig, VisionConfig
from vlmablate.model.load import load_model
from vlmablate.model.plan import apply_plan, parameter_table, resolve_plan
from vlmablate.model.tiny import TinySpec

SPEC = TinySpec()


def load_planned(mode: str, vision: str = "frozen"):
    plan = resolve_plan(
        VisionConfig(policy=vision),
        ProjectorConfig(),
        FreezeConfig(name="lora_llm", policy="lora", lr=2e-4, lora=LoraConfig(r=4, alpha=8, dropout=0.0)),
        QuantConfig(mode=mode),
        StageConfig(name="instruct", lr=2e-5),
    )
    loaded = load_model(ModelConfig(name="tiny_random", source="tiny_random", torch_dtype="float32"),
                        projector_type="mlp2x_gelu", quant=QuantConfig(mode=mode),
                        skip_modules=plan.skip_modules(), compute_dtype=torch.float32)
    return apply_plan(loaded.model, plan), plan


def batch(model):
    ids = torch.tensor([[1] + [model.config.image_token_index] * 16 + [20, 21, 22, 23]])
    return dict(input_ids=ids, pixel_values=torch.randn(1, 3, SPEC.image_size, SPEC.image_size), labels=ids)


@pytest.mark.parametrize("mode,linear_type", [("nf4", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt)])
def test_only_the_language_model_is_quantized(mode, linear_type):
    model, plan = load_planned(mode)
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(k in name for k in ("lora_A", "lora_B")):
            part = "llm" if ".language_model." in name else "head" if "lm_head" in name else "other"
            kinds.setdefault(part, set()).add(type(module).__name__ if not isinstance(module, linear_type) else "quantized")
    assert kinds["llm"] == {"quantized"}
    assert "quantized" not in kinds["other"] and "quantized" not in kinds["head"]
    table = parameter_table(model, plan)
    T, TI, NT, KV = SPEC.text_hidden, SPEC.text_intermediate, SPEC.text_layers, 32
    assert table["components"]["llm"]["quantized"] == NT * (2 * T * T + 2 * T * KV + 3 * T * TI)


def test_qlora_backward_gives_lora_gradients_and_leaves_base_weights_unchanged():
    model, _ = load_planned("nf4", vision="unfrozen")
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # the second step moves lora_A too (lora_B starts at zero)
        loss = model(**batch(model)).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads.values())
        assert all(grads[n].abs().sum() > 0 for n in grads if "lora_B" in n)
        optimizer.step()
        optimizer.zero_grad()
    assert all(grads[n].abs().sum() > 0 for n in grads if "lora_A" in n)
    for name, p in model.named_parameters():
        if name in base:
            assert torch.equal(p.detach(), base[name]), name
