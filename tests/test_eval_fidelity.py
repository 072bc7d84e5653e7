"""Evaluation details held to the references: replies pandas reads as NaN, the submission's sheet and text, the
generation limit, file lines in TSV errors, a file's warnings given once, and earlier evaluations kept when a
run is evaluated again (the summary naming the one it reports, the report comparing only cells evaluated alike)."""

from __future__ import annotations

import csv
import json
import logging
import shutil

import pytest
from conftest import compose_run
from test_eval_mmbench import COPIES, HEADER, MAINS, Q2, _write

from vlmablate.config import EvalConfig
from vlmablate.eval import run as eval_run
from vlmablate.eval.__main__ import merge_summary, reported_evaluations
from vlmablate.eval.evaluations import file_sha256
from vlmablate.eval.extract import EXTRACTIONS, PANDAS_NA, extract_choice, infer_choice
from vlmablate.eval.mmbench import read_mmbench_tsv
from vlmablate.eval.submission import write_submission
from vlmablate.eval.suite import check_benchmark_files, run_eval
from vlmablate.report.compare import evaluation_notes, paired_tests, write_report

YES_NO = {"A": "yes", "B": "no"}


# ----------------------------------------------------------------------------- 1. replies pandas reads as NaN


def test_our_nan_spellings_are_the_installed_pandas_defaults(tmp_path):
    pd = pytest.importorskip("pandas")
    from pandas._libs.parsers import STR_NA_VALUES

    assert PANDAS_NA == STR_NA_VALUES
    # VLMEvalKit's round trip: predictions written to an xlsx, read back with read_excel. Exact spellings only.
    probes = sorted(PANDAS_NA) + ["none", "NONE", " None", "None ", "Nan", "na", "N/a"]
    pd.DataFrame({"prediction": probes}).to_excel(tmp_path / "p.xlsx", index=False)
    back = pd.read_excel(tmp_path / "p.xlsx")["prediction"]
    assert {p: bool(pd.isna(v)) for p, v in zip(probes, back)} == {p: p in PANDAS_NA for p in probes}


@pytest.mark.parametrize("extraction", list(EXTRACTIONS))
def test_a_nan_reply_is_unparsed_as_vlmevalkit_reads_it(extraction):
    """VLMEvalKit takes str(NaN) = "nan": no letter in it, and "no" is not inside "nan"."""
    outcomes = {reply: infer_choice(reply, YES_NO, extraction) for reply in ("None", "N/A", "nan", "NA", "null", "")}
    assert outcomes == dict.fromkeys(outcomes)  # all unparsed; "None" used to give B ("no" is in "none")
    # not pandas' spellings (case and whitespace count): text, and "no" is inside it once lower-cased
    assert [infer_choice(r, YES_NO, extraction) for r in ("none", " None", "NONE", "None.")] == ["B"] * 4
    # an option text inside "nan" is chosen, as VLMEvalKit's text matching on "nan" chooses it
    assert infer_choice("None", {"A": "an", "B": "b"}, extraction) == "A"
    assert infer_choice("", {"A": "n", "B": "a"}, extraction) is None  # both inside "nan"
    assert extract_choice("N/A", {"A": "nan", "B": "dog"}, extraction) == "A"


def test_a_none_reply_from_the_model_is_unparsed(tiny, world_files, tmp_path, monkeypatch):
    model, processor = tiny
    monkeypatch.setattr(eval_run, "generate_replies", lambda model, processor, items, **kw: ["None\n"] * len(items))
    metrics, rows = eval_run.evaluate_mmbench(model, processor, world_files["bench_tsv"], mode="generate",
                                              out_dir=tmp_path, max_questions=3, n_boot=10)
    assert {r["reply"] for r in rows} == {"None"} and {r["prediction"] for r in rows} == {None}
    assert metrics["unparsed_rate"] == 1.0 and metrics["circular_acc"] == 0.0


# ----------------------------------------------------------------------------- 2, 3. the submission file


def _test_split(tmp_path):
    header = [h for h in HEADER if h != "answer"]
    rows = [[cell for h, cell in zip(HEADER, row) if h != "answer"] for row in MAINS + COPIES]
    return _write(tmp_path / "MMBench_TEST_EN.tsv", header, rows)


def test_the_submission_sheet_is_named_as_llava_names_it(tmp_path):
    from openpyxl import load_workbook

    out = write_submission(_test_split(tmp_path), {0: "B"}, tmp_path / "out")
    assert load_workbook(out["xlsx"]).sheetnames == ["Sheet1"]


def test_both_submission_files_hold_the_same_text(tmp_path):
    from openpyxl import load_workbook

    predictions = {0: "B\x00\x07 is it\x1b", 1: "A\tthen\nmore\r", 2: "C"}
    out = write_submission(_test_split(tmp_path), predictions, tmp_path / "out")
    sheet = [[("" if c is None else str(c)) for c in row] for row in load_workbook(out["xlsx"]).active.iter_rows(
        values_only=True)]
    with open(out["tsv"], newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle, delimiter="\t"))
    assert sheet == table
    at = table[0].index("prediction")
    # control characters dropped from both; tab, line feed and carriage return kept in both
    assert [row[at] for row in table[1:4]] == ["B is it", "A\tthen\nmore\r", "C"]


# ----------------------------------------------------------------------------- 4. the generation limit


def test_eval_mmbench_allows_llavas_1024_new_tokens_and_the_tiny_world_stays_short():
    limits = {name: compose_run("model=tiny_random", f"eval={name}")[0].eval for name in
              ("mmbench", "tiny_world", "mmbench_fast")}
    assert (limits["mmbench"].mode, limits["mmbench"].max_new_tokens) == ("generate", 1024)
    assert (limits["tiny_world"].mode, limits["tiny_world"].max_new_tokens) == ("generate", 8)
    assert limits["mmbench_fast"].mode == "likelihood"  # generates nothing


def test_a_wordy_reply_reaches_the_submission_whole(tiny, world_files, tmp_path, monkeypatch):
    """A model that says a 40-token sentence: eval=mmbench's limit keeps it, the old 8 cut it."""
    model, processor = tiny
    from test_eval_run import _without_answers

    tsv = _without_answers(world_files["bench_tsv"], tmp_path / "bench_test.tsv")
    sentence = " ".join(f"w{i}" for i in range(39)) + " B"
    seen = []

    def replies(model, processor, items, *, max_new_tokens, **kw):
        seen.append(max_new_tokens)
        return [" ".join(sentence.split()[:max_new_tokens])] * len(items)

    monkeypatch.setattr(eval_run, "generate_replies", replies)
    for limit, expected in ((None, sentence), (8, "w0 w1 w2 w3 w4 w5 w6 w7")):
        cfg = compose_run("model=tiny_random", "eval=mmbench", f"eval.tsv={tsv}", "eval.split=test",
                          "eval.max_questions=2", *([f"eval.max_new_tokens={limit}"] if limit else []))[0].eval
        results, _ = run_eval(cfg, model, processor, tmp_path / f"eval{limit}")
        with open(results["mmbench"]["submission"]["tsv"], newline="", encoding="utf-8") as handle:
            table = list(csv.DictReader(handle, delimiter="\t"))
        assert {row["prediction"] for row in table if row["prediction"]} == {expected}
    assert seen == [1024, 8]


# ----------------------------------------------------------------------------- 5, 6. the TSV's lines and warnings


def test_errors_name_the_file_line_beside_the_row(tmp_path):
    """Row 1 spans lines 2-3 (a quoted newline), row 2 is a blank line, row 3 is on line 5."""
    path = tmp_path / "dev.tsv"
    bad = [list(MAINS[2])]
    bad[0][7] = "E"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerow(MAINS[1])
        handle.write("\n")
        writer.writerows(bad)
    with pytest.raises(ValueError) as err:
        read_mmbench_tsv(path)
    assert str(err.value) == f"{path} line 5 (row 3, index 2): answer 'E' is not one of the options A, B, C"
    _write(path, HEADER, [MAINS[0], MAINS[1], MAINS[0]])
    with pytest.raises(ValueError) as err:
        read_mmbench_tsv(path)
    assert str(err.value) == f"{path} line 5 (row 3, index 0): duplicate index 0 (first at line 2)"


def _reordered(tmp_path, name="odd.tsv"):
    """Question 2's copy 2 holds its options in another order than the left rotation: row 10, on line 13 (the
    questions of rows 2 and 8 span two lines each)."""
    reordered = [2000002, Q2, "", "dog", "cat", "bird", "", "C", "animal", "coarse_perception", "2", "dev", "s"]
    return _write(tmp_path / name, HEADER, MAINS + [r for r in COPIES if r[0] != 2000002] + [reordered])


def test_the_rotated_order_warning_is_given_once_per_file(tiny, tmp_path, monkeypatch, caplog):
    """What the CLI does: the config check reads the file, then the evaluation and its blank-image baseline."""
    model, processor = tiny
    monkeypatch.setattr(eval_run, "generate_replies", lambda model, processor, items, **kw: ["A"] * len(items))
    odd = _reordered(tmp_path)
    cfg = EvalConfig(name="mmbench", tasks=["mmbench"], tsv=str(odd), text_only_baseline=True, n_boot=10)
    with caplog.at_level(logging.WARNING, logger="vlmablate.eval.mmbench"):
        check_benchmark_files(cfg)
        run_eval(cfg, model, processor, tmp_path / "eval")
        read_mmbench_tsv(odd)
        read_mmbench_tsv(_reordered(tmp_path, "other.tsv"))  # another file: its own warning
    assert [m.split(": ", 1)[0] for m in caplog.messages if "rotated left" in m] == [
        f"{odd} line 13 (row 10, index 2000002)", f"{tmp_path / 'other.tsv'} line 13 (row 10, index 2000002)"]


# ----------------------------------------------------------------------------- 7. evaluating a run again


def _fixed_replies(monkeypatch):
    monkeypatch.setattr(eval_run, "generate_replies", lambda model, processor, items, **kw: ["A"] * len(items))


def _evaluate_run(tiny, run_dir, cfg):
    """What `python -m vlmablate.eval run_dir=RUN` does after loading the model."""
    model, processor = tiny
    results, _ = run_eval(cfg, model, processor, run_dir / "eval", reported=reported_evaluations(
        run_dir / "summary.json"))
    return results, merge_summary(run_dir / "summary.json", results)


def test_evaluating_a_run_differently_keeps_its_first_evaluation(tiny, world_files, tmp_path, monkeypatch):
    _fixed_replies(monkeypatch)
    model, processor = tiny
    run = tmp_path / "run"
    first = EvalConfig(name="tiny_world", tasks=["mmbench"], text_only_baseline=True, max_questions=6, n_boot=10,
                       tsv=world_files["bench_tsv"])
    in_run, _ = run_eval(first, model, processor, run / "eval")  # the main job's evaluation
    (run / "summary.json").write_text(json.dumps({"status": "completed", "train": {"steps": 4}, "eval": in_run}))
    predictions = (run / "eval" / "mmbench" / "predictions.jsonl").read_text()

    other_file = shutil.copy(world_files["bench_tsv"], tmp_path / "MMBench_DEV_EN.tsv")
    again = EvalConfig(name="mmbench_fast", tasks=["mmbench"], mode="likelihood", max_questions=6, n_boot=10,
                       tsv=str(other_file))
    results, summary = _evaluate_run(tiny, run, again)
    sha = file_sha256(other_file)[:8]
    name = f"mmbench-likelihood-dev-MMBench_DEV_EN-{sha}-first6"
    assert list(results) == [name]
    # the first evaluation, untouched, is still the one the summary reports, and says which it is
    assert (run / "eval" / "mmbench" / "predictions.jsonl").read_text() == predictions
    assert summary["eval"]["mmbench"] == in_run["mmbench"] and summary["train"] == {"steps": 4}
    reported = summary["eval"]["mmbench"]["evaluation"]
    bench = world_files["bench_tsv"]
    stem = bench.rsplit("/", 1)[-1].removesuffix(".tsv").replace("-", "_")
    assert reported["name"] == f"mmbench-generate-vlmevalkit_a67ace50-dev-{stem}-{file_sha256(bench)[:8]}-first6-8tok"
    assert (reported["dir"], reported["mode"], summary["eval"]["mmbench"]["mode"]) == ("eval/mmbench", "generate",
                                                                                        "generate")
    assert summary["eval"]["mmbench_blank_image"]["evaluation"]["name"].startswith("mmbench_blank_image-generate-")
    # the new one beside it, under its name
    beside = summary["eval"][name]
    assert (beside["mode"], beside["evaluation"]["dir"]) == ("likelihood", f"eval/{name}")
    rows = [json.loads(line) for line in (run / "eval" / name / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == beside["n_rows"] and all("letter_scores" in r for r in rows)

    # the same evaluation made again replaces itself, nothing else
    results, summary = _evaluate_run(tiny, run, again)
    assert list(results) == [name] and sorted(summary["eval"]) == sorted(["mmbench", "mmbench_blank_image", name])
    # the first one's settings made again: it is the reported one, so it replaces it in place
    results, summary = _evaluate_run(tiny, run, EvalConfig(**{**first.__dict__, "text_only_baseline": False}))
    assert list(results) == ["mmbench"] and summary["eval"]["mmbench"]["evaluation"] == reported


def test_an_older_summarys_evaluation_is_never_replaced(tiny, world_files, tmp_path, monkeypatch):
    """A summary written before evaluations were named: even the same settings go beside it."""
    _fixed_replies(monkeypatch)
    run = tmp_path / "run"
    (run / "eval" / "mmbench").mkdir(parents=True)
    (run / "eval" / "mmbench" / "predictions.jsonl").write_text('{"q": 0, "copy": 0, "correct": true}\n')
    old = {"mode": "generate", "extraction": "vlmevalkit_a67ace50", "split": "dev", "tsv": world_files["bench_tsv"],
           "circular_acc": 0.5}
    (run / "summary.json").write_text(json.dumps({"status": "completed", "eval": {"mmbench": old}}))
    cfg = EvalConfig(name="mmbench", tasks=["mmbench"], max_questions=2, n_boot=10, tsv=world_files["bench_tsv"])
    results, summary = _evaluate_run(tiny, run, cfg)
    (name,) = results
    assert name.startswith("mmbench-generate-vlmevalkit_a67ace50-dev-") and name.endswith("-first2-8tok")
    assert summary["eval"]["mmbench"] == old
    assert (run / "eval" / "mmbench" / "predictions.jsonl").read_text() == '{"q": 0, "copy": 0, "correct": true}\n'


def _fake_run(folder, cell, seed, correct, mmbench):
    run = folder / cell / f"seed{seed}"
    (run / "eval" / "mmbench").mkdir(parents=True)
    rows = [{"q": q, "copy": c, "correct": ok} for q, ok in enumerate(correct) for c in range(2)]
    (run / "eval" / "mmbench" / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    summary = {"status": "completed", "seed": seed, "cell": {"name": cell, "label": cell.upper()},
               "params": {"total": 1000, "trainable": {"total": 10 * (1 + len(cell))}},
               "train": {"wall_clock_s": 5.0, "peak_mem_mb": 100.0, "final_loss": 1.0},
               "eval": {"mmbench": {"vanilla_acc": 0.5, **mmbench}}}
    (run / "summary.json").write_text(json.dumps(summary))


GENERATE = {"mode": "generate", "extraction": "vlmevalkit_a67ace50", "split": "dev", "tsv": "/data/bench.tsv"}
LIKELIHOOD = {"mode": "likelihood", "extraction": None, "split": "dev", "tsv": "/data/bench.tsv"}


def test_the_report_compares_only_cells_evaluated_alike(tmp_path):
    for seed in (0, 1):
        _fake_run(tmp_path, "a", seed, [True] * 20, GENERATE)
        _fake_run(tmp_path, "b", seed, [False] * 20, {**GENERATE, "tsv": "/elsewhere/bench.tsv"})  # same file name
        _fake_run(tmp_path, "c", seed, [False] * 20, LIKELIHOOD)
    _fake_run(tmp_path, "d", 0, [False] * 20, GENERATE)
    _fake_run(tmp_path, "d", 1, [False] * 20, LIKELIHOOD)
    result = write_report(tmp_path, n_boot=100)
    assert [(t["a"], t["b"]) for t in result["paired"]] == [("a", "b")]
    rows = {r["cell"]: r for r in result["rows"]}
    assert rows["a"]["evaluation"] == "mmbench-generate-vlmevalkit_a67ace50-dev-bench"
    assert rows["c"]["evaluation"] == "mmbench-likelihood-dev-bench"
    assert rows["d"]["evaluation"] == "mmbench-generate-vlmevalkit_a67ace50-dev-bench;mmbench-likelihood-dev-bench"
    assert (rows["a"]["mmbench_gain"], rows["c"]["mmbench_gain"]) == (None, None)  # no frozen-LLM cell
    assert result["evaluations"] == [
        "evaluation mmbench-generate-vlmevalkit_a67ace50-dev-bench: a, b",
        "evaluation mmbench-likelihood-dev-bench: c (mode generate vs likelihood, extraction vlmevalkit_a67ace50 vs "
        "None)",
        "d: its seeds were evaluated differently (mode generate vs likelihood, extraction vlmevalkit_a67ace50 vs "
        "None); not compared"]
    markdown = (tmp_path / "comparison.md").read_text()
    assert "| stage-1 artifact | MMBench evaluation |" in markdown
    assert "| mmbench-likelihood-dev-bench |" in markdown
    assert "- d: its seeds were evaluated differently" in markdown
    assert "MMBench was not evaluated alike in every cell" in json.dumps(result["decision"]["notes"])
    with (tmp_path / "comparison.csv").open() as f:
        assert {r["cell"]: r["evaluation"] for r in csv.DictReader(f)}["c"] == "mmbench-likelihood-dev-bench"


def test_cells_evaluated_alike_get_no_evaluation_column(tmp_path):
    for seed in (0, 1):
        _fake_run(tmp_path, "a", seed, [True] * 20, GENERATE)
        _fake_run(tmp_path, "b", seed, [False] * 20, GENERATE)
    result = write_report(tmp_path, n_boot=100)
    assert result["evaluations"] == [] and len(result["paired"]) == 1
    assert "MMBench evaluation" not in (tmp_path / "comparison.md").read_text()
    from vlmablate.report.compare import collect

    cells = collect(tmp_path)
    assert evaluation_notes(cells) == [] and len(paired_tests(cells, n_boot=100)) == 1


@pytest.mark.slow
def test_the_cli_keeps_the_main_jobs_evaluation(run_cell, world_files, tmp_path):
    """The case reported: the main job's evaluation, then `python -m vlmablate.eval eval=mmbench_fast eval.tsv=...`."""
    import os
    import subprocess
    import sys

    s = run_cell("train.max_steps=4", "eval.max_questions=10", "eval.n_boot=50", "eval.retention.enabled=false",
                 name="cell")
    run = tmp_path / "cell"
    predictions = (run / "eval" / "mmbench" / "predictions.jsonl").read_text()
    tsv = shutil.copy(world_files["bench_tsv"], tmp_path / "MMBench_DEV_EN.tsv")
    out = subprocess.run([sys.executable, "-m", "vlmablate.eval", f"run_dir={run}", "world=test", "eval=mmbench_fast",
                          f"eval.tsv={tsv}", "eval.max_questions=10", "eval.n_boot=50", "train.progress=false",
                          f"hydra.run.dir={tmp_path / 'eval-log'}"], env={**os.environ}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    name = f"mmbench-likelihood-dev-MMBench_DEV_EN-{file_sha256(tsv)[:8]}-first10"
    merged = json.loads((run / "summary.json").read_text())
    assert merged["eval"]["mmbench"] == s["eval"]["mmbench"] and merged["eval"]["mmbench"]["mode"] == "generate"
    assert (run / "eval" / "mmbench" / "predictions.jsonl").read_text() == predictions
    assert merged["eval"][name]["mode"] == "likelihood" and (run / "eval" / name / "predictions.jsonl").exists()
    assert f"this one is kept beside it as {name}" in out.stdout + out.stderr
