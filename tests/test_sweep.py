"""Sweeps: the reference freeze grid as a Hydra multirun (test world, few steps), idempotent re-runs, a failed cell
that leaves the others completed, the report, the cluster and W&B sweep definitions, the notebook."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CONF, compose_run

from vlmablate.report.compare import paired_tests, summarize, to_markdown, write_report

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
FAST = ["world=test", "model=tiny_random", "train=cpu_tiny", "train.max_steps=3", "train.save_steps=100",
        "train.progress=false", "train.seed=0", "eval.max_questions=12"]


def sweep(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLMABLATE_CACHE": os.environ["VLMABLATE_CACHE"]}
    return subprocess.run([sys.executable, "-m", "vlmablate", "--config-dir", str(SWEEPS), "--config-name",
                           "freeze_grid", *FAST, f"hydra.sweep.dir={tmp_path / 'grid'}", *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sweep")
    first = sweep(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    return tmp_path, first


@pytest.mark.slow
def test_the_grid_runs_and_is_reported(grid):
    tmp_path, _ = grid
    folder = tmp_path / "grid"
    with (folder / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["cell"] for r in rows] == ["frozen_frozen", "frozen_lora", "unfrozen_lora", "full"]
    assert all(r["status"] == "completed" and r["seeds"] == "1" for r in rows)
    assert all(math.isfinite(float(r["mmbench_circular"])) for r in rows)
    # trainable parameters of tiny_random, as test_plan.py derives them
    assert [int(r["trainable_params"]) for r in rows] == [6_272, 39_040, 62_912, 180_992]
    md = (folder / "comparison.md").read_text()
    assert md.startswith("# Comparison of the sweep's cells\n\n## Decision per budget\n\n")
    table = md.split("## The cells\n\n")[1]
    assert table.startswith("| Config | Trainable params | MM-Bench circular (95% CI) | Wall-clock")
    assert "Full FT (vision + LLM + projector)" in md and "Paired differences" in md
    assert (folder / "comparison.png").stat().st_size > 10_000
    summary = json.loads((folder / "frozen_lora" / "seed0" / "summary.json").read_text())
    assert summary["cell"] == {"name": "frozen_lora", "label": "Frozen vision + LoRA LLM + train projector"}
    assert summary["seed"] == 0 and summary["config_hash"]


@pytest.mark.slow
def test_a_second_invocation_trains_nothing(grid):
    tmp_path, _ = grid
    summaries = sorted((tmp_path / "grid").glob("*/seed0/summary.json"))
    before = {p: p.stat().st_mtime_ns for p in summaries}
    again = sweep(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("already completed with this config") == 4
    assert {p: p.stat().st_mtime_ns for p in summaries} == before


@pytest.mark.slow
def test_a_failed_cell_leaves_the_others_completed(tmp_path):
    # 4-bit quantization cannot go with full fine-tuning: that cell fails, the sweep goes on
    result = sweep(tmp_path, "quant=nf4")
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = {p.parent.parent.name: json.loads(p.read_text())["status"]
                for p in (tmp_path / "grid").glob("*/seed0/summary.json")}
    assert statuses == {"frozen_frozen": "completed", "frozen_lora": "completed", "unfrozen_lora": "completed",
                        "full": "failed"}
    with (tmp_path / "grid" / "comparison.csv").open() as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert rows["full"]["status"] == "failed" and rows["full"]["seeds"] == "0"
    assert "| failed" in (tmp_path / "grid" / "comparison.md").read_text()


def fake_run(folder: Path, cell: str, seed: int, correct: list[bool], status: str = "completed") -> None:
    run = folder / cell / f"seed{seed}"
    (run / "eval" / "mmbench").mkdir(parents=True)
    rows = [{"q": q, "copy": c, "correct": ok} for q, ok in enumerate(correct) for c in range(2)]
    (run / "eval" / "mmbench" / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    summary = {"status": status, "seed": seed, "cell": {"name": cell, "label": cell.upper()},
               "params": {"total": 1000, "trainable": {"total": 10 * (1 + len(cell))}},
               "train": {"wall_clock_s": 5.0 + seed, "peak_mem_mb": 100.0, "tokens_per_s": 50.0, "final_loss": 1.0},
               "eval": {"mmbench": {"vanilla_acc": 0.5}, "textvqa": {"vqa_acc": 0.25}}}
    (run / "summary.json").write_text(json.dumps(summary))


def test_report_pools_seeds_and_tests_pairs(tmp_path):
    fake_run(tmp_path, "a", 0, [True] * 20)
    fake_run(tmp_path, "a", 1, [True] * 10 + [False] * 10)
    fake_run(tmp_path, "b", 0, [False] * 20)
    fake_run(tmp_path, "b", 1, [False] * 20)
    fake_run(tmp_path, "c", 0, [True] * 20, status="failed")
    result = write_report(tmp_path, n_boot=200)
    rows = {r["cell"]: r for r in result["rows"]}
    assert rows["a"]["mmbench_circular"] == pytest.approx(0.75)  # 30 of 40 (seed, question) pairs
    lo, hi = rows["a"]["mmbench_ci_low"], rows["a"]["mmbench_ci_high"]
    assert lo < 0.75 < hi and rows["b"]["mmbench_circular"] == 0.0
    assert rows["a"]["wall_clock_s"] == 5.5 and rows["a"]["seeds"] == 2 and rows["a"]["vqa_acc"] == 0.25
    assert rows["c"]["status"] == "failed" and rows["c"]["failed_seeds"] == "0"
    (pair,) = [t for t in result["paired"] if {t["a"], t["b"]} == {"a", "b"}]
    assert pair["pairs"] == 40 and abs(pair["diff"]) == pytest.approx(0.75) and pair["design"] == "paired"
    # two seeds that disagree this much (1.00 and 0.50) cannot establish a difference once training noise
    # counts; the pair-level test, 40 pairs taken as independent, called it certain
    assert pair["p_value"] > 0.05 and pair["pair_level"]["p_value"] < 0.01 and not pair["beyond_noise"]
    assert pair["p_holm"] == pair["p_value"]  # a family of one: c failed, so a-b is the only pair
    markdown = to_markdown(result["rows"], result["paired"])
    assert "beyond noise" in markdown and "smallest difference 2 seeds see" in markdown
    assert summarize({"cell": "x", "label": "x", "runs": [], "config": {}})["status"] == "failed"
    assert paired_tests([]) == []


def test_the_slurm_and_wandb_sweeps_are_well_formed():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(SWEEPS), version_base="1.3"):
        cfg = compose(config_name="freeze_grid_slurm", overrides=[f"hydra.searchpath=[file://{CONF}]"],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.additional_parameters.requeue is True
    assert cfg.hydra.sweeper.params.cell == "frozen_frozen,frozen_lora,unfrozen_lora,full"
    # Preempted or timed-out cells are requeued into their own folder and resume from their checkpoints.
    assert cfg.train.resume == "auto" and cfg.hydra.sweep.subdir == "none/seed42"  # ${cell.name}/seed${train.seed}
    assert cfg.hydra.launcher.max_num_timeout == 5 and cfg.hydra.launcher.signal_delay_s == 300
    wandb_sweep = yaml.safe_load((SWEEPS / "wandb_freeze_grid.yaml").read_text())
    assert wandb_sweep["method"] == "grid"
    assert wandb_sweep["parameters"]["cell"]["values"] == ["frozen_frozen", "frozen_lora", "unfrozen_lora", "full"]
    command = wandb_sweep["command"]
    assert "${args_no_hyphens}" in command and command[command.index("--config-name") + 1] == "wandb_cell"
    with initialize_config_dir(config_dir=str(SWEEPS), version_base="1.3"):
        cell = compose(config_name="wandb_cell", overrides=[f"hydra.searchpath=[file://{CONF}]", "cell=frozen_lora",
                                                            "train.seed=2"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cell.logger.name == "wandb" and cell.train.resume == "auto"
    assert cell.hydra.run.dir == "sweeps_out/wandb_freeze_grid/frozen_lora/seed2"


def test_resume_and_bookkeeping_switches_leave_the_config_hash_alone():
    from vlmablate.config import config_hash
    from vlmablate.train.stages import learning_config

    _, base = compose_run("cell=frozen_lora")
    _, resumed = compose_run("cell=frozen_lora", "train.resume=auto", "train.record_data_order=true",
                             "train.checkpoint_on_sigterm=false", "logger=wandb")
    _, other = compose_run("cell=frozen_lora", "train.seed=1")
    assert config_hash(learning_config(base)) == config_hash(learning_config(resumed))
    assert config_hash(learning_config(base)) != config_hash(learning_config(other))


@pytest.mark.slow
def test_the_notebook_runs_against_a_sweep(grid):
    import nbformat
    from nbclient import NotebookClient

    tmp_path, _ = grid
    notebook = nbformat.read(Path(__file__).resolve().parents[1] / "notebooks" / "compare_sweep.ipynb", as_version=4)
    os.environ["SWEEP_DIR"] = str(tmp_path / "grid")
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3").execute()
    finally:
        del os.environ["SWEEP_DIR"]
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert any("4" == o.get("data", {}).get("text/plain") for o in outputs)  # four cells reported
    assert (tmp_path / "grid" / "loss_curves.png").exists() and (tmp_path / "grid" / "accuracy_vs_params.png").exists()


def test_the_grid_shares_one_wandb_group():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(SWEEPS), version_base="1.3"):
        cfg = compose(config_name="freeze_grid", overrides=[f"hydra.searchpath=[file://{CONF}]", "logger=wandb",
                                                            "cell=full"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cfg.logger.group == "freeze_grid" and cfg.logger.name == "wandb"
    assert (cfg.vision.policy, cfg.freeze.name) == ("unfrozen", "full_llm")
    assert cfg.hydra.sweep.subdir == f"full/seed{cfg.train.seed}"  # one folder per cell and seed


def test_stage_one_is_shared_by_every_cell_and_seed():
    from vlmablate.train.stages import stage1_overrides

    for cell in ("frozen_frozen", "frozen_lora", "unfrozen_lora", "full"):
        for seed in (0, 1, 2):
            kept = stage1_overrides([f"cell={cell}", f"train.seed={seed}", "world=test", "train.max_steps=3",
                                     "world.n_instruct=20000", "world.question_weights.mark=3"], "tiny_world_caption")
            assert kept == ["world=test", "train.max_steps=3", "stage=align", "data=tiny_world_caption", "eval=none",
                            "model.pretrained_projector=null"]


def test_logging_settings_do_not_change_a_cells_hash():
    from vlmablate.config import config_hash
    from vlmablate.train.stages import learning_config

    base = {"train": {"seed": 0, "progress": True}, "logger": {"name": "none"}, "freeze": {"name": "lora_llm"}}
    logged = {"train": {"seed": 0, "progress": False}, "logger": {"name": "wandb"}, "freeze": {"name": "lora_llm"}}
    other = {"train": {"seed": 1, "progress": True}, "logger": {"name": "none"}, "freeze": {"name": "lora_llm"}}
    assert config_hash(learning_config(base)) == config_hash(learning_config(logged))
    assert config_hash(learning_config(base)) != config_hash(learning_config(other))


def fake_categorised_run(folder: Path, cell: str, seed: int, right: dict[str, list[bool]],
                         blank: dict[str, list[bool]]) -> None:
    """A run whose questions are listed per category: `right` with the image, `blank` with a blank one."""
    run = folder / cell / f"seed{seed}"
    for task, answers in (("mmbench", right), ("mmbench_blank_image", blank)):
        (run / "eval" / task).mkdir(parents=True)
        rows, q = [], 0
        for category, oks in answers.items():
            for ok in oks:
                rows += [{"q": q, "copy": c, "category": category, "correct": ok or c == 0} for c in range(2)]
                q += 1
        (run / "eval" / task / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    summary = {"status": "completed", "seed": seed, "cell": {"name": cell, "label": cell},
               "eval": {"mmbench": {"vanilla_acc": 0.5}, "textvqa": {"vqa_acc": 0.5},
                        "vqa_blank_image": {"vqa_acc": 0.25 + 0.125 * seed}}}
    (run / "summary.json").write_text(json.dumps(summary))


def test_report_has_the_blank_baseline_and_tests_per_category(tmp_path):
    # "vision" reads the mark and not counting; "lm" the other way round; both read colour
    for seed in (0, 1):
        fake_categorised_run(tmp_path, "vision", seed, {"colour": [True] * 30, "mark": [True] * 30,
                                                       "counting": [False] * 30},
                             {"colour": [False] * 30, "mark": [True] * 15 + [False] * 15, "counting": [False] * 30})
        fake_categorised_run(tmp_path, "lm", seed, {"colour": [True] * 30, "mark": [False] * 30,
                                                   "counting": [True] * 30},
                             {"colour": [False] * 30, "mark": [False] * 30, "counting": [False] * 30})
    result = write_report(tmp_path, n_boot=200)
    rows = {r["cell"]: r for r in result["rows"]}
    assert rows["vision"]["mmbench_circular"] == rows["lm"]["mmbench_circular"] == pytest.approx(2 / 3)
    assert rows["vision"]["mmbench_blank"] == pytest.approx(1 / 6) and rows["lm"]["mmbench_blank"] == 0.0
    assert rows["vision"]["vqa_blank"] == pytest.approx(0.3125)
    assert rows["vision"]["per_category"]["mark"] == {"circular": 1.0, "blank": 0.5, "n": 60}
    assert rows["lm"]["per_category"]["counting"] == {"circular": 1.0, "blank": 0.0, "n": 60}
    (overall,) = result["paired"]
    assert overall["diff"] == 0.0 and overall["p_value"] == 1.0  # the two cells tie overall ...
    by_category = {t["category"]: t for t in result["paired_by_category"]}
    assert set(by_category) == {"colour", "counting", "mark"}
    assert by_category["colour"]["diff"] == 0.0 and by_category["colour"]["pairs"] == 60
    sign = 1 if by_category["mark"]["a"] == "vision" else -1  # ... and differ beyond noise where each reads
    assert sign * by_category["mark"]["diff"] == 1.0 and sign * by_category["counting"]["diff"] == -1.0
    assert by_category["mark"]["p_value"] < 0.05 and by_category["counting"]["p_value"] < 0.05
    # the blank band pools every cell and seed: 30 of 360 (seed, question) pairs right
    mean, low, high = result["blank_band"]
    assert mean == pytest.approx(30 / 360) and low < mean < high
    markdown = (tmp_path / "comparison.md").read_text()
    assert "| mark | 1.00 / 0.50 | 0.00 / 0.00 |" in markdown or "| mark | 0.00 / 0.00 | 1.00 / 0.50 |" in markdown
    assert "2 of 3 tests at a raw p < 0.05" in markdown and "2 beyond noise after Holm" in markdown
    assert (tmp_path / "comparison.png").stat().st_size > 0


def fake_policy_run(folder: Path, cell: str, seed: int, vision: str, llm: str, right: dict[str, list[bool]],
                    blank: dict[str, list[bool]] | None = None) -> None:
    """A completed run with a config (vision policy, LM policy) and per-category answers (one copy each), and
    with `blank` the same questions' answers with a blank image."""
    run = folder / cell / f"seed{seed}"
    (run / ".hydra").mkdir(parents=True)
    for task, answers in (("mmbench", right), ("mmbench_blank_image", blank)):
        if answers is None:
            continue
        rows, q = [], 0
        for category, oks in answers.items():
            rows += [{"q": q + k, "copy": 0, "category": category, "correct": ok} for k, ok in enumerate(oks)]
            q += len(oks)
        (run / "eval" / task).mkdir(parents=True)
        (run / "eval" / task / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = {"vision": {"policy": vision}, "freeze": {"name": f"{llm}_llm", "policy": llm},
              "quant": {"mode": "none"}, "train": {"seed": seed, "lr_scale": 10}, "cell": {"name": cell}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {"status": "completed", "seed": seed, "cell": {"name": cell, "label": cell}}
    (run / "summary.json").write_text(json.dumps(summary))


GRID_POLICIES = {"frozen_frozen": ("frozen", "frozen"), "frozen_lora": ("frozen", "lora"),
                 "unfrozen_lora": ("unfrozen", "lora"), "full": ("unfrozen", "full")}


def fake_control_grid(folder: Path, counts_of, blank_counts_of=None) -> None:
    """The reference table's four cells on seeds 0-2, 60 mark and 20 counting questions each: the mark read
    only where the tower trains (a little differently each seed); `counts_of(seed)` the counting answers of
    the LM-training cells (frozen LM: none right), and with `blank_counts_of` a blank-image run beside it
    where the mark is right half the time in every cell."""
    for seed in (0, 1, 2):
        for name, (vision, llm) in GRID_POLICIES.items():
            marks = [True] * (48 + 3 * seed) + [False] * (12 - 3 * seed) if vision == "unfrozen" else \
                [True] * 30 + [False] * 30
            counts = counts_of(seed) if llm != "frozen" else [False] * 20
            blank = None if blank_counts_of is None else {
                "mark_recognition": [True] * 30 + [False] * 30,
                "object_counting": blank_counts_of(seed) if llm != "frozen" else [False] * 20}
            fake_policy_run(folder, name, seed, vision, llm, {"mark_recognition": marks, "object_counting": counts},
                            blank=blank)


def test_controls_and_an_aa_comparison_in_the_report(tmp_path):
    # The mark is read only by cells whose tower trains, each seed a little differently; counting is read a
    # little by the LM-training cells, too little to pass the control. frozen_lora_aa trains frozen_lora's
    # config under another name with other seeds: an A/A arm.
    fake_control_grid(tmp_path, lambda seed: [True] * (2 + seed % 2) + [False] * (18 - seed % 2))
    for seed in (0, 1, 2):
        fake_policy_run(tmp_path, "frozen_lora_aa", seed + 3, "frozen", "lora",
                        {"mark_recognition": [True] * 30 + [False] * 30,
                         "object_counting": [True] * (2 + (seed + 1) % 2) + [False] * (18 - (seed + 1) % 2)})
    result = write_report(tmp_path, n_boot=200)
    # the A/A arm is compared with its twin only: 6 pairs of the four cells, and one A/A pair
    assert len(result["paired"]) == 6 and all("frozen_lora_aa" not in (t["a"], t["b"]) for t in result["paired"])
    (aa,) = result["aa"]["overall"]
    assert (aa["a"], aa["b"], aa["design"], aa["seeds"]) == ("frozen_lora", "frozen_lora_aa", "unpaired", (3, 3))
    assert aa["diff"] == pytest.approx(-1 / 240) and not aa["beyond_noise"]
    assert {t["category"] for t in result["aa"]["by_category"]} == {"mark_recognition", "object_counting"}
    mark, counting = result["controls"]
    # every tower-training cell against every frozen-tower cell: 2 x 2 comparisons, Holm over the four
    assert [(t["a"], t["b"]) for t in mark["tests"]] == [("unfrozen_lora", "frozen_frozen"),
                                                          ("unfrozen_lora", "frozen_lora"),
                                                          ("full", "frozen_frozen"), ("full", "frozen_lora")]
    assert all(t["diff"] == pytest.approx(0.35) for t in mark["tests"])  # 0.85 against 0.50
    assert mark["found"] and all(t["p_holm"] < 0.01 for t in mark["tests"])
    assert [(t["a"], t["b"]) for t in counting["tests"]] == [("frozen_lora", "frozen_frozen"),
                                                              ("unfrozen_lora", "frozen_frozen"),
                                                              ("full", "frozen_frozen")]
    assert all(t["diff"] == pytest.approx(7 / 60) for t in counting["tests"]) and not counting["found"]
    markdown = (tmp_path / "comparison.md").read_text()
    assert "| vision side: the mark | found (no blank-image runs to tell reading from a prior) |" in markdown
    assert "| LM side: counting | not found |" in markdown
    assert "A/A comparisons" in markdown and "frozen_lora (frozen_lora_aa)" not in markdown


def test_a_control_found_as_much_with_a_blank_image_is_called_a_prior(tmp_path):
    # The LM-training cells answer counting questions right with the image and with a blank one alike (they
    # learned which count is likely); the tower-training cells read the mark only with the image.
    fake_control_grid(tmp_path, lambda seed: [True] * (12 + seed) + [False] * (8 - seed),
                      blank_counts_of=lambda seed: [True] * (11 + seed) + [False] * (9 - seed))
    result = write_report(tmp_path, n_boot=200)
    mark, counting = result["controls"]
    assert mark["found"] and mark["from_image"] is True
    assert all(t["blank_diff"] == 0.0 for t in mark["tests"])  # every cell: 0.50 with a blank image
    assert counting["found"] and counting["from_image"] is False
    # image: 0.65 against 0; blank: 0.60 against 0, so 0.05 of the 0.65 comes from the image
    assert all(t["diff"] == pytest.approx(0.65) and t["blank_diff"] == pytest.approx(0.60) for t in counting["tests"])
    markdown = (tmp_path / "comparison.md").read_text()
    assert "| vision side: the mark | found |" in markdown
    assert "| LM side: counting | found, but a blank image gains nearly as much: a prior, not read from the image |" \
        in markdown
    assert "| LM side: counting (object_counting) | frozen_lora | frozen_frozen | +0.650 |" in markdown
    assert "| yes | +0.600 |" in markdown
