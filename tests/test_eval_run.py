"""Evaluation wired to a model: prompts, both answer modes, predictions.jsonl, exact metrics, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoProcessor

from vlmablate.eval import run as eval_run
from vlmablate.eval.mmbench import read_mmbench_tsv
from vlmablate.model.tiny import TinySpec, save_tiny_checkpoint
from vlmablate.world.build import ensure_world_data

from conftest import compose_run


@pytest.fixture(scope="module")
def world_files():
    return ensure_world_data(compose_run("world=test")[0].world, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlavaForConditionalGeneration

    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), TinySpec(image_size=64, patch_size=16))
    return LlavaForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def test_prompt_is_llava_mmbench_prompt_in_the_chat_template(tiny, world_files):
    _, processor = tiny
    q = read_mmbench_tsv(world_files["bench_tsv"])[1]
    prompt = eval_run.chat_prompt(processor, eval_run.prompt_text(q, q.copies[0]))
    assert prompt.endswith("\nAnswer with the option's letter from the given choices directly. ASSISTANT:")
    assert f"USER: <image>\n{q.question}\nA. {q.copies[0].options['A']}\n" in prompt


def test_exact_accuracies_from_fixed_replies(tiny, world_files, tmp_path, monkeypatch):
    """Replies fixed by hand: right on every copy of even questions, right on copy 0 only of odd ones."""
    model, processor = tiny
    questions = read_mmbench_tsv(world_files["bench_tsv"])[:6]
    truth = {(q.q, c.k): c.answer for q in questions for c in q.copies}

    def replies(model, processor, items, **kwargs):
        out = []
        for it in items:
            q, k = it.key
            right = truth[(q, k)]
            wrong = "A" if right != "A" else "B"
            out.append(f"The answer is {right}." if q % 2 == 0 or k == 0 else f"({wrong})")
        return out

    monkeypatch.setattr(eval_run, "generate_replies", replies)
    metrics, rows = eval_run.evaluate_mmbench(model, processor, world_files["bench_tsv"], mode="generate",
                                              out_dir=tmp_path, max_questions=6)
    n_even = sum(q.q % 2 == 0 for q in questions)
    assert metrics["circular_acc"] == pytest.approx(n_even / 6)
    assert metrics["vanilla_acc"] == 1.0 and metrics["unparsed_rate"] == 0.0
    written = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(written) == sum(len(q.copies) for q in questions) == metrics["n_rows"]
    assert {"index", "copy", "prediction", "reply", "correct"} <= set(written[0])


@pytest.mark.parametrize("mode", ["generate", "likelihood"])
def test_both_modes_run_on_a_real_model(tiny, world_files, tmp_path, mode):
    model, processor = tiny
    metrics, rows = eval_run.evaluate_mmbench(model, processor, world_files["bench_tsv"], mode=mode,
                                              out_dir=tmp_path, max_questions=8, batch_size=5, max_new_tokens=3)
    assert metrics["n_questions"] == 8 and metrics["mode"] == mode
    if mode == "likelihood":  # never unparsed: every copy gets the best-scoring present letter
        assert metrics["unparsed_rate"] == 0.0
        assert all(set(r["letter_scores"]) == set("ABCD"[:len(r["letter_scores"])]) for r in rows)


def test_likelihood_scores_equal_a_single_sequence_forward(tiny, world_files):
    """Batched (left-padded) letter scores match scoring each prompt alone."""
    model, processor = tiny
    questions = read_mmbench_tsv(world_files["bench_tsv"])[:3]
    items, meta = eval_run.mmbench_items(questions, processor)
    letters = [list(c.options) for _, c in meta]
    batched = eval_run.letter_scores(model, processor, items, letters, batch_size=len(items))
    alone = [eval_run.letter_scores(model, processor, [it], [ls], batch_size=1)[0] for it, ls in zip(items, letters)]
    for b, a in zip(batched, alone):
        assert b.keys() == a.keys()
        assert all(abs(b[k] - a[k]) < 1e-4 for k in b)


def test_blank_image_baseline_uses_the_mean_colour(tiny, world_files):
    _, processor = tiny
    items, _ = eval_run.mmbench_items(read_mmbench_tsv(world_files["bench_tsv"])[:1], processor, blank=True)
    mean = tuple(int(round(255 * m)) for m in processor.image_processor.image_mean)
    assert set(items[0].image.getdata()) == {mean}


def test_vqa_on_a_real_model_writes_scores(tiny, world_files, tmp_path):
    model, processor = tiny
    metrics = eval_run.evaluate_vqa(model, processor, world_files["vqa_json"], out_dir=tmp_path,
                                    image_root=world_files["image_root"], max_questions=5, max_new_tokens=3)
    assert metrics["n"] == 5 and 0.0 <= metrics["vqa_acc"] <= 1.0 and metrics["ocr_given"] is False
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 5


@pytest.mark.slow
def test_standalone_eval_reproduces_the_in_run_numbers(run_cell, tmp_path):
    s = run_cell("freeze=lora_llm", "vision=unfrozen", "train.max_steps=4", "eval=mmbench_fast",
                 "eval.max_questions=10", "eval.n_boot=50", name="cell")
    in_run = s["eval"]["mmbench"]
    assert in_run["mode"] == "likelihood" and in_run["n_questions"] == 10
    env = {**os.environ}
    out = subprocess.run([sys.executable, "-m", "vlmablate.eval", f"run_dir={tmp_path / 'cell'}", "world=test",
                          "eval=mmbench_fast", "eval.max_questions=10", "eval.n_boot=50", "train.progress=false",
                          f"hydra.run.dir={tmp_path / 'eval-log'}"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    merged = json.loads((tmp_path / "cell" / "summary.json").read_text())
    assert merged["train"] == s["train"]  # the rest of the summary is kept
    for key in ("circular_acc", "vanilla_acc", "n_rows"):
        assert merged["eval"]["mmbench"][key] == in_run[key]
