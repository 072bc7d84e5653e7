"""Evaluation wired to a model: prompts, both answer modes, predictions.jsonl, exact metrics, the CLI."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import compose_run

from vlmablate.config import ConfigError, EvalConfig, validate
from vlmablate.eval import run as eval_run
from vlmablate.eval.mmbench import read_mmbench_tsv
from vlmablate.eval.suite import run_eval


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


def test_summary_names_the_extraction_and_its_rule_decides(tiny, world_files, tmp_path, monkeypatch):
    """The same replies score differently under two revisions; the metrics say which one was used."""
    model, processor = tiny
    questions = read_mmbench_tsv(world_files["bench_tsv"])[:4]
    truth = {(q.q, c.k): c.answer for q in questions for c in q.copies}
    # The right letter first, then five more words: anywhere (aca64dbb) but not among the last 4 tokens.
    monkeypatch.setattr(eval_run, "generate_replies", lambda model, processor, items, **kw: [
        f" {truth[it.key]} is what the picture shows here \n" for it in items])
    scores = {}
    for extraction in ("vlmevalkit_aca64dbb", "vlmevalkit_a67ace50"):
        metrics, rows = eval_run.evaluate_mmbench(model, processor, world_files["bench_tsv"], mode="generate",
                                                  out_dir=tmp_path / extraction, max_questions=4,
                                                  extraction=extraction, n_boot=10)
        assert (metrics["extraction"], metrics["split"], metrics["mode"]) == (extraction, "dev", "generate")
        assert rows[0]["reply"] == f"{truth[(questions[0].q, 0)]} is what the picture shows here"  # stripped
        scores[extraction] = (metrics["circular_acc"], metrics["unparsed_rate"])
    assert scores == {"vlmevalkit_aca64dbb": (1.0, 0.0), "vlmevalkit_a67ace50": (0.0, 1.0)}


def _without_answers(src, dst):
    with open(src, newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle, delimiter="\t"))
    drop = table[0].index("answer")
    with open(dst, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, delimiter="\t", lineterminator="\n").writerows(
            [cell for i, cell in enumerate(row) if i != drop] for row in table)
    return dst


def test_test_split_writes_the_submission_and_logs_without_a_score(tiny, world_files, tmp_path, monkeypatch,
                                                                   caplog):
    model, processor = tiny
    tsv = _without_answers(world_files["bench_tsv"], tmp_path / "bench_test.tsv")
    questions = read_mmbench_tsv(tsv, split="test")[:3]
    monkeypatch.setattr(eval_run, "generate_replies", lambda model, processor, items, **kw: [
        f"({'AB'[it.key[1] % 2]}) " for it in items])
    cfg = EvalConfig(name="mmbench", tasks=["mmbench"], tsv=str(tsv), split="test", max_questions=3, n_boot=10,
                     text_only_baseline=True)
    with caplog.at_level(logging.INFO, logger="vlmablate.eval.suite"):
        results, _ = run_eval(cfg, model, processor, tmp_path / "eval")
    m = results["mmbench"]
    n_rows = sum(len(q.copies) for q in questions)
    with open(tsv, newline="", encoding="utf-8") as handle:
        n_file_rows = len(list(csv.reader(handle, delimiter="\t"))) - 1
    xlsx = str(tmp_path / "eval" / "mmbench" / "submission.xlsx")
    assert (m["circular_acc"], m["vanilla_acc"], m["split"], m["n_rows"], m["unparsed_rate"]) == \
        (None, None, "test", n_rows, 0.0)
    assert m["submission"] == {"xlsx": xlsx, "tsv": xlsx[:-4] + "tsv", "rows": n_file_rows, "predicted": n_rows}
    assert "mmbench_blank_image" not in results  # nothing to compare a baseline by
    # Formatting every message: a None accuracy must not break the summary line.
    assert caplog.messages == [
        f"{xlsx}: {n_file_rows - n_rows} of {n_file_rows} rows have no prediction",  # eval.max_questions=3
        f"MMBench test split (generate, vlmevalkit_a67ace50): {n_rows} rows, unparsed 0.000; no answers, so no "
        f"score here: upload {xlsx} to the MMBench server",
        "text-only baseline skipped: a test split has no answers to compare it by"]
    from openpyxl import load_workbook

    sheet = list(load_workbook(xlsx).active.iter_rows(values_only=True))
    header, by_index = sheet[0], {row[0]: row for row in sheet[1:]}
    assert header[:2] == ("index", "question") and "prediction" in header and "image" not in header
    sent = {c.index: f"({'AB'[c.k % 2]})" for q in questions for c in q.copies}
    assert {i: by_index[i][header.index("prediction")] for i in sent} == sent
    assert sum(row[header.index("prediction")] is not None for row in sheet[1:]) == n_rows


def test_eval_split_and_extraction_are_validated_choices():

    cfg, _ = compose_run("model=tiny_random", "eval=mmbench", "eval.split=test", "eval.extraction=vlmevalkit_c3371551")
    validate(cfg)
    assert (cfg.eval.split, cfg.eval.extraction) == ("test", "vlmevalkit_c3371551")
    with pytest.raises(ConfigError, match="eval.split='val' is not one of dev, test"):
        validate(compose_run("model=tiny_random", "eval.split=val")[0])
    with pytest.raises(ConfigError, match="eval.extraction='latest' is not one of vlmevalkit_aca64dbb, "
                                          "vlmevalkit_c3371551, vlmevalkit_a67ace50"):
        validate(compose_run("model=tiny_random", "eval.extraction=latest")[0])


def test_a_dev_file_without_answers_fails_before_training(run_cell, world_files, tmp_path):
    tsv = _without_answers(world_files["bench_tsv"], tmp_path / "no_answers.tsv")
    with pytest.raises(ValueError, match=f"^{tsv}: no answer column, so this dev split cannot be scored"):
        run_cell("eval=mmbench", f"eval.tsv={tsv}", name="cell")
    summary = json.loads((tmp_path / "cell" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith(f"ValueError: {tsv}: no answer column")
    assert "params" not in summary and not (tmp_path / "cell" / "checkpoints").exists()  # no model was loaded


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


def test_likelihood_reads_a_multi_token_letter_in_the_same_forward(tiny, world_files, monkeypatch):
    """The tiny tokenizer spells ` D` in two tokens: its first token is appended to the prompt and the two
    positions' scores come from that one forward, equal to summing log-probabilities along each reply."""
    import torch

    model, processor = tiny
    conts = eval_run.letter_continuations(processor, list("ABCD"))
    assert [len(conts[k]) for k in "ABCD"] == [1, 1, 1, 2]
    questions = [q for q in read_mmbench_tsv(world_files["bench_tsv"]) if len(q.copies) == 4][:2]
    items, meta = eval_run.mmbench_items(questions, processor)
    letters = [list(c.options) for _, c in meta]
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(k["input_ids"].shape) or forward(*a, **k))
    scores = eval_run.letter_scores(model, processor, items, letters, batch_size=4)
    assert len(calls) == 2  # 8 copies in batches of 4, one forward each
    monkeypatch.undo()
    for item, row in zip(items[:2], scores[:2]):
        inputs = eval_run._encode(processor, [eval_run._bos(processor, item.prompt)], [item.image], "cpu")
        for letter in "ABCD":
            ids = torch.cat([inputs["input_ids"], torch.tensor([conts[letter]])], dim=1)
            with torch.no_grad():
                logprobs = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0].log_softmax(-1)
            n = inputs["input_ids"].shape[1]
            expected = sum(float(logprobs[n - 1 + j, tok]) for j, tok in enumerate(conts[letter]))
            assert row[letter] == pytest.approx(expected, abs=1e-4), letter  # no token is common to all four


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


def test_the_suite_scores_vqa_with_a_blank_image_beside_the_image(tiny, world_files, tmp_path, monkeypatch):
    """Fixed replies: the right answer wherever the image is not blank, "no" where it is."""
    from vlmablate.config import EvalConfig
    from vlmablate.eval.suite import run_eval

    model, processor = tiny
    mean = tuple(int(round(255 * m)) for m in processor.image_processor.image_mean)
    from vlmablate.eval.vqa import vqa_score

    records = json.loads(open(world_files["vqa_json"]).read())["data"][:8]
    answers = {r["question_id"]: r["canonical_answer"] for r in records}
    seen = []

    def replies(model, processor, items, **kwargs):
        seen.extend(set(it.image.getdata()) == {mean} for it in items)
        return ["no" if set(it.image.getdata()) == {mean} else answers[it.key[0]] for it in items]

    monkeypatch.setattr(eval_run, "generate_replies", replies)
    cfg = EvalConfig(name="t", tasks=["textvqa"], text_only_baseline=True, max_questions=8, n_boot=10,
                     vqa_json=world_files["vqa_json"], vqa_image_root=world_files["image_root"])
    results, _ = run_eval(cfg, model, processor, tmp_path)
    assert seen == [False] * 8 + [True] * 8
    expected = [sum(vqa_score(r["canonical_answer"], r["answers"]) for r in records) / 8,
                sum(vqa_score("no", r["answers"]) for r in records) / 8]
    assert expected[0] > expected[1] + 0.3
    assert results["textvqa"]["vqa_acc"] == pytest.approx(expected[0]) and results["textvqa"]["blank_image"] is False
    blank = results["vqa_blank_image"]
    assert blank["vqa_acc"] == pytest.approx(expected[1]) and blank["blank_image"] is True
    assert (tmp_path / "vqa_blank_image" / "predictions.jsonl").exists()


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
