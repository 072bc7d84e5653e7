"""`python -m vlmablate.plan`: meta-device counts equal the runner's on real tiny checkpoints, the shipped
preset configs give the known model sizes, and the memory estimate follows its terms."""

from __future__ import annotations

import pytest
from conftest import compose_run

from vlmablate.model.plan import parameter_table, resolve_plan
from vlmablate.plan import count_cell, format_grid, format_plan, grid_cells, plan_cell
from vlmablate.train.runner import load_cell_model, prepare_model

CELLS = [
    ("vision=frozen", "freeze=frozen_llm"),
    ("vision=frozen", "freeze=lora_llm", "quant=nf4"),
    ("vision=unfrozen", "freeze=lora_llm", "quant=int8"),
    ("vision=lora", "freeze=lora_llm"),
    ("vision=last_n", "vision.last_n=1", "freeze=full_llm"),
]


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
@pytest.mark.parametrize("cell", CELLS, ids=lambda c: "-".join(o.split("=")[1] for o in c))
def test_meta_counts_equal_the_runners_counts(arch, cell):
    cfg, _ = compose_run("model=tiny_random", f"model.tiny.arch={arch}", *cell)
    planned, _ = count_cell(cfg)
    plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage, lr_scale=cfg.train.lr_scale)
    model, _, _ = load_cell_model(cfg, prepare_model(cfg, plan), plan, None)  # what the runner loads, quantized
    assert planned == parameter_table(model, plan)


@pytest.mark.parametrize(("model", "total", "lora_trainable"), [
    ("llava15_7b", 7_063_427_072, 20_979_712 + 39_976_960),  # projector + LoRA r16 on Llama-2-7B's linears
    ("llava16_mistral_7b", 7_566_747_648, 20_983_808 + 41_943_040),  # + image_newline; Mistral's GQA
])
def test_shipped_preset_configs_give_the_known_sizes(model, total, lora_trainable):
    cfg, _ = compose_run(f"model={model}", "quant=nf4", "train=rtx4090_qlora", "eval=none")
    table, config = count_cell(cfg)
    assert table["total"] == total and table["trainable"]["total"] == lora_trainable
    assert table["components"]["vision"]["unused"] == 12_598_272  # CLIP-L's last block + post-layernorm
    # every LLM linear but lm_head is quantized: 32 layers x (4 attention + 3 MLP projections)
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    attention = 2 * text.hidden_size ** 2 + 2 * text.hidden_size * text.num_key_value_heads * head_dim
    mlp = 3 * text.hidden_size * text.intermediate_size
    assert table["components"]["llm"]["quantized"] == text.num_hidden_layers * (attention + mlp)


def test_composed_presets_plan_offline():
    cfg, _ = compose_run("model=llava_llama31_8b", "quant=nf4", "eval=none")
    table, config = count_cell(cfg)
    assert config.text_config.vocab_size == 128_257  # Llama 3.1's 128,256 tokens + <image>
    cfg, _ = compose_run("model=llava_phi2", "eval=none")
    table, config = count_cell(cfg)
    assert config.text_config.vocab_size == 51_200  # <image> fits in phi-2's padded embedding
    assert table["components"]["projector"]["total"] == 1024 * 2560 + 2560 + 2560 * 2560 + 2560


def test_memory_terms_and_the_grid():
    cfg, _ = compose_run("model=llava16_mistral_7b", "quant=nf4", "train=rtx4090_qlora", "eval=none",
                         "plan.seq_len=2048")
    result = plan_cell(cfg)
    mem = result["memory_gib"]
    quantized = result["params"]["components"]["llm"]["quantized"]
    other = result["params"]["total"] - quantized
    weights = quantized * (0.5 + (1 + 4 / 256) / 64) + other * 4
    assert mem["weights"] == pytest.approx(weights / 2**30, abs=0.01)
    # the LM head on the labelled tokens only (plan.labelled_tokens a sample), or on every position with it off
    assert mem["logit_rows"] == 512 and mem["logits"] == pytest.approx(4 * 512 * 32064 * 6 / 2**30, abs=0.01)
    full = plan_cell(compose_run("model=llava16_mistral_7b", "quant=nf4", "train=rtx4090_qlora", "eval=none",
                                 "plan.seq_len=2048", "train.labelled_logits_only=false")[0])["memory_gib"]
    assert full["logit_rows"] == 2048 and full["logits"] == pytest.approx(4 * 2048 * 32064 * 6 / 2**30, abs=0.01)
    assert full["total"] - mem["total"] == pytest.approx(full["logits"] - mem["logits"], abs=0.02)
    longer = plan_cell(compose_run("model=llava16_mistral_7b", "quant=nf4", "train=rtx4090_qlora", "eval=none",
                                   "plan.seq_len=256", "plan.labelled_tokens=1000")[0])["memory_gib"]
    assert longer["logit_rows"] == 256  # never more than the sequence
    assert "assistant tokens ≈ 512 per sample; plan.labelled_tokens=N changes it" in format_plan(result, 24)
    assert "logits on all 2048 tokens of a sample (train.labelled_logits_only=false)" in format_plan(
        {**result, "memory_gib": full}, 24)
    assert mem["activations_vision"] == 0 and mem["fits"]
    unchecked = plan_cell(compose_run("model=llava16_mistral_7b", "quant=nf4", "train=rtx4090_qlora", "eval=none",
                                      "plan.seq_len=2048", "train.gradient_checkpointing=false")[0])
    assert unchecked["memory_gib"]["activations_llm"] > 10 * mem["activations_llm"]
    cells = grid_cells(cfg, lambda extra: compose_run("model=llava16_mistral_7b", "train=rtx4090_qlora", "eval=none",
                                                      "plan.seq_len=2048", *extra)[0])
    assert [c["quant"] for _, c in cells] == ["nf4", "nf4", "nf4", "none"]
    fits = [c["memory_gib"]["fits"] for _, c in cells]
    assert fits == [True, True, True, False]  # full fine-tuning needs more than a 24 GB card
    assert "full fine-tune" in format_grid(cells, 24) and "NO" in format_grid(cells, 24)
