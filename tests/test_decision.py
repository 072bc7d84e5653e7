"""The decision per budget (report/decision.py): on crafted rows and paired tests, on crafted sweep folders
through the report, its callback and W&B, and on plan's estimates for the 7B preset; budgets parsed."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import yaml
from conftest import CONF, compose_run

from vlmablate.report.decision import Budget, decide, decision_text, parse_budgets, parse_max_retention_loss

GIB = 1024  # MB


def row(cell: str, label: str, acc: float | None, mem_gib: float, wall_s: float, params: int, **extra) -> dict:
    """A report row measured on a GPU, as `compare.summarize` writes it."""
    return {"cell": cell, "label": label, "mmbench_circular": acc, "peak_mem_mb": mem_gib * GIB, "device": "cuda:0",
            "wall_clock_s": wall_s, "trainable_params": params, "status": "completed", "seeds": 3,
            "completed_seeds": "0;1;2", "failed_seeds": "", **extra}


def paired(a: str, b: str, diff: float, p_holm: float, beyond: bool, training_noise: bool = True) -> dict:
    """An overall paired test as `compare.paired_tests` returns it (a − b)."""
    return {"a": a, "b": b, "diff": diff, "p_value": p_holm / 3, "p_holm": p_holm, "beyond_noise": beyond,
            "training_noise": training_noise}

FULL = "full fine-tuning"
LORA = "frozen vision + LoRA LLM + projector"
FROZEN = "frozen vision + frozen LLM + projector"


def grid_rows(**extra) -> list[dict]:
    return [row("full", FULL, 0.600, 40, 3600, 7_000_000_000, **extra.get("full", {})),
            row("lora", LORA, 0.531, 16, 1800, 60_000_000, **extra.get("lora", {})),
            row("frozen", FROZEN, 0.450, 15, 1200, 20_000_000, **extra.get("frozen", {}))]


TIE = [paired("full", "lora", 0.069, 0.12, False), paired("full", "frozen", 0.15, 0.003, True),
       paired("lora", "frozen", 0.081, 0.01, True)]


# --- budgets ------------------------------------------------------------------------------------------------------


def test_budgets_parse_memory_and_wall_clock():
    assert parse_budgets("24,80GiB, 24.5 GiB,2h,30min,90s") == [
        Budget("memory", 24.0, "24 GiB"), Budget("memory", 80.0, "80 GiB"), Budget("memory", 24.5, "24.5 GiB"),
        Budget("time", 7200.0, "2 h"), Budget("time", 1800.0, "30 min"), Budget("time", 90.0, "90 s")]
    assert parse_budgets([24, "80gib"]) == [Budget("memory", 24.0, "24 GiB"), Budget("memory", 80.0, "80 GiB")]
    with pytest.raises(ValueError, match=r"^budget '24XB' is neither GPU memory in GiB \(24, 24GiB\) nor wall-clock"):
        parse_budgets("24,24XB")
    with pytest.raises(ValueError, match=r"^budget '0h' must be above zero$"):
        parse_budgets(["0h"])
    with pytest.raises(ValueError, match="no budget given"):
        parse_budgets([])
    assert parse_max_retention_loss("0.05") == 0.05 and parse_max_retention_loss("none") is None
    assert parse_max_retention_loss(None) is None
    with pytest.raises(ValueError, match=r"^max_retention_loss='-0.1' must be a finite number >= 0"):
        parse_max_retention_loss("-0.1")
    with pytest.raises(ValueError, match=r"^max_retention_loss='lots' is not a number$"):
        parse_max_retention_loss("lots")


def test_the_report_command_and_the_config_reject_a_bad_budget_by_name():
    from vlmablate.config import ConfigError, validate
    from vlmablate.report.__main__ import parse

    args = parse(["sweep_dir=grid", "budgets=24,2h", "max_retention_loss=0.05"])
    assert args["budgets"] == [Budget("memory", 24.0, "24 GiB"), Budget("time", 7200.0, "2 h")]
    assert args["max_retention_loss"] == 0.05
    with pytest.raises(SystemExit, match=r"^budget '24XB' is neither GPU memory"):
        parse(["sweep_dir=grid", "budgets=24XB"])
    with pytest.raises(SystemExit, match=r"^max_retention_loss='x' is not a number"):
        parse(["sweep_dir=grid", "max_retention_loss=x"])
    cfg, _ = compose_run("report.budgets=[24,2h]", "report.max_retention_loss=0.05")
    validate(cfg)
    with pytest.raises(ConfigError, match=r"^report: budget '24XB' is neither GPU memory"):
        validate(compose_run("report.budgets=[24,24XB]")[0])


def test_the_report_settings_leave_the_config_hash_alone():
    from vlmablate.config import config_hash
    from vlmablate.train.stages import learning_config

    _, base = compose_run("cell=frozen_lora")
    _, other = compose_run("cell=frozen_lora", "report.budgets=[2h]", "report.max_retention_loss=0.1")
    assert config_hash(learning_config(base)) == config_hash(learning_config(other))
    assert "report" not in learning_config(base)  # absent: the hashes made before the key existed stand


def test_the_report_settings_do_not_split_an_aa_arm_from_its_cell():
    from vlmablate.report.compare import _same_training

    cell = {"vision": {"policy": "frozen"}, "train": {"seed": 0}, "cell": {"name": "frozen_lora"},
            "report": {"budgets": ["24GiB"]}}
    arm = {**cell, "train": {"seed": 3}, "cell": {"name": "frozen_lora_aa"}, "report": {"budgets": ["2h"]}}
    assert _same_training({"config": cell}, {"config": arm})
    assert not _same_training({"config": cell}, {"config": {**arm, "vision": {"policy": "unfrozen"}}})


# --- the decision on crafted rows ------------------------------------------------------------------------------------


def test_a_budget_excludes_a_cell():
    d = decide(grid_rows(), TIE, parse_budgets("24,30min"))
    assert [(b["budget"], b["pick"], b["most_accurate"], b["fits"], b["does_not_fit"]) for b in d["budgets"]] == [
        ("24 GiB", "lora", "lora", ["frozen", "lora"], ["full"]),
        ("30 min", "lora", "lora", ["frozen", "lora"], ["full"])]
    assert d["lines"][0] == (
        "24 GiB: frozen vision + LoRA LLM + projector — 0.531; the most accurate that fits; frozen vision + frozen "
        "LLM + projector is cheaper but beyond noise worse (-0.081, Holm p = 0.010); full fine-tuning (0.600) is not "
        "beyond noise better (+0.069, Holm p = 0.120) and does not fit (40.0 GiB)")
    assert d["lines"][1].endswith("and does not fit (1.0 h)") and d["notes"] == []


def test_a_tie_within_noise_picks_the_cheaper_cell():
    d = decide(grid_rows(), TIE, parse_budgets("80"))
    (b,) = d["budgets"]
    assert (b["pick"], b["most_accurate"], b["accuracy"]) == ("lora", "full", 0.531)
    assert b["line"] == (
        "80 GiB: frozen vision + LoRA LLM + projector — 0.531; full fine-tuning is the most accurate that fits (0.600) "
        "but not beyond noise better (+0.069, Holm p = 0.120) and costs more (40.0 GiB against 16.0 GiB); frozen "
        "vision + frozen LLM + projector is cheaper but beyond noise worse than full fine-tuning (-0.150, Holm p = "
        "0.003)")
    # one seed cannot measure training noise: the line says why nothing is beyond noise
    one_seed = [paired("full", "lora", 0.069, 0.12, False, training_noise=False), *TIE[1:]]
    assert "(+0.069, Holm p = 0.120, one seed: training noise unmeasured)" in \
        decide(grid_rows(), one_seed, parse_budgets("80"))["lines"][0]


def test_a_real_difference_picks_the_better_cell():
    real = [paired("full", "lora", 0.069, 0.01, True), *TIE[1:]]
    (b,) = decide(grid_rows(), real, parse_budgets("80GiB"))["budgets"]
    assert (b["pick"], b["most_accurate"]) == ("full", "full")
    assert b["line"] == (
        "80 GiB: full fine-tuning — 0.600; the most accurate that fits; frozen vision + frozen LLM + projector is "
        "cheaper but beyond noise worse (-0.150, Holm p = 0.003); frozen vision + LoRA LLM + projector is cheaper "
        "but beyond noise worse (-0.069, Holm p = 0.010)")
    # the same difference read backwards (the report may list the pair either way round)
    flipped = [paired("lora", "full", -0.069, 0.01, True), *TIE[1:]]
    assert decide(grid_rows(), flipped, parse_budgets("80"))["lines"] == [b["line"]]


def test_missing_cells_failed_seeds_and_aa_arms_are_named():
    rows = [row("frozen_frozen", FROZEN, 0.45, 15, 1200, 20_000_000, completed_seeds="0;1"),
            row("frozen_lora", LORA, 0.53, 16, 1800, 60_000_000, completed_seeds="0;2", failed_seeds="1",
                status="partial"),
            {"cell": "full", "label": FULL, "status": "failed", "seeds": 0, "failed_seeds": "0;1;2",
             "completed_seeds": "", "error": "CUDA out of memory"},
            row("frozen_lora_aa", LORA + " (A/A)", 0.52, 16, 1800, 60_000_000, completed_seeds="3;4;5")]
    tests = [paired("frozen_lora", "frozen_frozen", 0.08, 0.02, True)]
    d = decide(rows, tests, parse_budgets("24"), twins={"frozen_lora_aa": "frozen_lora"},
               grid=("frozen_frozen", "frozen_lora", "unfrozen_lora", "full"))
    assert d["notes"] == [
        "not in this sweep: unfrozen_lora (cells of the reference freeze table)",
        "frozen vision + frozen LLM + projector: no run for seed 2, which other cells ran",
        "frozen vision + LoRA LLM + projector: seed 1 failed; its numbers are over seeds 0, 2",
        "full fine-tuning: no completed run (seeds 0, 1, 2 failed: CUDA out of memory); left out",
        "frozen vision + LoRA LLM + projector (A/A): an A/A arm of frozen_lora (its config under another name); "
        "left out"]
    assert d["budgets"][0]["fits"] == ["frozen_frozen", "frozen_lora"]  # neither the failed cell nor the A/A arm
    text = decision_text(d)
    assert text.splitlines()[-6:] == ["left out or incomplete:", *(f"  {note}" for note in d["notes"])]


def test_retention_enters_only_where_asked():
    rows = grid_rows(full={"retention_loss": 0.08}, frozen={"retention_loss": 0.01})  # lora: not measured
    d = decide(rows, TIE, parse_budgets("80"), max_retention_loss=0.05)
    assert d["budgets"][0]["pick"] == "frozen" and d["max_retention_loss"] == 0.05
    assert d["lines"] == [
        "80 GiB: frozen vision + frozen LLM + projector — 0.450; the only cell that fits; retention loss at most "
        "0.05 asked: left out full fine-tuning (retention loss 0.080), frozen vision + LoRA LLM + projector "
        "(retention not measured)"]
    within = decide(rows, TIE, parse_budgets("80"), max_retention_loss=0.1)  # full is back; lora still unmeasured
    assert within["budgets"][0]["pick"] == "full"
    assert within["lines"][0].endswith("; retention loss at most 0.1 asked: left out frozen vision + LoRA LLM + "
                                       "projector (retention not measured)")
    unasked = decide(rows, TIE, parse_budgets("80"))
    assert unasked["budgets"][0]["pick"] == "lora" and "retention" not in unasked["lines"][0]


def test_memory_without_a_gpu_is_estimated_or_cannot_be_checked():
    cpu = {"device": "cpu", "peak_mem_mb": 1300.0}  # a CPU run's peak is its process, not a GPU
    rows = grid_rows(full={**cpu, "peak_mem_estimated_gib": 1.16}, lora={**cpu, "peak_mem_estimated_gib": 1.14},
                     frozen=cpu)
    (b,) = decide(rows, TIE, parse_budgets("24"))["budgets"]
    assert (b["pick"], b["estimated"], b["unchecked"]) == ("lora", ["full", "lora"], ["frozen"])
    assert b["line"] == (
        "24 GiB (estimated memory): frozen vision + LoRA LLM + projector — 0.531; full fine-tuning is the most "
        "accurate that fits (0.600) but not beyond noise better (+0.069, Holm p = 0.120) and costs more (1.16 GiB "
        "against 1.14 GiB); cannot be checked (no GPU memory measured and no estimate): frozen vision + frozen LLM "
        "+ projector")
    # an estimate beside measurements ranks as it stands, and the line says which cells it is for
    mixed = grid_rows(full={**cpu, "peak_mem_estimated_gib": 1.16})
    assert decide(mixed, TIE, parse_budgets("80"))["lines"] == [
        "80 GiB (memory estimated for full fine-tuning): full fine-tuning — 0.600; the most accurate and the cheapest "
        "that fits"]


# --- through the report ---------------------------------------------------------------------------------------------


def fake_run(folder: Path, cell: str, seed: int, correct: list[bool] | None, *, mem_mb: float = 0.0,
             device: str = "cuda:0", error: str | None = None, config: dict | None = None) -> None:
    """One run folder: completed with MMBench predictions (one copy a question), or failed with `error`."""
    run = folder / cell / f"seed{seed}"
    run.mkdir(parents=True)
    summary = {"status": "failed" if correct is None else "completed", "seed": seed,
               "cell": {"name": cell, "label": cell.upper()}}
    if correct is None:
        summary["error"] = error
    else:
        (run / "eval" / "mmbench").mkdir(parents=True)
        rows = [{"q": q, "copy": 0, "correct": ok} for q, ok in enumerate(correct)]
        (run / "eval" / "mmbench" / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        summary["train"] = {"wall_clock_s": 100.0, "peak_mem_mb": mem_mb}
        summary["determinism"] = {"device": device}
    if config is not None:
        (run / ".hydra").mkdir()
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "summary.json").write_text(json.dumps(summary))


def crafted_sweep(folder: Path, device: str = "cuda:0") -> None:
    """frozen_frozen wrong on every question (seeds 0, 1), frozen_lora right (0, 1, 2), unfrozen_lora out of memory,
    full right on seed 0 and failed on seed 1."""
    for seed in (0, 1):
        fake_run(folder, "frozen_frozen", seed, [False] * 20, mem_mb=8 * GIB, device=device)
    for seed in (0, 1, 2):
        fake_run(folder, "frozen_lora", seed, [True] * 20, mem_mb=10 * GIB, device=device)
    fake_run(folder, "unfrozen_lora", 0, None, error="CUDA out of memory")
    fake_run(folder, "full", 0, [True] * 20, mem_mb=30 * GIB, device=device)
    fake_run(folder, "full", 1, None, error="killed")


CRAFTED_NOTES = ["FROZEN_FROZEN: no run for seed 2, which other cells ran",
                 "UNFROZEN_LORA: no completed run (seed 0 failed: CUDA out of memory); left out",
                 "FULL: seed 1 failed; its numbers are over seed 0",
                 "FULL: no run for seed 2, which other cells ran"]


def test_the_report_opens_and_the_console_ends_with_the_decision(tmp_path, capsys):
    from vlmablate.report.__main__ import main

    crafted_sweep(tmp_path)
    main([f"sweep_dir={tmp_path}", "budgets=24,80GiB", "n_boot=50"])
    result = json.loads((tmp_path / "comparison.json").read_text())
    decision = result["decision"]
    assert decision["lines"] == [
        f"{budget}: FROZEN_LORA — 1.000; the most accurate that fits; FROZEN_FROZEN is cheaper but beyond noise "
        "worse (-1.000, Holm p < 0.001)" for budget in ("24 GiB", "80 GiB")]
    assert [b["fits"] for b in decision["budgets"]] == [["frozen_frozen", "frozen_lora"],
                                                        ["frozen_frozen", "frozen_lora", "full"]]
    assert decision["notes"] == CRAFTED_NOTES
    markdown = (tmp_path / "comparison.md").read_text()
    assert markdown.startswith("# Comparison of the sweep's cells\n\n## Decision per budget\n\nFor each budget, ")
    head = markdown.split("## The cells\n\n")[0].splitlines()
    assert head[6:8] == [f"- {line}" for line in decision["lines"]]
    assert head[-5:-1] == [f"- {note}" for note in CRAFTED_NOTES]
    assert markdown.split("## The cells\n\n")[1].startswith("| Config | Trainable params |")
    printed = capsys.readouterr().out.rstrip("\n").splitlines()
    assert printed[-7:] == ["  " + decision["lines"][0], "  " + decision["lines"][1], "left out or incomplete:",
                            *(f"  {note}" for note in CRAFTED_NOTES)]


def test_cpu_runs_without_a_config_cannot_be_checked_against_memory(tmp_path):
    from vlmablate.report.compare import write_report

    crafted_sweep(tmp_path, device="cpu")
    decision = write_report(tmp_path, n_boot=50, settings={"budgets": parse_budgets("24")})["decision"]
    assert decision["lines"] == ["24 GiB: no cell can be checked against this budget; cannot be checked (no GPU "
                                 "memory measured and no estimate): FROZEN_FROZEN, FROZEN_LORA, FULL"]


def test_cpu_runs_are_decided_on_plans_estimate(tmp_path):
    from vlmablate.plan import plan_cell
    from vlmablate.report.compare import write_report

    cfg, composed = compose_run("cell=frozen_lora", "report.budgets=[1GiB,2GiB]")
    for seed in (0, 1):
        fake_run(tmp_path, "frozen_lora", seed, [True] * 10 + [False] * 10, mem_mb=1300.0, device="cpu",
                 config=composed)
    result = write_report(tmp_path, n_boot=50)  # budgets from the runs' report block
    estimate = plan_cell(cfg)["memory_gib"]["total"]
    assert result["rows"][0]["peak_mem_estimated_gib"] == estimate and 1 < estimate < 2
    assert result["decision"]["lines"] == [
        f"1 GiB (estimated memory): no cell fits; the cheapest is FROZEN_LORA ({estimate:.2f} GiB)",
        "2 GiB (estimated memory): FROZEN_LORA — 0.500; the only cell that fits"]
    assert result["decision"]["notes"] == ["not in this sweep: frozen_frozen, unfrozen_lora, full (cells of the "
                                           "reference freeze table)"]


def test_the_callback_decides_on_the_sweeps_report_block(tmp_path, capsys):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from vlmablate.report.callback import ReportCallback, report_settings

    sweeps = Path(__file__).resolve().parents[1] / "sweeps"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(sweeps), version_base="1.3"):
        cfg = compose(config_name="freeze_grid", overrides=[f"hydra.searchpath=[file://{CONF}]",
                                                            "report.budgets=[20,2h]", "report.max_retention_loss=0.1"],
                      return_hydra_config=True)
        default = compose(config_name="freeze_grid", overrides=[f"hydra.searchpath=[file://{CONF}]"])
    GlobalHydra.instance().clear()
    assert report_settings(cfg) == {"budgets": [Budget("memory", 20.0, "20 GiB"), Budget("time", 7200.0, "2 h")],
                                    "max_retention_loss": 0.1}
    assert report_settings(default) == {"budgets": parse_budgets("24,80"), "max_retention_loss": None}
    crafted_sweep(tmp_path)
    sweep = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}, "report": {"budgets": ["9GiB"]},
                              "logger": {"name": "none"}})
    ReportCallback().on_multirun_end(sweep)
    decision = json.loads((tmp_path / "comparison.json").read_text())["decision"]
    assert decision["lines"] == [
        "9 GiB: FROZEN_FROZEN — 0.000; the only cell that fits; FROZEN_LORA (1.000) is beyond noise better (+1.000, "
        "Holm p < 0.001) and does not fit (10.0 GiB); FULL (1.000) is not beyond noise better (+1.000, Holm p < "
        "0.001, one seed: training noise unmeasured) and does not fit (30.0 GiB)"]
    assert capsys.readouterr().out.rstrip("\n").splitlines()[-6] == "  " + decision["lines"][0]


def test_the_decision_goes_to_the_sweeps_wandb_group(tmp_path, monkeypatch):
    from vlmablate.report.wandb_log import log_decision

    runs = []

    class Table:
        def __init__(self, columns):
            self.columns, self.data = columns, []

        def add_data(self, *values):
            self.data.append(values)

    class Run:
        def __init__(self, **kwargs):
            self.init, self.summary, self.logged, self.finished = kwargs, {}, {}, False
            self.dir = str(tmp_path / "wandb" / "run" / "files")

        def log(self, data):
            self.logged.update(data)

        def finish(self):
            self.finished = True

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        init=lambda **kwargs: runs.append(Run(**kwargs)) or runs[-1], Table=Table))
    d = decide(grid_rows(), TIE, parse_budgets("24,80"))
    assert log_decision({"name": "none"}, d, sweep_dir=tmp_path) is None
    assert runs == []  # no W&B in the sweep: nothing logged
    offline = log_decision({"name": "wandb", "group": "freeze_grid", "mode": "offline", "tags": ["x"],
                            "unknown_key": 1}, d, sweep_dir=tmp_path)
    assert offline == str(tmp_path / "wandb" / "run")  # for `wandb sync`
    (run,) = runs
    assert (run.init["group"], run.init["job_type"], run.init["mode"], run.init["tags"]) == \
        ("freeze_grid", "report", "offline", ["x", "decision"])
    assert run.summary == {"decision/24 GiB": d["lines"][0], "decision/80 GiB": d["lines"][1], "decision/notes": "",
                           "decision/ranked_by": "accuracy"}
    table = run.logged["decision"]
    assert table.columns == ["budget", "pick", "most accurate", "fits", "estimated", "line"]
    assert table.data == [("24 GiB", "lora", "lora", "frozen, lora", "", d["lines"][0]),
                          ("80 GiB", "lora", "full", "frozen, lora, full", "", d["lines"][1])]
    assert run.finished


# --- plan, before any run ------------------------------------------------------------------------------------------


def test_plans_decision_on_the_7b_preset_ranks_by_cost_and_says_it_is_estimated():
    from vlmablate.plan import format_decision, grid_cells, grid_decision

    preset = ("model=llava16_mistral_7b", "quant=nf4", "train=rtx4090_qlora", "data=llava_mix665k", "eval=none")
    cfg, _ = compose_run(*preset)
    cells = grid_cells(cfg, lambda extra: compose_run(*preset, *extra)[0])
    decision = grid_decision(cells, parse_budgets("24,80,2h"))
    assert decision["ranked_by"] == "cost" and decision["notes"] == []
    assert [(b["pick"], b["most_accurate"]) for b in decision["budgets"]] == [
        ("frozen vision + frozen LLM", None), ("frozen vision + frozen LLM", None), (None, None)]
    assert format_decision(decision, cfg.plan.mfu).splitlines() == [
        "the decision per budget (report.budgets) from these estimates, wall-clock as one epoch at MFU 0.35; accuracy "
        "is unknown before any run, so the cells that fit are ranked by cost alone:",
        "  24 GiB (estimated memory): frozen vision + frozen LLM — the cheapest that fits (13.2 GiB); then frozen "
        "vision + LoRA LLM (13.5 GiB), unfrozen vision + LoRA LLM (16.1 GiB); full fine-tune does not fit (50.6 GiB)",
        "  80 GiB (estimated memory): frozen vision + frozen LLM — the cheapest that fits (13.2 GiB); then frozen "
        "vision + LoRA LLM (13.5 GiB), unfrozen vision + LoRA LLM (16.1 GiB), full fine-tune (50.6 GiB)",
        "  2 h (estimated wall-clock): no cell fits; the cheapest is frozen vision + frozen LLM (19.3 d)"]
