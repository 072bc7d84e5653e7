"""The decision a report opens and ends with: for each budget, the cell to pick and why.

The reference freeze table ends with a decision ("on a 4090: frozen vision + LoRA LLM + projector"); so does
the report, and `plan` before any run. A budget is GPU memory (`24`, `24GiB`) or wall-clock per run (`2h`,
`30min`, `90s`). For each budget:

- the cells that fit it. Memory is the peak the runs measured on a GPU (`train.peak_mem_mb`, the mean over
  seeds); where no run measured GPU memory (a CPU run measures its process, not a GPU), plan's estimate for
  the cell, marked as estimated. Wall-clock is the mean over seeds of a run's training time;
- the most accurate of them: MMBench CircularEval accuracy, the report's mean over seeds;
- the pick: the cheapest of them (lowest peak memory, then wall-clock, then trainable parameters) that is
  not beyond noise worse than the most accurate one, by the report's crossed seeds × questions test with
  Holm's correction over the overall table (`compare.paired_tests`);
- a one-line reason.

Where no cell has an accuracy (`plan`, before any run) the cells are ranked by cost alone, and the lines say
so. Retention enters only where it is asked for (`max_retention_loss`): a cell whose retention loss (the
mean loss increase over seeds, larger is more forgetting) is above it, or was not measured, is left out, and
the lines say so. A cell with no completed run, seeds that failed or never ran, and an A/A arm are named.

Pure functions over rows, paired tests and budgets: the report and `plan` do the reading and the writing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

DEFAULT_BUDGETS = ("24GiB", "80GiB")  # one RTX 4090; one A100 or H100
_BUDGET = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(gib|h|min|s)?", re.IGNORECASE)
_SECONDS = {"h": 3600, "min": 60, "s": 1}
_NOT_RUN = ("failed", "invalid")  # row statuses with nothing to decide on


@dataclass(frozen=True)
class Budget:
    """GPU memory in GiB (`kind="memory"`) or wall-clock per run in seconds (`kind="time"`)."""

    kind: str
    limit: float
    label: str  # as the lines print it: "24 GiB", "2 h"


def parse_budget(text) -> Budget:
    """`24`, `24GiB`, `24.5 GiB` (GPU memory) or `2h`, `30min`, `90s` (wall-clock per run)."""
    raw = str(text).strip()
    match = _BUDGET.fullmatch(raw)
    if match is None:
        raise ValueError(f"budget {raw!r} is neither GPU memory in GiB (24, 24GiB) nor wall-clock (2h, 30min, 90s)")
    number, unit = float(match.group(1)), (match.group(2) or "gib").lower()
    if number <= 0:
        raise ValueError(f"budget {raw!r} must be above zero")
    if unit == "gib":
        return Budget("memory", number, f"{number:g} GiB")
    return Budget("time", number * _SECONDS[unit], f"{number:g} {unit}")


def parse_budgets(items: str | Iterable) -> list[Budget]:
    """`"24,80"` or `["24GiB", "2h"]` → budgets, in the order given."""
    items = items.split(",") if isinstance(items, str) else list(items)
    if not items:
        raise ValueError("no budget given: name at least one, e.g. 24GiB or 2h")
    return [parse_budget(item) for item in items]


def parse_max_retention_loss(value) -> Optional[float]:
    """The most retention loss a pick may have: a number >= 0, or none / null (retention not asked)."""
    if value is None or str(value).strip().lower() in ("none", "null", ""):
        return None
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"max_retention_loss={value!r} is not a number") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"max_retention_loss={value!r} must be a finite number >= 0 (a loss increase)")
    return number


# --- one cell's numbers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cell:
    name: str
    label: str
    acc: Optional[float]
    memory: Optional[float]  # GiB
    memory_source: Optional[str]  # measured | estimated
    time: Optional[float]  # seconds
    time_source: Optional[str]
    params: Optional[int]

    def cost(self, kind: str) -> Optional[float]:
        return self.memory if kind == "memory" else self.time

    def source(self, kind: str) -> Optional[str]:
        return self.memory_source if kind == "memory" else self.time_source

    def cheapness(self) -> tuple:
        return tuple(math.inf if v is None else v for v in (self.memory, self.time, self.params))


def measured_on_gpu(row: dict) -> bool:
    """Whether a row's `peak_mem_mb` is GPU memory: every run it pools ran on CUDA (a CPU run measures its
    process)."""
    devices = (row.get("device") or "").split(";")
    return all(d.startswith("cuda") for d in devices) and devices != [""]


def _cell(row: dict) -> _Cell:
    memory, memory_source = None, None
    if row.get("peak_mem_mb") is not None and measured_on_gpu(row):
        memory, memory_source = row["peak_mem_mb"] / 1024, "measured"
    elif row.get("peak_mem_estimated_gib") is not None:
        memory, memory_source = float(row["peak_mem_estimated_gib"]), "estimated"
    time, time_source = None, None
    if row.get("wall_clock_s") is not None:
        time, time_source = float(row["wall_clock_s"]), "measured"
    elif row.get("wall_clock_estimated_s") is not None:
        time, time_source = float(row["wall_clock_estimated_s"]), "estimated"
    return _Cell(row["cell"], row.get("label") or row["cell"], row.get("mmbench_circular"), memory, memory_source,
                 time, time_source, row.get("trainable_params"))


# --- formatting -------------------------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x:.2f} GiB" if x < 10 else f"{x:.1f} GiB"


def duration(seconds: float) -> str:
    """`19.5 d`, `2.0 h`, `30.0 min`, `90.0 s`: as the report and `plan` print a time."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _cost_text(cell: _Cell, kind: str) -> str:
    value = cell.cost(kind)
    return "-" if value is None else _gib(value) if kind == "memory" else duration(value)


def _holm(value: float) -> str:
    return "Holm p < 0.001" if value < 0.001 else f"Holm p = {value:.3f}"


def _seeds(text: str) -> list[str]:
    return [s for s in (text or "").split(";") if s and s != "None"]


def _seed_list(seeds: list[str]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(seeds)


def _costs_more(a: _Cell, b: _Cell) -> str:
    """How `a` costs more than `b`: the first of memory, wall-clock, trainable parameters that differs."""
    for value_a, value_b, show in ((a.memory, b.memory, _gib), (a.time, b.time, duration),
                                   (a.params, b.params, lambda n: f"{_count(n)} trainable parameters")):
        if value_a is not None and value_b is not None and show(value_a) != show(value_b):
            return f"costs more ({show(value_a)} against {show(value_b)})"
    return "costs the same"


# --- the decision -----------------------------------------------------------------------------------------------


def _versus(tests: dict, x: str, y: str) -> Optional[dict]:
    """The overall paired test of cells x and y, as x − y; None when the report has none."""
    if (x, y) in tests:
        return tests[(x, y)]
    t = tests.get((y, x))
    return None if t is None else {**t, "diff": -t["diff"]}


def _test_text(t: dict) -> str:
    one_seed = "" if t.get("training_noise", True) else ", one seed: training noise unmeasured"
    return f"{t['diff']:+.3f}, {_holm(t['p_holm'])}{one_seed}"


def _worse_beyond_noise(t: dict) -> bool:
    """`t` is best − cell: the cell is beyond noise worse."""
    return bool(t["beyond_noise"]) and t["diff"] > 0


def _by_accuracy(budget: Budget, fits: list[_Cell], over: list[_Cell], tests: dict) -> tuple[_Cell, _Cell, list]:
    """(the most accurate cell that fits, the pick, the reason's clauses); `over`: the cells that do not fit,
    named where they are more accurate than the pick."""
    ordered = sorted(fits, key=_Cell.cheapness)
    best = max(ordered, key=lambda c: c.acc)  # the first of equals: the cheaper
    passed, pick, pick_test = [], None, None
    for cell in ordered:
        if cell is best:
            pick = best
            break
        t = _versus(tests, best.name, cell.name)
        if t is not None and not _worse_beyond_noise(t):
            pick, pick_test = cell, t
            break
        passed.append((cell, t))
    than = "" if pick is best else f" than {best.label}"  # the clauses below compare with the most accurate
    if pick is best:
        clauses = ["the only cell that fits" if len(fits) == 1 else "the most accurate and the cheapest that fits"
                   if not passed else "the most accurate that fits"]
    else:
        clauses = [f"{best.label} is the most accurate that fits ({best.acc:.3f}) but not beyond noise better "
                   f"({_test_text(pick_test)}) and {_costs_more(best, pick)}"]
    clauses += [f"{cell.label} is cheaper but has no paired test with {best.label}" if t is None else
                f"{cell.label} is cheaper but beyond noise worse{than} ({_test_text({**t, 'diff': -t['diff']})})"
                for cell, t in passed]
    for cell in sorted(over, key=lambda c: -c.acc):
        if cell.acc <= pick.acc:
            continue
        t = _versus(tests, cell.name, pick.name)
        verdict = "has no paired test with it" if t is None else \
            f"is {'' if t['beyond_noise'] and t['diff'] > 0 else 'not '}beyond noise better ({_test_text(t)})"
        clauses.append(f"{cell.label} ({cell.acc:.3f}) {verdict} and does not fit ({_cost_text(cell, budget.kind)})")
    return best, pick, clauses


def _by_cost(budget: Budget, fits: list[_Cell]) -> tuple[_Cell, list[str]]:
    """(the cheapest cell that fits, the reason's clauses): accuracy is unknown."""
    ordered = sorted(fits, key=_Cell.cheapness)
    clauses = [f"the cheapest that fits ({_cost_text(ordered[0], budget.kind)})"]
    if len(ordered) > 1:
        clauses.append("then " + ", ".join(f"{c.label} ({_cost_text(c, budget.kind)})" for c in ordered[1:]))
    return ordered[0], clauses


def _budget_label(budget: Budget, considered: list[_Cell]) -> str:
    estimated = [c.label for c in considered if c.source(budget.kind) == "estimated"]
    what = "memory" if budget.kind == "memory" else "wall-clock"
    if not estimated:
        return budget.label
    if len(estimated) == len(considered):
        return f"{budget.label} (estimated {what})"
    return f"{budget.label} ({what} estimated for {', '.join(estimated)})"


UNCHECKED = {"memory": "no GPU memory measured and no estimate", "time": "no wall-clock measured or estimated"}


def _decide_budget(budget: Budget, cells: list[_Cell], tests: dict, *, by_accuracy: bool,
                   retention: Optional[str] = None) -> dict:
    """One budget's decision: which cells fit, the most accurate, the pick, and the line that says why."""
    kind = budget.kind
    fits = [c for c in cells if c.cost(kind) is not None and c.cost(kind) <= budget.limit]
    over = [c for c in cells if c.cost(kind) is not None and c.cost(kind) > budget.limit]
    unchecked = [c for c in cells if c.cost(kind) is None]
    label, best, pick = _budget_label(budget, fits + over), None, None
    if fits and by_accuracy:
        best, pick, clauses = _by_accuracy(budget, fits, over, tests)
        line = f"{label}: {pick.label} — {pick.acc:.3f}; " + "; ".join(clauses)
    elif fits:
        pick, clauses = _by_cost(budget, fits)
        clauses += [", ".join(f"{c.label} does not fit ({_cost_text(c, kind)})" for c in over)] if over else []
        line = f"{label}: {pick.label} — " + "; ".join(clauses)
    elif over:
        cheapest = min(over, key=lambda c: c.cost(kind))
        line = f"{label}: no cell fits; the cheapest is {cheapest.label} ({_cost_text(cheapest, kind)})"
    else:
        line = f"{label}: " + ("no cell can be checked against this budget" if cells else "no cell left to decide on")
    if unchecked:
        line += f"; cannot be checked ({UNCHECKED[kind]}): " + ", ".join(c.label for c in unchecked)
    if retention:
        line += "; " + retention
    return {"budget": budget.label, "kind": kind, "limit": budget.limit, "pick": pick.name if pick else None,
            "accuracy": pick.acc if pick else None, "most_accurate": best.name if best else None,
            "fits": [c.name for c in sorted(fits, key=_Cell.cheapness)], "does_not_fit": [c.name for c in over],
            "unchecked": [c.name for c in unchecked],
            "estimated": [c.name for c in fits + over if c.source(kind) == "estimated"], "line": line}


def _missing_notes(rows: list[dict], twins: dict, grid: Sequence[str]) -> list[str]:
    """Cells without a completed run, seeds that failed or never ran, A/A arms, and cells of the grid not run."""
    notes = []
    names = {r["cell"] for r in rows}
    absent = [c for c in grid if c not in names]
    if absent:
        notes.append(f"not in this sweep: {', '.join(absent)} (cells of the reference freeze table)")
    ran = {s for r in rows if r["cell"] not in twins
           for s in _seeds(r.get("completed_seeds")) + _seeds(r.get("failed_seeds"))}
    for r in rows:
        label = r.get("label") or r["cell"]
        failed, done = _seeds(r.get("failed_seeds")), _seeds(r.get("completed_seeds"))
        if r.get("status") == "invalid":
            notes.append(f"{label}: invalid ({r.get('error', '')}); left out")
        elif r.get("status") == "failed":
            error = f": {r['error']}" if r.get("error") else ""
            runs = f" ({_seed_list(failed)} failed{error})" if failed else ""
            notes.append(f"{label}: no completed run{runs}; left out")
        elif failed:
            notes.append(f"{label}: {_seed_list(failed)} failed; its numbers are over {_seed_list(done)}")
        never = sorted(ran - set(done) - set(failed), key=lambda s: (len(s), s))
        if r["cell"] not in twins and never and r.get("status") not in _NOT_RUN:
            notes.append(f"{label}: no run for {_seed_list(never)}, which other cells ran")
        if r["cell"] in twins:
            notes.append(f"{label}: an A/A arm of {twins[r['cell']]} (its config under another name); left out")
    return notes


def _retention(rows: list[dict], max_loss: Optional[float]) -> tuple[set, Optional[str]]:
    """(cells left out by retention, the clause every line carries); nothing where retention is not asked."""
    if max_loss is None:
        return set(), None
    out = {}
    for r in rows:
        loss = r.get("retention_loss")
        if loss is None or (isinstance(loss, float) and math.isnan(loss)):
            out[r["cell"]] = f"{r.get('label') or r['cell']} (retention not measured)"
        elif loss > max_loss:
            out[r["cell"]] = f"{r.get('label') or r['cell']} (retention loss {loss:.3f})"
    clause = f"retention loss at most {max_loss:g} asked: " + \
        (f"left out {', '.join(out.values())}" if out else "every cell is within it")
    return set(out), clause


def decide(rows: list[dict], tests: list[dict], budgets: Sequence[Budget], *,
           max_retention_loss: Optional[float] = None, twins: Optional[dict] = None,
           grid: Sequence[str] = ()) -> dict:
    """The decision for every budget over the report's `rows` and overall paired `tests`.

    `twins`: A/A arm -> the cell it repeats (left out). `grid`: the cells the sweep was meant to hold (those
    absent are named). Rows carry `mmbench_circular`, `peak_mem_mb` with `device` or `peak_mem_estimated_gib`,
    `wall_clock_s` or `wall_clock_estimated_s`, `trainable_params`, and optionally `retention_loss`.
    """
    twins = twins or {}
    by_pair = {(t["a"], t["b"]): t for t in tests if t.get("category") is None}
    live = [r for r in rows if r.get("status") not in _NOT_RUN and r["cell"] not in twins]
    left_out, retention = _retention(live, max_retention_loss)
    by_accuracy = any(r.get("mmbench_circular") is not None for r in live)
    cells = [_cell(r) for r in live if r["cell"] not in left_out]
    notes = _missing_notes(rows, twins, grid)
    if by_accuracy:
        notes += [f"{c.label}: no MMBench accuracy; left out" for c in cells if c.acc is None]
        cells = [c for c in cells if c.acc is not None]
    decisions = [_decide_budget(b, cells, by_pair, by_accuracy=by_accuracy, retention=retention) for b in budgets]
    return {"ranked_by": "accuracy" if by_accuracy else "cost", "max_retention_loss": max_retention_loss,
            "budgets": decisions, "notes": notes, "lines": [d["line"] for d in decisions]}


# --- as text ----------------------------------------------------------------------------------------------------

HOW = ("for each budget, the most accurate cell that fits, then the pick: the cheapest cell that fits and is not "
       "beyond noise worse than it (the crossed seeds × questions test, Holm over the overall paired table); "
       "cheapest: lowest peak GPU memory, then wall-clock per run, then trainable parameters")
BY_COST = "accuracy unknown, so the cells that fit are ranked by cost alone"
ESTIMATED = "estimated memory: plan's estimate for the cell's config, where its runs measured no GPU memory"


def _how(decision: dict) -> str:
    how = HOW if decision["ranked_by"] == "accuracy" else BY_COST
    return how + ("; " + ESTIMATED if any(d["kind"] == "memory" and d["estimated"] for d in decision["budgets"])
                  else "")


def decision_text(decision: dict, title: Optional[str] = None) -> str:
    """The decision as console lines: a title, one line per budget, then what was left out or is incomplete."""
    lines = [title or f"decision per budget ({_how(decision)}):", *(f"  {line}" for line in decision["lines"])]
    if decision["notes"]:
        lines += ["left out or incomplete:", *(f"  {note}" for note in decision["notes"])]
    return "\n".join(lines)


def decision_markdown(decision: dict) -> str:
    how = _how(decision)
    lines = ["## Decision per budget", "", how[0].upper() + how[1:] + ".", "",
             *(f"- {line}" for line in decision["lines"])]
    if decision["notes"]:
        lines += ["", "Left out or incomplete:", "", *(f"- {note}" for note in decision["notes"])]
    return "\n".join(lines) + "\n"
