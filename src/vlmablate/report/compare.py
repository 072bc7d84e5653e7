"""The comparison of a sweep's cells: one row per cell, seeds pooled, written as CSV, Markdown and a plot.

A cell is what a run trained (its `cell` name, else vision policy + freeze option + quantization); the
runs of a cell differ only in their seed. For each cell:

- trainable parameters (and % of total) and the stage-1 artifact it started from;
- MMBench CircularEval accuracy: the mean over seeds, with a 95% interval from the crossed seeds ×
  questions model (`report/stats.py`), so it carries training noise as well as question noise (one
  seed: a bootstrap over questions); the same with a blank image (the text-only baseline, where the
  run has one), and both per category;
- VQA accuracy, wall-clock, peak memory, tokens/s, training FLOPs per token, achieved TFLOP/s and MFU
  (model FLOPs utilisation against the device's peak, `train/mfu.py`), as means over seeds;
- how many seeds completed, and which failed;
- the retention loss (`eval/retention.py`: the LM's loss increase on text alone, larger = more forgetting):
  the mean over seeds of each run's `difference`, with a 95% CI from the crossed seeds × items model (one
  seed: the run's paired bootstrap over items); the decision reads it as `retention_loss`;
- the MMBench gain over the frozen-LLM cell (with the paired test's CI), which comparison_forgetting.png
  plots against the retention loss: learning against forgetting.

Cells are compared only where MMBench was evaluated alike (`eval/evaluations.py`: the same mode, extraction,
split, benchmark file, ...; each run's summary names its evaluation). Where the sweep's cells were not, the
table gets an "MMBench evaluation" column and a note naming the groups, and cells of different groups get
no paired test, no gain and no control test; a cell whose seeds were evaluated differently gets none.

Every two cells are compared by the crossed test (`stats.compare`): difference, 95% CI and p with
training noise in them, the smallest difference three seeds can see, and the seeds the observed
difference would need. Each table (overall; per category) is one family: its p-values are corrected by
Holm, and "beyond noise" reads the corrected p. The positive controls (`CONTROLS`, the tiny world's
built-in effects) test every cell that trains a component against every cell that freezes it, on the
category made for it. A cell that trained the same config as an earlier one under another name is an
A/A arm (the negative control): it is compared with that one only, in a section of its own. The plot
draws the blank-image baseline, pooled over every cell and seed, as a band. The reference freeze table's
columns (config, trainable params, MMBench accuracy, wall-clock) come first in the Markdown table so the
two read side by side.

The report opens (comparison.md, comparison.json) and ends (the console) with a decision per budget
(`report/decision.py`): the cell to pick by these tests, and why. Where the runs measured no GPU memory,
plan's estimate for the cell stands in, marked as estimated.
"""

from __future__ import annotations

import csv
import json
import math
from itertools import combinations
from pathlib import Path

import numpy as np

from vlmablate.eval.evaluations import describe, differences, identity_of
from vlmablate.eval.metrics import bootstrap_ci, paired_difference
from vlmablate.report import decision, stats

CSV_COLUMNS = ("cell", "label", "vision", "freeze", "quant", "status", "seeds", "failed_seeds", "trainable_params",
               "trainable_pct", "total_params", "mmbench_circular", "mmbench_ci_low", "mmbench_ci_high",
               "mmbench_vanilla", "mmbench_blank", "mmbench_blank_3plus", "vqa_acc", "vqa_blank", "retention_loss",
               "retention_ci_low", "retention_ci_high", "mmbench_gain", "mmbench_gain_ci_low", "mmbench_gain_ci_high",
               "gain_over", "wall_clock_s",
               "peak_mem_mb", "tokens_per_s", "flops_per_token", "tflops", "mfu", "final_loss", "stage1_artifact",
               "evaluation")


def find_runs(sweep_dir: Path) -> list[Path]:
    """Every run directory below the sweep (a folder with summary.json), stage-1 caches excluded."""
    return sorted(p.parent for p in Path(sweep_dir).rglob("summary.json") if "stage1" not in p.parts)


def _cell_key(summary: dict, config: dict) -> tuple[str, str]:
    cell = summary.get("cell") or {}
    vision = config.get("vision", {}).get("policy", "?")
    freeze = config.get("freeze", {}).get("name", "?")
    quant = config.get("quant", {}).get("mode", "?")
    if cell.get("name") and cell["name"] != "none":
        return cell["name"], cell.get("label") or cell["name"]
    name = f"vision={vision} freeze={freeze} quant={quant}"
    return name, name


def _read(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    config_path = run_dir / ".hydra" / "config.yaml"
    config = {}
    if config_path.exists():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
    return {"dir": run_dir, "summary": summary, "config": config}


def _question_correctness(run_dir: Path, task: str = "mmbench") -> dict[int, bool]:
    """Question -> CircularEval correctness (every circular copy right), from the run's predictions of `task`
    ("mmbench", or "mmbench_blank_image": the same questions with a blank image)."""
    return {q: ok for q, (ok, _) in _question_records(run_dir, task).items()}


def _question_records(run_dir: Path, task: str = "mmbench") -> dict[int, tuple[bool, str | None]]:
    """Question -> (CircularEval correctness, its category)."""
    path = run_dir / "eval" / task / "predictions.jsonl"
    if not path.exists():
        return {}
    records: dict[int, tuple[bool, str | None]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        ok, _ = records.get(row["q"], (True, None))
        records[row["q"]] = (ok and bool(row["correct"]), row.get("category"))
    return records


def _many_options(runs: list[dict], task: str) -> list[float]:
    """CircularEval correctness of every (seed, question) with three or more options (copies) in `task`."""
    pooled = []
    for run in runs:
        path = run["dir"] / "eval" / task / "predictions.jsonl"
        if not path.exists():
            continue
        copies, right = {}, {}
        for line in path.read_text().splitlines():
            row = json.loads(line)
            copies[row["q"]] = copies.get(row["q"], 0) + 1
            right[row["q"]] = right.get(row["q"], True) and bool(row["correct"])
        pooled += [float(right[q]) for q, n in copies.items() if n >= 3]
    return pooled


def _pooled(runs: list[dict], task: str) -> dict[str | None, list[float]]:
    """Per category (and None: all), the CircularEval correctness of every (seed, question) of `runs`."""
    pooled: dict[str | None, list[float]] = {None: []}
    for run in runs:
        for ok, category in _question_records(run["dir"], task).values():
            pooled[None].append(float(ok))
            pooled.setdefault(category, []).append(float(ok))
    return pooled


def _evaluations(cell: dict) -> list[dict]:
    """The identity of the MMBench evaluation each completed run of the cell reports (`summary.eval.mmbench`)."""
    idents = []
    for run in cell["runs"]:
        metrics = (run["summary"].get("eval") or {}).get("mmbench")
        if run["summary"].get("status") == "completed" and metrics:
            idents.append(identity_of("mmbench", metrics))
    return idents


def _alike(idents: list[dict]) -> bool:
    return all(not differences(a, b) for a, b in combinations(idents, 2))


def evaluated_alike(a: dict, b: dict) -> bool:
    """Whether every run of two cells reports the same MMBench evaluation (fields one of them lacks, in a
    summary written before evaluations were named, are not compared)."""
    return _alike(_evaluations(a) + _evaluations(b))


def evaluation_notes(cells: list[dict]) -> list[str]:
    """Empty where every cell was evaluated alike; else the groups of cells evaluated alike, and the cells whose
    seeds were evaluated differently: the cells that are not compared with each other."""
    groups: list[tuple[dict, list[str]]] = []
    mixed = []
    for cell in cells:
        idents = _evaluations(cell)
        if not idents:
            continue
        if not _alike(idents):
            a, b = next((a, b) for a, b in combinations(idents, 2) if differences(a, b))
            mixed.append(f"{cell['cell']}: its seeds were evaluated differently ({describe(a, b)}); not compared")
            continue
        group = next((g for g in groups if _alike([g[0], *idents])), None)
        if group is None:
            groups.append((idents[0], [cell["cell"]]))
        else:
            group[1].append(cell["cell"])
    if len(groups) < 2 and not mixed:
        return []
    first = groups[0][0] if groups else None
    notes = [f"evaluation {ident['name']}: {', '.join(names)}"
             + ("" if ident is first else f" ({describe(first, ident)})") for ident, names in groups]
    return notes + mixed


# the reference freeze table's rows, in its order
REFERENCE_ORDER = ("frozen_frozen", "frozen_lora", "unfrozen_lora", "full")
TITLE = "Comparison of the sweep's cells"


def collect(sweep_dir: Path) -> list[dict]:
    """One entry per cell with its runs (in seed order); the reference freeze table's cells first, in its order."""
    cells: dict[str, dict] = {}
    for run_dir in find_runs(sweep_dir):
        run = _read(run_dir)
        name, label = _cell_key(run["summary"], run["config"])
        cell = cells.setdefault(name, {"cell": name, "label": label, "runs": [], "config": run["config"]})
        cell["runs"].append(run)
    for cell in cells.values():
        cell["runs"].sort(key=lambda r: (r["summary"].get("seed") is None, r["summary"].get("seed")))
    rank = {name: k for k, name in enumerate(REFERENCE_ORDER)}
    return sorted(cells.values(), key=lambda c: (rank.get(c["cell"], len(rank)), c["cell"]))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else None


def _cell_ci(answers: dict, pooled: list[float], n_boot: int) -> list[float | None]:
    """95% CI of a cell's accuracy: from the crossed seeds × questions model with two or more seeds
    (training noise included), else a bootstrap over questions."""
    common = set.intersection(*(set(r) for r in answers.values())) if answers else set()
    if len(answers) < 2 or not common:
        return bootstrap_ci(pooled, n_boot=n_boot)
    keys = sorted(common)
    return stats.cell_accuracy(np.array([[float(r[q]) for q in keys] for r in answers.values()]))["ci"]


def summarize(cell: dict, *, n_boot: int = 1000, answers: dict | None = None) -> dict:
    """One cell's row; `answers` is the cell's `_answers` where the caller read them already."""
    config = cell["config"]
    done = [r for r in cell["runs"] if r["summary"].get("status") == "completed"]
    failed = [r for r in cell["runs"] if r["summary"].get("status") != "completed"]
    row = {"cell": cell["cell"], "label": cell["label"], "vision": config.get("vision", {}).get("policy"),
           "freeze": config.get("freeze", {}).get("name"), "quant": config.get("quant", {}).get("mode"),
           "seeds": len(done), "failed_seeds": ";".join(str(r["summary"].get("seed")) for r in failed),
           "completed_seeds": ";".join(str(r["summary"].get("seed")) for r in done),
           "status": "completed" if done and not failed else ("partial" if done else "failed")}
    if failed and not done:
        row["error"] = failed[0]["summary"].get("error", "")
    params = next((r["summary"].get("params") for r in cell["runs"] if r["summary"].get("params")), None)
    if params:
        row["trainable_params"] = params["trainable"]["total"]
        row["total_params"] = params["total"]
        row["trainable_pct"] = round(100 * params["trainable"]["total"] / max(1, params["total"]), 4)
    pooled, blank = _pooled(done, "mmbench"), _pooled(done, "mmbench_blank_image")
    if pooled[None]:
        row["mmbench_circular"] = float(np.mean(pooled[None]))
        answers = _answers(cell) if answers is None else answers
        row["mmbench_ci_low"], row["mmbench_ci_high"] = _cell_ci(answers[0], pooled[None], n_boot)
    if blank[None]:
        row["mmbench_blank"] = float(np.mean(blank[None]))
    row["per_category"] = {c: {"circular": float(np.mean(v)), "blank": _mean(blank.get(c, [])), "n": len(v)}
                           for c, v in sorted(pooled.items(), key=lambda kv: str(kv[0])) if c is not None}
    evals = [r["summary"].get("eval", {}) for r in done]
    row["mmbench_vanilla"] = _mean(e.get("mmbench", {}).get("vanilla_acc") for e in evals)
    row["vqa_acc"] = _mean(e.get("textvqa", {}).get("vqa_acc") for e in evals)
    row["vqa_blank"] = _mean(e.get("vqa_blank_image", {}).get("vqa_acc") for e in evals)
    row["mmbench_blank_3plus"] = _mean(_many_options(done, "mmbench_blank_image"))
    row.update(retention_of(done))
    trains = [r["summary"].get("train", {}) for r in done]
    for key in ("wall_clock_s", "peak_mem_mb", "tokens_per_s", "flops_per_token", "tflops", "mfu", "final_loss"):
        row[key] = _mean(t.get(key) for t in trains)
    # where peak_mem_mb was measured: a GPU's allocator ("cuda:0"), or the process on the CPU
    devices = {(r["summary"].get("determinism") or {}).get("device") for r in done} - {None}
    row["device"] = ";".join(sorted(devices)) or None
    stage1 = {((r["summary"].get("lineage") or {}).get("stage1") or {}).get("hash") for r in done} - {None}
    row["stage1_artifact"] = ";".join(sorted(stage1))
    row["evaluation"] = ";".join(sorted({ident["name"] for ident in _evaluations(cell)})) or None
    return row


def _retention_items(run: dict) -> np.ndarray | None:
    """A run's per-item retention differences (after - before), from eval/retention/items.jsonl."""
    path = run["dir"] / "eval" / "retention" / "items.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return np.array([r["after"] - r["before"] for r in rows], dtype=float)


def retention_of(runs: list[dict]) -> dict:
    """A cell's retention loss (eval/retention.py): the mean over its completed runs of `difference`
    (larger: more forgetting), with a 95% CI from the crossed seeds × items model where two or more runs
    scored the same items (training noise included), else the one run's paired bootstrap over items."""
    measured = [(run, run["summary"].get("eval", {}).get("retention")) for run in runs]
    # a run that measured only lm-eval tasks (no text set) has no loss difference to average
    measured = [(run, ret) for run, ret in measured if ret and "difference" in ret]
    if not measured:
        return {"retention_loss": None, "retention_ci_low": None, "retention_ci_high": None}
    loss = float(np.mean([ret["difference"] for _, ret in measured]))
    ci = measured[0][1]["ci"] if len(measured) == 1 else [None, None]
    items = [_retention_items(run) for run, _ in measured]
    if len(measured) > 1 and all(x is not None for x in items) and len({x.size for x in items}) == 1:
        diffs = np.stack(items)
        ci = stats.compare(diffs, np.zeros_like(diffs), paired=True, with_power=False)["ci"]
    return {"retention_loss": loss, "retention_ci_low": ci[0], "retention_ci_high": ci[1],
            "retention_before": _mean(ret["before"] for _, ret in measured),
            "retention_after": _mean(ret["after"] for _, ret in measured),
            "retention_n": measured[0][1]["n"], "retention_measured": measured[0][1].get("measured")}


def frozen_llm_reference(rows: list[dict]) -> str | None:
    """The cell gains are measured against: the reference freeze table's frozen-LLM row where the sweep
    has it, else the first frozen-LLM cell with an accuracy."""
    frozen = [r for r in rows if r.get("freeze") == "frozen_llm" and r.get("mmbench_circular") is not None]
    named = [r for r in frozen if r["cell"] == REFERENCE_ORDER[0]]
    return (named or frozen or [{"cell": None}])[0]["cell"]


def add_gains(rows: list[dict], tests: list[dict]) -> None:
    """Each row's MMBench gain over the frozen-LLM cell, with the paired test's 95% CI (0 for that cell)."""
    ref = frozen_llm_reference(rows)
    by_pair = {(t["a"], t["b"]): t for t in tests}
    for r in rows:
        r["gain_over"] = ref
        r["mmbench_gain"] = r["mmbench_gain_ci_low"] = r["mmbench_gain_ci_high"] = None
        if ref is None:
            continue
        if r["cell"] == ref:
            r["mmbench_gain"], r["mmbench_gain_ci_low"], r["mmbench_gain_ci_high"] = 0.0, 0.0, 0.0
        elif (r["cell"], ref) in by_pair:
            t = by_pair[(r["cell"], ref)]
            r["mmbench_gain"], (r["mmbench_gain_ci_low"], r["mmbench_gain_ci_high"]) = t["diff"], t["ci"]
        elif (ref, r["cell"]) in by_pair:
            t = by_pair[(ref, r["cell"])]
            low, high = t["ci"]
            r["mmbench_gain"], r["mmbench_gain_ci_low"], r["mmbench_gain_ci_high"] = -t["diff"], -high, -low


def answers_by_cell(cells: list[dict]) -> dict[str, tuple[dict, dict]]:
    """Every cell's `_answers`, read once for all the report's tests."""
    return {cell["cell"]: _answers(cell) for cell in cells}


def _answers(cell: dict) -> tuple[dict, dict]:
    """A cell's completed runs as {seed: {question: correct}}, and {question: category}."""
    answers, categories = {}, {}
    for run in cell["runs"]:
        if run["summary"].get("status") != "completed":
            continue
        records = _question_records(run["dir"])
        if records:
            answers[run["summary"].get("seed")] = {q: ok for q, (ok, _) in records.items()}
            categories.update({q: category for q, (_, category) in records.items()})
    return answers, categories


def _common(a: dict, b: dict) -> set:
    """The questions every run of both cells answered."""
    return set.intersection(*(set(r) for r in (*a.values(), *b.values())))


def _matrices(a: dict, b: dict, questions: set) -> tuple[np.ndarray, np.ndarray, bool, list]:
    """Seeds × questions matrices of two cells over `questions`; paired on their shared seeds when they
    share two or more, else each with all of its own seeds (an A/A comparison's disjoint seeds)."""
    shared = sorted(set(a) & set(b), key=str)
    paired = len(shared) >= 2 or (len(shared) == 1 and len(a) == len(b) == 1)
    seeds_a, seeds_b = (shared, shared) if paired else (sorted(a, key=str), sorted(b, key=str))
    keys = sorted(questions)
    mat = lambda runs, seeds: np.array([[float(runs[s][q]) for q in keys] for s in seeds])  # noqa: E731
    return mat(a, seeds_a), mat(b, seeds_b), paired, shared if paired else []


def _compare(name_a: str, name_b: str, a: dict, b: dict, questions: set, *, n_boot: int,
             category: str | None = None) -> dict | None:
    """The crossed test of two cells on `questions` (the new test), and the pair-level one beside it."""
    if not questions:
        return None
    mat_a, mat_b, paired, shared = _matrices(a, b, questions)
    result = stats.compare(mat_a, mat_b, paired=paired)
    test = {"a": name_a, "b": name_b, "pairs": int(mat_a.size) if paired else None, **result}
    if shared:  # the old test: every (seed, question) pair independent, for comparison only
        flat_a = {k: bool(v) for k, v in enumerate(mat_a.ravel())}
        flat_b = {k: bool(v) for k, v in enumerate(mat_b.ravel())}
        old = paired_difference(flat_a, flat_b, n_boot=n_boot)
        test["pair_level"] = {"ci": old["ci"], "p_value": old["p_value"]}
    if category is not None:
        test["category"] = category
    return test


def _same_training(a: dict, b: dict) -> bool:
    """Two cells that differ only in their name and seeds (an A/A comparison). Settings that only one of
    the two configs has (a field added to the schema between the two runs) are not compared."""
    def training(cell):
        config = json.loads(json.dumps(cell["config"], default=str))
        config.pop("cell", None)
        config.pop("report", None)  # what the report decides on, not what the cell trained
        config.get("train", {}).pop("seed", None)
        return config

    def same(x, y) -> bool:
        if isinstance(x, dict) and isinstance(y, dict):
            return all(same(x[k], y[k]) for k in set(x) & set(y))
        return x == y

    return bool(a["config"]) and bool(b["config"]) and same(training(a), training(b))


def _twins(names: list[str], by_name: dict) -> dict[str, str]:
    """Cell -> the first earlier cell that trained the same config under another name (A/A arms)."""
    twins = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if a not in twins and b not in twins and _same_training(by_name[a], by_name[b]):
                twins[b] = a
    return twins


def paired_tests(cells: list[dict], *, n_boot: int = 1000, by_category: bool = False,
                 aa: bool = False, data: dict | None = None) -> list[dict]:
    """Every pair of cells on the questions both have: the crossed seeds × questions test (difference,
    95% CI, p, the power figures) and, as `p_holm`, Holm's correction over the returned family; with
    `by_category`, within each category (each test then carries its `category`), all in one family.

    A cell that trained the same config as an earlier one under another name (an A/A arm) is compared
    only with that one, and only when `aa` is set (then nothing else is returned). `data` is
    `answers_by_cell(cells)` where the caller read it already."""
    data = answers_by_cell(cells) if data is None else data
    by_name = {cell["cell"]: cell for cell in cells}
    names = [cell["cell"] for cell in cells if data[cell["cell"]][0]]
    twins = _twins(names, by_name)
    if aa:
        pairs = [(twins[b], b) for b in names if b in twins]
    else:
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if a not in twins and b not in twins]
    pairs = [(a, b) for a, b in pairs if evaluated_alike(by_name[a], by_name[b])]  # else nothing to compare
    tests = []
    for a, b in pairs:
        (runs_a, cats_a), (runs_b, cats_b) = data[a], data[b]
        common = _common(runs_a, runs_b)
        categories = {**cats_a, **cats_b}
        groups = sorted({categories.get(q) for q in common} - {None}) if by_category else [None]
        for category in groups:
            questions = {q for q in common if category is None or categories.get(q) == category}
            test = _compare(a, b, runs_a, runs_b, questions, n_boot=n_boot, category=category)
            if test is not None:
                tests.append(test)
    for test, adjusted in zip(tests, stats.holm([t["p_value"] for t in tests])):
        test["p_holm"] = adjusted
        test["beyond_noise"] = bool(test["training_noise"] and adjusted < stats.ALPHA)
    return tests


EVALUATED_APART = ("MMBench was not evaluated alike in every cell, so cells evaluated differently are not compared "
                   "(no paired test, gain or control between them) and their accuracies are not comparable")


# The effects the tiny world builds in (docs/tiny_world.md): a known difference each control must find.
CONTROLS = (
    {"name": "vision side: the mark", "category": "mark_recognition", "component": "vision"},
    {"name": "LM side: counting", "category": "object_counting", "component": "llm"},
)
CONTROL_EFFECT = 0.15  # each trained cell beats each frozen one by at least this ...
CONTROL_ALPHA = 0.01  # ... with a Holm-corrected p below this, over the control's family
# A found control, by what the blank image says of it (`from_image`).
CONTROL_VERDICTS = {True: "found", None: "found (no blank-image runs to tell reading from a prior)",
                    False: "found, but a blank image gains nearly as much: a prior, not read from the image"}


def _trains(cell: dict, component: str) -> bool | None:
    config = cell["config"]
    policy = config.get("vision" if component == "vision" else "freeze", {}).get("policy")
    return None if policy is None else policy != "frozen"


def control_tests(cells: list[dict], *, n_boot: int = 1000, data: dict | None = None) -> list[dict]:
    """The positive controls: for each effect in CONTROLS whose category the benchmark has, every cell
    that trains the component against every cell that freezes it, on that category; Holm over each
    control's family. A/A arms (a second name for a trained config) are left out."""
    data = answers_by_cell(cells) if data is None else data
    by_name = {cell["cell"]: cell for cell in cells}
    names = [cell["cell"] for cell in cells if data[cell["cell"]][0]]
    twins = _twins(names, by_name)
    names = [n for n in names if n not in twins]
    results = []
    for control in CONTROLS:
        trained = [n for n in names if _trains(by_name[n], control["component"])]
        frozen = [n for n in names if _trains(by_name[n], control["component"]) is False]
        family = []
        for a in trained:
            for b in frozen:
                if not evaluated_alike(by_name[a], by_name[b]):
                    continue
                (runs_a, cats), (runs_b, _) = data[a], data[b]
                questions = {q for q in _common(runs_a, runs_b) if cats.get(q) == control["category"]}
                test = _compare(a, b, runs_a, runs_b, questions, n_boot=n_boot, category=control["category"])
                if test is not None:
                    family.append(test)
        if not family:
            continue
        blank = {n: _blank_rate(by_name[n], control["category"]) for n in trained + frozen}
        for test, adjusted in zip(family, stats.holm([t["p_value"] for t in family])):
            test["p_holm"] = adjusted
            test["found"] = bool(test["training_noise"] and test["diff"] >= CONTROL_EFFECT
                                 and adjusted < CONTROL_ALPHA)
            # The same two cells with a blank image: a trained LM that learns which answers are likely
            # gains there as much, and has learned a prior, not to read the effect off the image.
            a, b = blank[test["a"]], blank[test["b"]]
            test["blank_diff"] = None if a is None or b is None else a - b
            test["from_image"] = None if test["blank_diff"] is None else \
                bool(test["diff"] - test["blank_diff"] >= CONTROL_EFFECT)
        found = all(t["found"] for t in family)
        reads = [t["from_image"] for t in family]
        results.append({**control, "tests": family, "found": found,
                        "from_image": False if False in reads else None if None in reads else True})
    return results


def _blank_rate(cell: dict, category: str) -> float | None:
    """The cell's CircularEval accuracy on `category` with a blank image, pooled over its completed seeds."""
    done = [r for r in cell["runs"] if r["summary"].get("status") == "completed"]
    values = _pooled(done, "mmbench_blank_image").get(category)
    return float(np.mean(values)) if values else None


def _fmt(value, digits: int = 3) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _sci(value) -> str:
    """Three significant digits: FLOPs per token run to 1e10, a CPU run's MFU to 1e-4."""
    return "-" if value is None else f"{value:.3g}"


def _params(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit} ({n:,})"
    return f"{n:,}"


def _p(value: float) -> str:
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _test_line(t: dict) -> str:
    lo, hi = t["ci"]
    mde = "-" if t.get("mde") is None else f"{t['mde']:.3f}"
    needed = t.get("seeds_for_power")
    # None for a non-zero difference: even endless seeds leave the questions' own noise above it
    if needed is None:
        needed = "-" if t["diff"] == 0 or t.get("mde") is None else "none: more questions"
    beyond = "yes" if t["beyond_noise"] else "no" if t["training_noise"] else "no (one seed: training noise unmeasured)"
    return (f"| {t['a']} | {t['b']} | {t['diff']:+.3f} | {_fmt(lo)} to {_fmt(hi)} | {_p(t['p_value'])} | "
            f"{_p(t['p_holm'])} | {mde} | {needed} | {beyond} |")


def _controls_markdown(controls: list[dict], rows: list[dict]) -> list[str]:
    if not controls:
        return []
    lines = ["", f"Positive controls, effects built into the world: found when every cell that trains the component "
             f"beats every cell that freezes it on the category by at least {CONTROL_EFFECT} with a Holm p < "
             f"{CONTROL_ALPHA} over the control's comparisons. The last column is the same difference with a blank "
             f"image: where it comes within {CONTROL_EFFECT} of the first, the trained cell learned which answers are "
             "likely, not to read them off the image:", "",
             "| control | trained cell | frozen cell | trained − frozen | 95% CI | p | p (Holm) | "
             "smallest difference the seeds see | found | the same, blank image |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for control in controls:
        for t in control["tests"]:
            lo, hi = t["ci"]
            mde = "-" if t.get("mde") is None else f"{t['mde']:.3f}"
            blank = "-" if t.get("blank_diff") is None else f"{t['blank_diff']:+.3f}"
            lines.append(f"| {control['name']} ({control['category']}) | {t['a']} | {t['b']} | {t['diff']:+.3f} | "
                         f"{_fmt(lo)} to {_fmt(hi)} | {_p(t['p_value'])} | {_p(t['p_holm'])} | {mde} | "
                         f"{'yes' if t['found'] else 'no'} | {blank} |")
    lines += ["", "| control | verdict | " + " | ".join(f"{r['label']}: image / blank" for r in rows) + " |",
              "|---|---|" + "---|" * len(rows)]
    for control in controls:
        cells = [r.get("per_category", {}).get(control["category"]) for r in rows]
        verdict = "not found" if not control["found"] else CONTROL_VERDICTS[control["from_image"]]
        lines.append(f"| {control['name']} | {verdict} | " + " | ".join(
            "-" if x is None else f"{x['circular']:.2f} / {_fmt(x['blank'], 2)}" for x in cells) + " |")
    return lines


def _aa_markdown(aa: dict | None) -> list[str]:
    if not aa or not aa.get("overall"):
        return []
    lines = ["", "A/A comparisons (the negative control: one config trained under two names; nothing should be "
             "beyond noise). Overall, and per category with Holm over the categories:", "",
             "| a | b | category | a − b | 95% CI | p | p (Holm) | beyond noise |", "|---|---|---|---|---|---|---|---|"]
    for t in aa["overall"] + aa.get("by_category", []):
        lo, hi = t["ci"]
        lines.append(f"| {t['a']} | {t['b']} | {t.get('category', 'all')} | {t['diff']:+.3f} | {_fmt(lo)} to "
                     f"{_fmt(hi)} | {_p(t['p_value'])} | {_p(t['p_holm'])} | {'yes' if t['beyond_noise'] else 'no'} |")
    return lines


def to_markdown(rows: list[dict], tests: list[dict], category_tests: list[dict] = (),
                controls: list[dict] = (), aa: dict | None = None, evaluations: list[str] = ()) -> str:
    """The tables; `evaluations`: `evaluation_notes`, where the cells were not all evaluated alike (then the
    table names each cell's evaluation in a last column, and the notes follow it)."""
    lines = ["| Config | Trainable params | MM-Bench circular (95% CI) | Wall-clock (s) | retention loss (95% CI) | "
             "% trainable | VQA acc | "
             "vanilla | blank image: circular | blank image: circular, 3+ options | blank image: VQA | peak mem (MB) | "
             "tokens/s | FLOPs/token | TFLOP/s | MFU | seeds | status | stage-1 artifact |"
             + (" MMBench evaluation |" if evaluations else ""),
             "|" + "---|" * (20 if evaluations else 19)]
    for r in rows:
        acc = "-" if r.get("mmbench_circular") is None else \
            f"{r['mmbench_circular']:.3f} ({_fmt(r.get('mmbench_ci_low'))}-{_fmt(r.get('mmbench_ci_high'))})"
        status = r["status"] + (f" (failed seeds {r['failed_seeds']})" if r.get("failed_seeds") else "")
        cols = [r["label"], _params(r.get("trainable_params")), acc, _fmt(r.get("wall_clock_s"), 1), _retention_cell(r),
                _fmt(r.get("trainable_pct"), 2), _fmt(r.get("vqa_acc")), _fmt(r.get("mmbench_vanilla")),
                _fmt(r.get("mmbench_blank")), _fmt(r.get("mmbench_blank_3plus")), _fmt(r.get("vqa_blank")),
                _fmt(r.get("peak_mem_mb"), 0),
                _fmt(r.get("tokens_per_s"), 0), _sci(r.get("flops_per_token")),
                _sci(r.get("tflops")), _sci(r.get("mfu")), str(r["seeds"]), status,
                r.get("stage1_artifact") or "-"] + ([r.get("evaluation") or "-"] if evaluations else [])
        lines.append("| " + " | ".join(cols) + " |")
    if evaluations:
        lines += ["", f"{EVALUATED_APART}:", "", *(f"- {note}" for note in evaluations)]
    if tests:
        seeds = max((min(t["seeds"]) for t in tests), default=0)
        lines += ["", "Paired differences in CircularEval correctness (crossed seeds × questions test: training "
                  "and question noise; Holm over the table; beyond noise: Holm p < 0.05):", "",
                  f"| a | b | a − b | 95% CI | p | p (Holm) | smallest difference {seeds} seeds see | "
                  "seeds for 80% power | beyond noise |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [_test_line(t) for t in tests]
    categories = sorted({c for r in rows for c in r.get("per_category", {})})
    if categories:
        lines += ["", "CircularEval accuracy per category, with the image / with a blank image (seeds pooled):", "",
                  "| category | " + " | ".join(r["label"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
        for c in categories:
            cells = [r.get("per_category", {}).get(c) for r in rows]
            lines.append(f"| {c} | " + " | ".join("-" if x is None else f"{x['circular']:.2f} / {_fmt(x['blank'], 2)}"
                                                  for x in cells) + " |")
    if category_tests:
        raw = [t for t in category_tests if t["p_value"] < 0.05]
        beyond = sum(t["beyond_noise"] for t in category_tests)
        lines += ["", f"Paired differences per category: {len(raw)} of {len(category_tests)} tests at a raw p < 0.05 "
                  f"(about {0.05 * len(category_tests):.1f} would be by chance alone), {beyond} beyond noise after "
                  "Holm over all of them; the ones at a raw p < 0.05:", "",
                  "| category | a | b | a − b | 95% CI | p | p (Holm) | beyond noise |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in raw:
            lo, hi = t["ci"]
            lines.append(f"| {t['category']} | {t['a']} | {t['b']} | {t['diff']:+.3f} | {_fmt(lo)} to {_fmt(hi)} | "
                         f"{_p(t['p_value'])} | {_p(t['p_holm'])} | {'yes' if t['beyond_noise'] else 'no'} |")
    lines += _controls_markdown(controls, rows)
    lines += _aa_markdown(aa)
    return "\n".join(lines) + "\n"


def _retention_cell(r: dict) -> str:
    """`+0.012 (+0.004 to +0.020)`: the mean retention loss over seeds with its CI; `-` where not measured."""
    loss = r.get("retention_loss")
    if loss is None:
        return "-"
    lo, hi = r.get("retention_ci_low"), r.get("retention_ci_high")
    return f"{loss:+.4f}" + ("" if lo is None else f" ({lo:+.4f} to {hi:+.4f})")


def plot_forgetting(rows: list[dict], path: Path) -> bool:
    """Learning against forgetting: per cell, the MMBench gain over the frozen-LLM cell against the retention
    loss, each with its 95% CI. Written only where some cell has both (returns whether it was)."""
    points = [r for r in rows if r.get("retention_loss") is not None and r.get("mmbench_gain") is not None]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5.4))
    for r in points:
        x, y = r["retention_loss"], r["mmbench_gain"]
        xlo, xhi = r.get("retention_ci_low"), r.get("retention_ci_high")
        ylo, yhi = r.get("mmbench_gain_ci_low"), r.get("mmbench_gain_ci_high")
        xerr = None if xlo is None else [[x - xlo], [xhi - x]]
        yerr = None if ylo is None else [[y - ylo], [yhi - y]]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=4, label=r["label"])
    ax.axhline(0, color="grey", lw=1)
    ax.axvline(0, color="grey", lw=1)
    ax.set_xlabel("retention loss: LM loss increase on text alone\n(nats/token; larger = more forgetting)")
    reference = next((r["label"] for r in rows if r["cell"] == points[0]["gain_over"]), points[0]["gain_over"])
    ax.set_ylabel(f"MMBench circular gain over\n{reference}")  # two lines: a cell's label is long
    ax.grid(alpha=0.3)
    # under the axes, where it hides no point or error bar
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot(rows: list[dict], path: Path, blank: tuple[float, float, float] | None = None) -> None:
    """Accuracy against trainable parameters and wall-clock; `blank` (mean, low, high) draws the blank-image
    baseline as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, xlabel in ((axes[0], "trainable_params", "trainable parameters"),
                            (axes[1], "wall_clock_s", "wall-clock per run (s)")):
        for r in rows:
            if r.get(key) is None or r.get("mmbench_circular") is None:
                continue
            y = r["mmbench_circular"]
            err = [[y - (r.get("mmbench_ci_low") or y)], [(r.get("mmbench_ci_high") or y) - y]]
            ax.errorbar(r[key], y, yerr=err, fmt="o", capsize=4, label=r["label"])
        if blank is not None:
            ax.axhspan(blank[1], blank[2], color="grey", alpha=0.2, label="blank image (95% CI)")
            ax.axhline(blank[0], color="grey", lw=1)
        if key == "trainable_params":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MMBench CircularEval accuracy")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report_settings(cells: list[dict], settings: dict) -> tuple[list, float | None]:
    """The budgets and retention limit in `settings`, else the sweep's `report` block (every run's config has
    one), else the defaults."""
    block = next((c["config"]["report"] for c in cells if isinstance(c["config"].get("report"), dict)), {})
    budgets = settings.get("budgets") or decision.parse_budgets(block.get("budgets") or decision.DEFAULT_BUDGETS)
    if "max_retention_loss" in settings:
        return budgets, settings["max_retention_loss"]
    return budgets, decision.parse_max_retention_loss(block.get("max_retention_loss"))


def _estimate_memory(cells: list[dict], rows: list[dict], skip: set) -> None:
    """Plan's peak GPU memory estimate for each cell whose runs measured none (CPU runs), from its config."""
    for cell, row in zip(cells, rows):
        if not decision.measured_on_gpu(row) and cell["config"] and row["seeds"] and cell["cell"] not in skip:
            from vlmablate.plan import estimated_peak_gib  # torch and transformers: only where needed

            row["peak_mem_estimated_gib"] = estimated_peak_gib(cell["config"])


def make_decision(cells: list[dict], rows: list[dict], tests: list[dict], aa: dict, settings: dict) -> dict:
    """The decision per budget (`report/decision.py`) over the report's rows and overall paired tests."""
    budgets, max_retention_loss = _report_settings(cells, settings)
    twins = {t["b"]: t["a"] for t in aa["overall"]}
    if any(b.kind == "memory" for b in budgets):
        _estimate_memory(cells, rows, set(twins))
    grid = REFERENCE_ORDER if any(r["cell"] in REFERENCE_ORDER for r in rows) else ()
    return decision.decide(rows, tests, budgets, max_retention_loss=max_retention_loss, twins=twins, grid=grid)


def write_report(sweep_dir: str | Path, *, n_boot: int = 1000, settings: dict | None = None) -> dict:
    """Write comparison.csv / .md / .png / .json into the sweep folder; return the rows, tests and decision.

    `settings`: `budgets` (`decision.Budget`s) and `max_retention_loss` (None: not asked); what it leaves out
    comes from the sweep's `report` block."""
    sweep_dir = Path(sweep_dir)
    cells = collect(sweep_dir)
    if not cells:
        raise FileNotFoundError(f"{sweep_dir}: no run directories (folders with summary.json) below it")
    data = answers_by_cell(cells)
    rows = [summarize(cell, n_boot=n_boot, answers=data[cell["cell"]]) for cell in cells]
    _name_twin_labels(rows)
    tests = paired_tests(cells, n_boot=n_boot, data=data)
    add_gains(rows, tests)
    category_tests = paired_tests(cells, n_boot=n_boot, by_category=True, data=data)
    controls = control_tests(cells, n_boot=n_boot, data=data)
    aa = {"overall": paired_tests(cells, n_boot=n_boot, aa=True, data=data),
          "by_category": paired_tests(cells, n_boot=n_boot, by_category=True, aa=True, data=data)}
    done = [r for cell in cells for r in cell["runs"] if r["summary"].get("status") == "completed"]
    blank_pooled = _pooled(done, "mmbench_blank_image")[None]
    blank = (float(np.mean(blank_pooled)), *bootstrap_ci(blank_pooled, n_boot=n_boot)) if blank_pooled else None
    with (sweep_dir / "comparison.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    decided = make_decision(cells, rows, tests, aa, settings or {})
    evaluations = evaluation_notes(cells)
    if evaluations:
        decided["notes"] = [*decided["notes"], f"{EVALUATED_APART}: {'; '.join(evaluations)}"]
    tables = to_markdown(rows, tests, category_tests, controls, aa, evaluations)
    (sweep_dir / "comparison.md").write_text(f"# {TITLE}\n\n{decision.decision_markdown(decided)}\n"
                                             f"## The cells\n\n{tables}")
    plot(rows, sweep_dir / "comparison.png", blank)
    forgetting = sweep_dir / "comparison_forgetting.png"
    if not plot_forgetting(rows, forgetting):
        forgetting.unlink(missing_ok=True)  # from an earlier report of this folder: it would be stale
    report = {"decision": decided, "rows": rows, "paired": tests, "paired_by_category": category_tests,
              "controls": controls, "aa": aa, "blank_band": blank, "evaluations": evaluations}
    (sweep_dir / "comparison.json").write_text(json.dumps(report, indent=2, default=str))
    offline = sorted({str(p) for cell in cells for run in cell["runs"]
                      for p in (run["dir"] / "wandb").glob("offline-run-*")})
    logger = next((c["config"]["logger"] for c in cells if isinstance(c["config"].get("logger"), dict)), None)
    return {**report, "markdown": tables, "wandb_offline": offline, "logger": logger}


def console_report(result: dict, sweep_dir: Path) -> str:
    """What the report prints: the tables, the files written, and the decision last."""
    files = ", ".join(str(sweep_dir / f"comparison.{ext}") for ext in ("csv", "md", "json", "png"))
    if (sweep_dir / "comparison_forgetting.png").exists():
        files += f", {sweep_dir / 'comparison_forgetting.png'}"
    return f"{result['markdown']}\nwritten: {files}\n\n{decision.decision_text(result['decision'])}"


def publish(result: dict, sweep_dir: Path, logger: dict | None) -> None:
    """Print the report (`console_report`), send the decision to W&B where the runs' `logger` names it, and
    say how to upload what was logged offline: the CLI's and the sweep callback's ending."""
    from vlmablate.report.wandb_log import log_decision

    print(console_report(result, sweep_dir))
    decided = log_decision(logger, result["decision"], sweep_dir=sweep_dir, rows=result["rows"]) if logger else None
    offline = result["wandb_offline"] + ([decided] if decided else [])
    if offline:
        print("W&B runs were logged offline; upload them with:\n  wandb sync " + " ".join(offline))


def _name_twin_labels(rows: list[dict]) -> None:
    """Two cells with one label (an A/A arm keeps its cell's label) are told apart by their names."""
    labels = [r["label"] for r in rows]
    for r in rows:
        if labels.count(r["label"]) > 1:
            r["label"] = f"{r['label']} ({r['cell']})"
