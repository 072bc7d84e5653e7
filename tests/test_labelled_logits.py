"""The LM head on the labelled positions only (train/loss.py): the same loss and gradients as the full logits.

Tiny Llava and LlavaNext in fp32, LoRA and full fine-tuning, a 4-bit LLM on the CPU, with a batch of two
image samples, a text-only one and one without a labelled token; then the runner end to end, on and off.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmablate.config import (
    FreezeConfig,
    LoraConfig,
    ModelConfig,
    ProjectorConfig,
    QuantConfig,
    StageConfig,
    TinyModelConfig,
    VisionConfig,
)
from vlmablate.data.collator import LlavaCollator
from vlmablate.data.templates import IGNORE_INDEX
from vlmablate.model.load import load_model
from vlmablate.model.plan import apply_plan, resolve_plan
from vlmablate.model.tiny import TinySpec, build_tiny_llava, build_tiny_processor, train_tiny_tokenizer
from vlmablate.train.loss import labelled_positions, with_labelled_logits_only

LORA = LoraConfig(r=4, alpha=8, dropout=0.0, targets="all-linear")
TOLERANCE = 1e-5  # relative, fp32


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(TinySpec().vocab_size)


def plan_for(llm: str, quant: str = "none"):
    return resolve_plan(VisionConfig(policy="unfrozen"), ProjectorConfig(type="mlp2x_gelu", trainable=True),
                        FreezeConfig(name=f"{llm}_llm", policy=llm, lora=LORA if llm == "lora" else None),
                        QuantConfig(mode=quant), StageConfig(name="instruct", lr=2e-5))


def sample(processor, text: str, answer: str, image: Image.Image | None) -> dict:
    """One encoded sample whose labels are the answer's tokens (and the end of sequence after them)."""
    prompt = f"USER: {'<image>' if image is not None else ''}\n{text} ASSISTANT:"
    enc = processor(images=[image] if image is not None else None, text=prompt + " " + answer + "</s>",
                    return_tensors="pt")
    ids = enc["input_ids"][0]
    n_answer = len(processor.tokenizer(" " + answer + "</s>", add_special_tokens=False)["input_ids"])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-n_answer:] = ids[-n_answer:]
    out = {"input_ids": ids, "labels": labels}
    if image is not None:
        out["pixel_values"] = enc["pixel_values"]
        if "image_sizes" in enc:
            out["image_sizes"] = enc["image_sizes"]
    return out


def mixed_batch(arch: str, tokenizer) -> dict:
    """Two image samples (LlavaNext: two anyres grids), a text-only one, and one with every label masked."""
    processor = build_tiny_processor(TinySpec(arch=arch), tokenizer)
    wide, square = Image.new("RGB", (64, 32), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    masked = sample(processor, "what is in the image?", "nothing", None)
    masked["labels"][:] = IGNORE_INDEX
    features = [sample(processor, "what colour is the circle?", "red circle on the left", wide),
                sample(processor, "hello", "hello there how can you help", None),
                masked,
                sample(processor, "how many shapes?", "two", square)]
    return LlavaCollator(pad_token_id=tokenizer.pad_token_id)(features)


def loss_and_grads(model, inputs: dict, num_items_in_batch=None) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    loss = model(**inputs, **extra).loss
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30)) if b.norm() > 0 else float((a - b).norm())


def assert_same_loss_and_gradients(model, inputs: dict) -> float:
    """Both paths, with the loss as a mean and as a sum over Trainer's `num_items_in_batch`; the largest
    relative difference over the loss and every trainable gradient."""
    model.train()
    labelled = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    worst = 0.0
    for num_items in (None, torch.tensor(2 * labelled)):  # as under two micro-batches of gradient accumulation
        full_loss, full = loss_and_grads(model, inputs, num_items)
        kept_loss, kept = loss_and_grads(model, with_labelled_logits_only(inputs), num_items)
        assert full.keys() == kept.keys() and all(g is not None for g in kept.values())
        assert all(full[n].abs().sum() > 0 for n in full if "lora_B" in n or "lm_head" in n)  # something is compared
        differences = [abs(kept_loss - full_loss) / abs(full_loss)] + [relative(kept[n], full[n]) for n in full]
        worst = max(worst, *differences)
    assert worst <= TOLERANCE
    return worst


def test_labelled_positions_are_the_labels_shifted_by_one():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, 8], [-100] * 5])
    keep, targets = labelled_positions(labels)
    assert keep.tolist() == [[False, True, True, False, False], [True, False, False, True, False], [False] * 5]
    assert targets.tolist() == [5, 6, 7, 8]  # row-major, the order hidden[keep] lists the rows
    hidden = torch.arange(15.0).view(3, 5, 1)
    assert hidden[keep].flatten().tolist() == [1.0, 2.0, 5.0, 8.0]  # position t predicts label t + 1


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
@pytest.mark.parametrize("llm", ["lora", "full"])
def test_the_same_loss_and_gradients_as_the_full_logits(tokenizer, arch, llm):
    model = apply_plan(build_tiny_llava(TinySpec(arch=arch), tokenizer), plan_for(llm))
    inputs = mixed_batch(arch, tokenizer)
    assert "lm_head.weight" in {n.removeprefix("base_model.model.") for n, p in model.named_parameters()
                                if p.requires_grad} or llm == "lora"
    out = model(**with_labelled_logits_only(inputs))
    labelled = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert out.logits.shape == (labelled, model.config.text_config.vocab_size)  # only the labelled rows
    assert labelled < inputs["input_ids"].numel() // 3
    assert_same_loss_and_gradients(model, inputs)


def test_the_same_with_gradient_checkpointing(tokenizer):
    model = apply_plan(build_tiny_llava(TinySpec(arch="llava_next"), tokenizer), plan_for("full"))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert_same_loss_and_gradients(model, mixed_batch("llava_next", tokenizer))


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_the_same_on_a_4bit_llm(tokenizer, arch):
    plan = plan_for("lora", quant="nf4")
    loaded = load_model(ModelConfig(name="tiny_random", source="tiny_random", torch_dtype="float32",
                                    tiny=TinyModelConfig(arch=arch)),
                        projector_type="mlp2x_gelu", quant=QuantConfig(mode="nf4"),
                        skip_modules=plan.skip_modules(), compute_dtype=torch.float32)
    model = apply_plan(loaded.model, plan)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert_same_loss_and_gradients(model, mixed_batch(arch, loaded.processor.tokenizer))


@pytest.mark.slow
def test_a_short_run_trains_the_same_with_the_setting_on_and_off(run_cell, monkeypatch):
    from vlmablate.train import trainer

    kept_rows = []

    def counted(inputs):
        out = with_labelled_logits_only(inputs)
        kept_rows.append(int(out["logits_to_keep"].sum()))
        return out

    monkeypatch.setattr(trainer, "with_labelled_logits_only", counted)
    # two micro-batches a step: the loss is divided by Trainer's num_items_in_batch, counted over both
    common = ("freeze=lora_llm", "train.max_steps=6", "train.logging_steps=1", "train.save_steps=100",
              "train.gradient_accumulation_steps=2", "train.per_device_train_batch_size=4")
    on = run_cell(*common, name="on")
    assert len(kept_rows) == 12 and all(rows > 0 for rows in kept_rows)  # every training micro-batch
    off = run_cell(*common, "train.labelled_logits_only=false", name="off")
    assert len(kept_rows) == 12  # the library's path
    assert on["status"] == off["status"] == "completed"
    assert on["config_hash"] == off["config_hash"]  # a memory setting: the cell is the same
    curve_on, curve_off = on["train"]["loss_curve"], off["train"]["loss_curve"]
    assert [s for s, _ in curve_on] == [s for s, _ in curve_off] == list(range(1, 7))
    for (_, a), (_, b) in zip(curve_on, curve_off):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    assert on["train"]["train_loss"] == pytest.approx(off["train"]["train_loss"], rel=1e-5)


def test_the_setting_and_plans_assumption_leave_the_cells_hash_alone():
    from conftest import compose_run

    from vlmablate.config import config_hash
    from vlmablate.train.stages import learning_config

    base = compose_run("world=test", "model=tiny_random")
    other = compose_run("world=test", "model=tiny_random", "train.labelled_logits_only=false",
                        "plan.labelled_tokens=2048")
    assert base[0].train.labelled_logits_only and not other[0].train.labelled_logits_only  # on by default
    assert config_hash(learning_config(base[1])) == config_hash(learning_config(other[1]))
