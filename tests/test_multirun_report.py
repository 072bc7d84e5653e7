"""Any multirun ends with its comparison: the report callback comes with the default config, not only with the
sweeps/ configs, runs once where a sweep names it too, and does nothing where a multirun trained nothing."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
FAST = ["world=test", "model=tiny_random", "train=cpu_tiny", "train.max_steps=2", "train.save_steps=100",
        "train.progress=false", "eval.max_questions=8"]
REPORT = "vlmablate.report.callback.ReportCallback"


def hydra_callbacks(config_dir: Path, name: str, *overrides: str) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides), return_hydra_config=True)
    GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg.hydra.callbacks)


def test_the_default_config_and_the_grid_carry_the_report_once():
    assert hydra_callbacks(CONF, "config") == {"report": {"_target_": REPORT}}
    grid = hydra_callbacks(SWEEPS, "freeze_grid", f"hydra.searchpath=[file://{CONF}]")
    assert grid == {"report": {"_target_": REPORT}}


def test_a_multirun_that_trained_nothing_writes_no_report(tmp_path, caplog):
    from vlmablate.report.callback import ReportCallback

    sweep = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}, "logger": {"name": "none"}})
    with caplog.at_level(logging.INFO, logger="vlmablate.report.callback"):
        ReportCallback().on_multirun_end(sweep)
    assert list(tmp_path.iterdir()) == []
    assert [r.levelname for r in caplog.records] == ["INFO"] and "no training runs" in caplog.text


@pytest.mark.slow
def test_a_command_line_multirun_ends_with_its_comparison(tmp_path):
    folder = tmp_path / "multi"
    out = subprocess.run([sys.executable, "-m", "vlmablate", "-m", "freeze=frozen_llm,lora_llm", *FAST,
                          f"hydra.sweep.dir={folder}"], cwd=tmp_path, env=dict(os.environ),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with (folder / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    # cells without a `cell` name are named by their options; trainable parameters of tiny_random (test_plan.py)
    assert [(r["cell"], r["status"], int(r["trainable_params"])) for r in rows] == [
        ("vision=frozen freeze=frozen_llm quant=none", "completed", 6_272),
        ("vision=frozen freeze=lora_llm quant=none", "completed", 39_040)]
    assert all((folder / f"comparison.{ext}").stat().st_size > 0 for ext in ("md", "json", "png"))
    assert f"sweep report: {folder / 'comparison.md'}" in out.stdout + out.stderr
