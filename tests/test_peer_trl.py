"""benchmarks/peer_trl.py: TRL's SFTTrainer and the runner do the same work (batches, labels, optimizer, loss)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import load_benchmark

from vlmablate.data.collator import LlavaCollator
from vlmablate.data.templates import IGNORE_INDEX, to_messages

pytest.importorskip("trl")

# The tiny random Llava on the test world's instruct data (images and text-only dialogues), batch 4.
OVERRIDES = ["world=test", "model=tiny_random", "train=cpu_tiny", "train.progress=false", "eval=none",
             "train.per_device_train_batch_size=4", "train.save_steps=100"]
STEPS = 4  # the 4th batch of this order is text-only


@pytest.fixture(scope="module")
def peer():
    return load_benchmark("peer_trl")


@pytest.fixture(scope="module")
def both_sides(peer, tmp_path_factory):
    """The runner's first batches and the TRL trainer built on the same records in the same order."""
    cfg, _ = peer.compose_run([*OVERRIDES, f"train.max_steps={STEPS}"])
    loaded = peer.load_cell(cfg)
    dataset = peer.cell_dataset(cfg, loaded)
    batches = peer.runner_batches(cfg, dataset, STEPS)
    collate = LlavaCollator(pad_token_id=loaded.processor.tokenizer.pad_token_id)
    ours = [collate([dataset[k] for k in batch]) for batch in batches]
    rows = peer.trl_rows(dataset, [k for batch in batches for k in batch])
    trainer = peer.trl_trainer(cfg, peer.load_cell(cfg), rows, tmp_path_factory.mktemp("trl"))
    return {"model": loaded.model, "dataset": dataset, "batches": batches, "ours": ours, "trainer": trainer,
            "theirs": list(trainer.get_train_dataloader())}


def test_trl_collates_the_runners_batches_token_for_token(both_sides):
    ours, theirs = both_sides["ours"], both_sides["theirs"]
    assert len(theirs) == len(ours) == STEPS
    for mine, trl_batch in zip(ours, theirs):
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(mine[key], trl_batch[key]), key
        assert ("pixel_values" in mine) == ("pixel_values" in trl_batch)
        if "pixel_values" in mine:
            assert torch.equal(mine["pixel_values"], trl_batch["pixel_values"])
    assert any("pixel_values" in b for b in ours) and any("pixel_values" not in b for b in ours)


def test_trl_trains_the_replies_and_their_eos_only(both_sides):
    """TRL's assistant mask with the marked template: each reply with the space before it and the closing </s>."""
    dataset, tokenizer = both_sides["dataset"], both_sides["trainer"].processing_class.tokenizer
    for batch, indices in zip(both_sides["theirs"], both_sides["batches"]):
        for row, k in enumerate(indices):
            p, i = dataset.locate(k)
            turns = to_messages(dataset.parts[p].records[i]["conversations"], "test")
            replies = "".join(f" {m['content']}</s>" for m in turns if m["role"] == "assistant")
            trained = batch["input_ids"][row][batch["labels"][row] != IGNORE_INDEX]
            assert tokenizer.decode(trained) == replies


def test_trl_gets_the_runners_model_and_optimizer_groups(both_sides):
    trainer = both_sides["trainer"]
    trainable = {n for n, p in both_sides["model"].named_parameters() if p.requires_grad}
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == trainable
    groups = {g["name"]: (g["lr"], len(g["params"])) for g in trainer.optimizer.param_groups}
    # LoRA on the LLM at 2e-4, the projector at the stage's 2e-5 (cpu_tiny: lr_scale 1); no decay set
    assert groups == {"projector/decay": (2e-5, 2), "projector/no_decay": (2e-5, 2), "llm/decay": (2e-4, 28)}
    assert sum(g[1] for g in groups.values()) == len(trainable)
    args = trainer.args  # the runner's TrainingArguments, not SFTConfig's defaults (bf16, checkpointing on)
    assert (args.bf16, args.gradient_checkpointing, args.per_device_train_batch_size) == (False, False, 4)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}


def test_trl_messages_take_the_image_marker_out_of_the_first_user_text(peer):
    turns = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "Red."}]
    assert peer.trl_messages(turns, "r") == [{"role": "user", "content": "What colour is the circle?"},
                                             {"role": "assistant", "content": "Red."}]
    with pytest.raises(ValueError, match="elsewhere"):
        peer.trl_messages([{"from": "human", "value": "What colour?\n<image>"}, {"from": "gpt", "value": "Red."}], "r")


def test_marked_template_marks_the_vicuna_reply_and_puts_bos_first(peer, both_sides):
    marked = peer.marked_template(both_sides["trainer"].processing_class.tokenizer)
    assert marked.startswith("{{- bos_token }}")
    assert marked.count(peer.MARKED_REPLY) == 1 and peer.VICUNA_REPLY not in marked
    other = SimpleNamespace(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}", bos_token="<s>",
                            name_or_path="other")
    with pytest.raises(ValueError, match="not Vicuna v1"):
        peer.marked_template(other)


@pytest.mark.slow
def test_first_step_losses_agree(peer):
    """One step on each side: the same tokens trained, the same loss to fp32 rounding."""
    check = peer.first_step(OVERRIDES)
    ours, theirs = check["runner"], check["trl"]
    assert ours["tokens"] == theirs["tokens"] > 0
    assert 0 < ours["loss"] < 20
    assert abs(ours["loss"] - theirs["loss"]) <= 1e-5 * theirs["loss"]
    assert check["agree"]
