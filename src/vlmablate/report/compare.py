"""The comparison of a sweep's cells: one row per cell, seeds pooled, written as CSV, Markdown and a plot.

A cell is what a run trained (its `cell` name, else vision policy + freeze option + quantization); the
runs of a cell differ only in their seed. For each cell:

- trainable parameters (and % of total) and the stage-1 artifact it started from;
- MMBench CircularEval accuracy: the mean over seeds, with a 95% bootstrap interval that resamples
  (seed, question) pairs, so it covers both the seed-to-seed and the question-to-question spread;
- VQA accuracy, wall-clock, peak memory, tokens/s, training FLOPs per token, achieved TFLOP/s and MFU
  (model FLOPs utilisation against the device's peak, `train/mfu.py`), as means over seeds;
- how many seeds completed, and which failed.

A paired test compares every two cells on the same questions and seeds: the difference of their
per-question correctness, with a paired bootstrap interval and a sign-flip p-value
(`eval.metrics.paired_difference`). Seed 000's columns (config, trainable params, MMBench accuracy,
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
               "mmbench_vanilla", "vqa_acc", "wall_clock_s", "peak_mem_mb", "tokens_per_s", "flops_per_token",
               "tflops", "mfu", "final_loss", "stage1_artifact")


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


def _question_correctness(run_dir: Path) -> dict[int, bool]:
    """Question -> CircularEval correctness (every circular copy right), from the run's predictions."""
    path = run_dir / "eval" / "mmbench" / "predictions.jsonl"
    if not path.exists():
        return {}
    right: dict[int, bool] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        right[row["q"]] = right.get(row["q"], True) and bool(row["correct"])
    return right


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
    correctness = [_question_correctness(r["dir"]) for r in done]
    pooled = [float(v) for per_seed in correctness for v in per_seed.values()]
    if pooled:
        row["mmbench_circular"] = float(np.mean(pooled))
        row["mmbench_ci_low"], row["mmbench_ci_high"] = bootstrap_ci(pooled, n_boot=n_boot)
    evals = [r["summary"].get("eval", {}) for r in done]
    row["mmbench_vanilla"] = _mean(e.get("mmbench", {}).get("vanilla_acc") for e in evals)
    row["vqa_acc"] = _mean(e.get("textvqa", {}).get("vqa_acc") for e in evals)
    trains = [r["summary"].get("train", {}) for r in done]
    for key in ("wall_clock_s", "peak_mem_mb", "tokens_per_s", "flops_per_token", "tflops", "mfu", "final_loss"):
        row[key] = _mean(t.get(key) for t in trains)
    stage1 = {((r["summary"].get("lineage") or {}).get("stage1") or {}).get("hash") for r in done} - {None}
    row["stage1_artifact"] = ";".join(sorted(stage1))
    return row


def paired_tests(cells: list[dict], *, n_boot: int = 1000) -> list[dict]:
    """Every pair of cells on the (seed, question) pairs both have: difference, 95% CI, p-value."""
    per_cell = {}
    for cell in cells:
        answers = {}
        for run in cell["runs"]:
            if run["summary"].get("status") != "completed":
                continue
            seed = run["summary"].get("seed")
            for q, ok in _question_correctness(run["dir"]).items():
                answers[(seed, q)] = ok
        if answers:
            per_cell[cell["cell"]] = answers
    tests = []
    names = list(per_cell)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(per_cell[a]) & set(per_cell[b]))
            if not shared:
                continue
            index = {key: k for k, key in enumerate(shared)}
            result = paired_difference({index[k]: per_cell[a][k] for k in shared},
                                       {index[k]: per_cell[b][k] for k in shared}, n_boot=n_boot)
            tests.append({"a": a, "b": b, "pairs": len(shared), **result})
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


def to_markdown(rows: list[dict], tests: list[dict]) -> str:
    lines = ["| Config | Trainable params | MM-Bench circular (95% CI) | Wall-clock (s) | % trainable | VQA acc | "
             "vanilla | peak mem (MB) | tokens/s | FLOPs/token | TFLOP/s | MFU | seeds | status | stage-1 artifact |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "-" if r.get("mmbench_circular") is None else \
            f"{r['mmbench_circular']:.3f} ({_fmt(r.get('mmbench_ci_low'))}-{_fmt(r.get('mmbench_ci_high'))})"
        status = r["status"] + (f" (failed seeds {r['failed_seeds']})" if r.get("failed_seeds") else "")
        cols = [r["label"], _params(r.get("trainable_params")), acc, _fmt(r.get("wall_clock_s"), 1),
                _fmt(r.get("trainable_pct"), 2), _fmt(r.get("vqa_acc")), _fmt(r.get("mmbench_vanilla")),
                _fmt(r.get("peak_mem_mb"), 0), _fmt(r.get("tokens_per_s"), 0), _sci(r.get("flops_per_token")),
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
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
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
    with (sweep_dir / "comparison.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "comparison.md").write_text(to_markdown(rows, tests))
    plot(rows, sweep_dir / "comparison.png")
    (sweep_dir / "comparison.json").write_text(json.dumps({"rows": rows, "paired": tests}, indent=2, default=str))
    offline = sorted({str(p) for cell in cells for run in cell["runs"]
                      for p in (run["dir"] / "wandb").glob("offline-run-*")})
    return {"rows": rows, "paired": tests, "wandb_offline": offline}
