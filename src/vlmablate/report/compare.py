"""The comparison of a sweep's cells: one row per cell, seeds pooled, written as CSV, Markdown and a plot.

A cell is what a run trained (its `cell` name, else vision policy + freeze option + quantization); the
runs of a cell differ only in their seed. For each cell:

- trainable parameters (and % of total) and the stage-1 artifact it started from;
- MMBench CircularEval accuracy: the mean over seeds, with a 95% bootstrap interval that resamples
  (seed, question) pairs, so it covers both the seed-to-seed and the question-to-question spread; the
  same with a blank image (the text-only baseline, where the run has one), and both per category;
- VQA accuracy, wall-clock, peak memory, tokens/s, training FLOPs per token, achieved TFLOP/s and MFU
  (model FLOPs utilisation against the device's peak, `train/mfu.py`), as means over seeds;
- how many seeds completed, and which failed.

A paired test compares every two cells on the same questions and seeds: the difference of their
per-question correctness, with a paired bootstrap interval and a sign-flip p-value
(`eval.metrics.paired_difference`), overall and within each category (many tests: at p < 0.05 about one
in twenty is "beyond noise" by chance, which the Markdown says). The plot draws the blank-image baseline,
pooled over every cell and seed, as a band. Seed 000's columns (config, trainable params, MMBench accuracy,
wall-clock) come first in the Markdown table so the two read side by side.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from vlmablate.eval.metrics import bootstrap_ci, paired_difference

CSV_COLUMNS = ("cell", "label", "vision", "freeze", "quant", "status", "seeds", "failed_seeds", "trainable_params",
               "trainable_pct", "total_params", "mmbench_circular", "mmbench_ci_low", "mmbench_ci_high",
               "mmbench_vanilla", "mmbench_blank", "vqa_acc", "vqa_blank", "wall_clock_s", "peak_mem_mb",
               "tokens_per_s", "flops_per_token", "tflops", "mfu", "final_loss", "stage1_artifact")


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


def _pooled(runs: list[dict], task: str) -> dict[str | None, list[float]]:
    """Per category (and None: all), the CircularEval correctness of every (seed, question) of `runs`."""
    pooled: dict[str | None, list[float]] = {None: []}
    for run in runs:
        for ok, category in _question_records(run["dir"], task).values():
            pooled[None].append(float(ok))
            pooled.setdefault(category, []).append(float(ok))
    return pooled


SEED_ORDER = ("frozen_frozen", "frozen_lora", "unfrozen_lora", "full")  # seed 000's rows, in its order


def collect(sweep_dir: Path) -> list[dict]:
    """One entry per cell with its runs (in seed order); seed 000's cells first, in its order."""
    cells: dict[str, dict] = {}
    for run_dir in find_runs(sweep_dir):
        run = _read(run_dir)
        name, label = _cell_key(run["summary"], run["config"])
        cell = cells.setdefault(name, {"cell": name, "label": label, "runs": [], "config": run["config"]})
        cell["runs"].append(run)
    for cell in cells.values():
        cell["runs"].sort(key=lambda r: (r["summary"].get("seed") is None, r["summary"].get("seed")))
    rank = {name: k for k, name in enumerate(SEED_ORDER)}
    return sorted(cells.values(), key=lambda c: (rank.get(c["cell"], len(rank)), c["cell"]))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else None


def summarize(cell: dict, *, n_boot: int = 1000) -> dict:
    config = cell["config"]
    done = [r for r in cell["runs"] if r["summary"].get("status") == "completed"]
    failed = [r for r in cell["runs"] if r["summary"].get("status") != "completed"]
    row = {"cell": cell["cell"], "label": cell["label"], "vision": config.get("vision", {}).get("policy"),
           "freeze": config.get("freeze", {}).get("name"), "quant": config.get("quant", {}).get("mode"),
           "seeds": len(done), "failed_seeds": ";".join(str(r["summary"].get("seed")) for r in failed),
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
        row["mmbench_ci_low"], row["mmbench_ci_high"] = bootstrap_ci(pooled[None], n_boot=n_boot)
    if blank[None]:
        row["mmbench_blank"] = float(np.mean(blank[None]))
    row["per_category"] = {c: {"circular": float(np.mean(v)), "blank": _mean(blank.get(c, [])), "n": len(v)}
                           for c, v in sorted(pooled.items(), key=lambda kv: str(kv[0])) if c is not None}
    evals = [r["summary"].get("eval", {}) for r in done]
    row["mmbench_vanilla"] = _mean(e.get("mmbench", {}).get("vanilla_acc") for e in evals)
    row["vqa_acc"] = _mean(e.get("textvqa", {}).get("vqa_acc") for e in evals)
    row["vqa_blank"] = _mean(e.get("vqa_blank_image", {}).get("vqa_acc") for e in evals)
    trains = [r["summary"].get("train", {}) for r in done]
    for key in ("wall_clock_s", "peak_mem_mb", "tokens_per_s", "flops_per_token", "tflops", "mfu", "final_loss"):
        row[key] = _mean(t.get(key) for t in trains)
    stage1 = {((r["summary"].get("lineage") or {}).get("stage1") or {}).get("hash") for r in done} - {None}
    row["stage1_artifact"] = ";".join(sorted(stage1))
    return row


def paired_tests(cells: list[dict], *, n_boot: int = 1000, by_category: bool = False) -> list[dict]:
    """Every pair of cells on the (seed, question) pairs both have: difference, 95% CI, p-value; with
    `by_category`, the same within each category (each test then carries its `category`)."""
    per_cell, categories = {}, {}
    for cell in cells:
        answers = {}
        for run in cell["runs"]:
            if run["summary"].get("status") != "completed":
                continue
            seed = run["summary"].get("seed")
            for q, (ok, category) in _question_records(run["dir"]).items():
                answers[(seed, q)] = ok
                categories[(seed, q)] = category
        if answers:
            per_cell[cell["cell"]] = answers
    groups = sorted({c for c in categories.values() if c is not None}) if by_category else [None]
    tests = []
    names = list(per_cell)
    for category in groups:
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                shared = sorted(k for k in set(per_cell[a]) & set(per_cell[b])
                                if category is None or categories[k] == category)
                if not shared:
                    continue
                index = {key: k for k, key in enumerate(shared)}
                result = paired_difference({index[k]: per_cell[a][k] for k in shared},
                                           {index[k]: per_cell[b][k] for k in shared}, n_boot=n_boot)
                tests.append({"a": a, "b": b, "pairs": len(shared), **result,
                              **({"category": category} if category else {})})
    return tests


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


def to_markdown(rows: list[dict], tests: list[dict], category_tests: list[dict] = ()) -> str:
    lines = ["| Config | Trainable params | MM-Bench circular (95% CI) | Wall-clock (s) | % trainable | VQA acc | "
             "vanilla | blank image: circular | blank image: VQA | peak mem (MB) | tokens/s | FLOPs/token | TFLOP/s | "
             "MFU | seeds | status | stage-1 artifact |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "-" if r.get("mmbench_circular") is None else \
            f"{r['mmbench_circular']:.3f} ({_fmt(r.get('mmbench_ci_low'))}-{_fmt(r.get('mmbench_ci_high'))})"
        status = r["status"] + (f" (failed seeds {r['failed_seeds']})" if r.get("failed_seeds") else "")
        cols = [r["label"], _params(r.get("trainable_params")), acc, _fmt(r.get("wall_clock_s"), 1),
                _fmt(r.get("trainable_pct"), 2), _fmt(r.get("vqa_acc")), _fmt(r.get("mmbench_vanilla")),
                _fmt(r.get("mmbench_blank")), _fmt(r.get("vqa_blank")), _fmt(r.get("peak_mem_mb"), 0),
                _fmt(r.get("tokens_per_s"), 0), _sci(r.get("flops_per_token")),
                _sci(r.get("tflops")), _sci(r.get("mfu")), str(r["seeds"]), status,
                r.get("stage1_artifact") or "-"]
        lines.append("| " + " | ".join(cols) + " |")
    if tests:
        lines += ["", "Paired differences in CircularEval correctness (same seeds and questions):", "",
                  "| a | b | a − b | 95% CI | p | pairs | beyond noise |", "|---|---|---|---|---|---|---|"]
        for t in tests:
            lo, hi = t["ci"]
            beyond = "yes" if t["p_value"] < 0.05 else "no"
            lines.append(f"| {t['a']} | {t['b']} | {t['diff']:+.3f} | {_fmt(lo)} to {_fmt(hi)} | "
                         f"{t['p_value']:.3f} | {t['pairs']} | {beyond} |")
    categories = sorted({c for r in rows for c in r.get("per_category", {})})
    if categories:
        lines += ["", "CircularEval accuracy per category, with the image / with a blank image (seeds pooled):", "",
                  "| category | " + " | ".join(r["label"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
        for c in categories:
            cells = [r.get("per_category", {}).get(c) for r in rows]
            lines.append(f"| {c} | " + " | ".join("-" if x is None else f"{x['circular']:.2f} / {_fmt(x['blank'], 2)}"
                                                  for x in cells) + " |")
    if category_tests:
        beyond = [t for t in category_tests if t["p_value"] < 0.05]
        lines += ["", f"Paired differences per category: {len(beyond)} of {len(category_tests)} tests at p < 0.05 "
                  f"(about {0.05 * len(category_tests):.1f} would be by chance alone):", "",
                  "| category | a | b | a − b | 95% CI | p | pairs |", "|---|---|---|---|---|---|---|"]
        for t in beyond:
            lo, hi = t["ci"]
            lines.append(f"| {t['category']} | {t['a']} | {t['b']} | {t['diff']:+.3f} | {_fmt(lo)} to {_fmt(hi)} | "
                         f"{t['p_value']:.3f} | {t['pairs']} |")
    return "\n".join(lines) + "\n"


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


def write_report(sweep_dir: str | Path, *, n_boot: int = 1000) -> dict:
    """Write comparison.csv / .md / .png into the sweep folder; return the rows and tests."""
    sweep_dir = Path(sweep_dir)
    cells = collect(sweep_dir)
    if not cells:
        raise FileNotFoundError(f"{sweep_dir}: no run directories (folders with summary.json) below it")
    rows = [summarize(cell, n_boot=n_boot) for cell in cells]
    tests = paired_tests(cells, n_boot=n_boot)
    category_tests = paired_tests(cells, n_boot=n_boot, by_category=True)
    done = [r for cell in cells for r in cell["runs"] if r["summary"].get("status") == "completed"]
    blank_pooled = _pooled(done, "mmbench_blank_image")[None]
    blank = (float(np.mean(blank_pooled)), *bootstrap_ci(blank_pooled, n_boot=n_boot)) if blank_pooled else None
    with (sweep_dir / "comparison.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "comparison.md").write_text(to_markdown(rows, tests, category_tests))
    plot(rows, sweep_dir / "comparison.png", blank)
    (sweep_dir / "comparison.json").write_text(json.dumps({"rows": rows, "paired": tests, "paired_by_category":
                                                           category_tests, "blank_band": blank}, indent=2, default=str))
    offline = sorted({str(p) for cell in cells for run in cell["runs"]
                      for p in (run["dir"] / "wandb").glob("offline-run-*")})
    return {"rows": rows, "paired": tests, "paired_by_category": category_tests, "blank_band": blank,
            "wandb_offline": offline}
