"""benchmarks/world_grounding.py on the test-size world: answer-only labels, blank images, and the table."""

from __future__ import annotations

import argparse
import re
import sys

import pytest
import torch
from conftest import compose_run, load_benchmark

from vlmablate.model.load import load_model
from vlmablate.model.plan import resolve_plan
from vlmablate.train.runner import prepare_model
from vlmablate.world import language
from vlmablate.world.data import CHOICE_PROMPT, SHORT_ANSWER_PROMPT


def composed_test_world_model():
    """The test world's composed model (frozen tower, fresh projector, world LM), as the script builds it."""
    cfg, _ = compose_run("world=test", "train.progress=false")
    plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage, lr_scale=cfg.train.lr_scale)
    return load_model(prepare_model(cfg, plan), projector_type=plan.projector_type, quant=cfg.quant,
                      skip_modules=[], compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def grounding():
    return load_benchmark("world_grounding")


@pytest.fixture(scope="module")
def task(grounding):
    return grounding.Task(composed_test_world_model().processor, ["colour", "counting"], max_objects=3, seed=0)


def test_labels_are_the_answer_and_eos_only(task):
    batch = task.batch(0, 4)
    tokenizer = task.tokenizer
    for row in range(4):
        _, answer, _, category = task.example("train", row)
        assert category in ("colour", "counting")
        labels = batch["labels"][row]
        kept = labels[labels != -100]
        assert tokenizer.decode(kept) == f" {answer}{tokenizer.eos_token}"
        # the labelled tokens are the last real ones of the row: the answer closes the sequence
        n_real = int(batch["attention_mask"][row].sum())
        assert (labels[:n_real - len(kept)] == -100).all()
        assert torch.equal(batch["input_ids"][row, n_real - len(kept):n_real], kept)


def test_examples_are_deterministic_and_blank_keeps_the_question(task):
    prompt, answer, image, _ = task.example("eval", 3)
    again = task.example("eval", 3)
    assert (prompt, answer) == again[:2] and image.tobytes() == again[2].tobytes()
    blank_prompt, blank_answer, blank_image, _ = task.example("eval", 3, blank=True)
    assert (blank_prompt, blank_answer) == (prompt, answer)
    white = bytes([255]) * len(image.tobytes())
    assert blank_image.tobytes() == white and image.tobytes() != white
    assert task.example("train", 3)[2].tobytes() != image.tobytes()  # held-out scenes come from their own split


def test_main_prints_a_row_per_evaluation_for_both_lms(grounding, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["world_grounding.py", "--categories", "colour", "--steps", "2",
                                      "--eval-every", "1", "--eval-n", "4", "--batch-size", "2", "world=test"])
    grounding.main()
    out = capsys.readouterr().out
    assert "world LM: image" in out and "fresh LM: image" in out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+ \|", line)]
    assert [int(line.split("|")[0]) for line in rows] == [1, 2]
    for line in rows:  # two LMs, each with image, blank and their difference, all accuracies on 4 questions
        numbers = [float(x) for x in re.findall(r"[+-]?\d\.\d{3}", line)]
        assert len(numbers) == 6
        for image, blank, gap in (numbers[:3], numbers[3:]):
            assert image * 4 == pytest.approx(round(image * 4)) and blank * 4 == pytest.approx(round(blank * 4))
            assert gap == pytest.approx(image - blank, abs=1e-3)


def test_unknown_category_is_refused(grounding, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["world_grounding.py", "--categories", "colour,smell"])
    with pytest.raises(SystemExit):
        grounding.main()


def test_stage1_projector_and_one_lm(grounding, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["world_grounding.py", "--projector", "stage1", "--lms", "world", "--steps", "1",
                                      "--eval-every", "1", "--eval-n", "2", "--batch-size", "2", "world=test"])
    grounding.main()
    out = capsys.readouterr().out
    assert "stage1 projector + whole LM trained" in out
    assert "world LM: image" in out and "fresh LM" not in out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+ \|", line)]
    assert len(rows) == 1 and len(re.findall(r"[+-]?\d\.\d{3}", rows[0])) == 3


def test_sentence_answers_drop_the_short_answer_prompt(grounding, task):
    sentences = grounding.Task(task.processor, ["colour", "counting"], max_objects=3, seed=0, answers="sentence")
    short_prompt, word, _, _ = task.example("train", 5)
    prompt, sentence, _, _ = sentences.example("train", 5)
    assert SHORT_ANSWER_PROMPT in short_prompt and SHORT_ANSWER_PROMPT not in prompt
    # the same scene and question: the sentence states the short answer, e.g. "The circle is red." / "red",
    # a count in words: "There is one square." / "1"
    spoken = language.NUMBER_WORDS[int(word)] if word.isdigit() else word.lower()
    assert sentence.endswith(".") and sentence[0].isupper() and spoken in sentence.lower()
    batch = sentences.batch(5, 1)
    kept = batch["labels"][0][batch["labels"][0] != -100]
    assert sentences.tokenizer.decode(kept) == f" {sentence}{sentences.tokenizer.eos_token}"


@pytest.mark.parametrize(("vision_lr", "freeze_lm"), [(0.0, False), (1e-2, False), (1e-2, True)])
def test_the_tower_trains_only_with_a_vision_lr_and_the_lm_only_unfrozen(grounding, vision_lr, freeze_lm):
    loaded = composed_test_world_model()
    task = grounding.Task(loaded.processor, ["shape"], max_objects=2, seed=0)
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    args = argparse.Namespace(seed=0, lr=1e-2, vision_lr=vision_lr, steps=1, eval_every=1, eval_n=2, batch_size=2,
                              freeze_lm=freeze_lm)
    (row,) = grounding.curve(loaded, task, fresh_lm=False, args=args)
    assert row[0] == 1
    changed = {n for n, p in loaded.model.named_parameters() if not torch.equal(p, before[n])}
    tower = {n for n in before if n.startswith("model.vision_tower")}
    assert any(n.startswith("model.multi_modal_projector") for n in changed)
    assert any(n.startswith("model.language_model") for n in changed) == (not freeze_lm)
    assert not any(n.startswith("lm_head") for n in changed) or not freeze_lm
    # the tower's layer LLaVA reads (-2) moves only when trained; its last layer feeds nothing
    assert bool(changed & tower) == (vision_lr > 0)


def test_choice_answers_are_the_letter_of_the_right_option(grounding, task):
    choices = grounding.Task(task.processor, ["colour", "counting"], max_objects=3, seed=0, answers="choice")
    _, word, _, _ = task.example("train", 5)
    prompt, letter, _, _ = choices.example("train", 5)
    options = dict(re.findall(r"^([ABCD])\. (.+)$", prompt, flags=re.M))
    assert CHOICE_PROMPT in prompt and SHORT_ANSWER_PROMPT not in prompt
    assert len(options) >= 2 and options[letter] == word  # the same question; its answer stands at the letter
    batch = choices.batch(5, 1)
    kept = batch["labels"][0][batch["labels"][0] != -100]
    assert choices.tokenizer.decode(kept) == f" {letter}{choices.tokenizer.eos_token}"
