"""`python -m vlmablate` with no arguments (on the test-size world): stage 1 is trained once and found
again by its config hash, stage 2 starts from it, and the same seed gives the same numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file


def main_job(run_dir, cache, *overrides):
    env = {**os.environ, "VLMABLATE_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-m", "vlmablate", "world=test", "train.progress=false", "train.logging_steps=10",
                          "train.num_train_epochs=3", "freeze.lr=3e-3", *overrides,
                          f"hydra.run.dir={run_dir}"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text()), out.stdout + out.stderr


@pytest.mark.slow
def test_main_job_trains_stage_one_once_and_is_deterministic(tmp_path):
    cache = tmp_path / "cache"
    first, log = main_job(tmp_path / "a", cache)
    assert first["status"] == "completed"
    stage1 = first["lineage"]["stage1"]
    assert stage1["reused"] is False and "stage=align" in stage1["overrides"]
    align = json.loads((tmp_path / "cache" / "stage1" / os.path.basename(stage1["run_dir"]) / "summary.json").read_text())
    assert align["params"]["trainable"]["llm"] == 0 and align["params"]["trainable"]["vision"] == 0
    assert align["train"]["final_loss"] < align["train"]["first_loss"]
    assert first["lineage"]["pretrained_projector"]["path"] == stage1["projector"]
    # Grouped batches differ in kind (long descriptions, short answers, text-only), so single windows are
    # noisy; the later windows together must sit below the first one.
    later = [loss for _, loss in first["train"]["loss_curve"][1:]]
    assert sum(later) / len(later) < first["train"]["first_loss"]
    assert first["plan"]["llm"]["mode"] == "lora" and first["plan"]["vision"]["mode"] == "frozen"
    # The run ends by saying what trained, the final loss and where the run is.
    assert "[TRAINABLE]" in log and "loss" in log and f"run directory: {tmp_path / 'a'}" in log

    second, _ = main_job(tmp_path / "b", cache)
    assert second["lineage"]["stage1"]["reused"] is True
    assert second["lineage"]["stage1"]["hash"] == stage1["hash"]
    assert second["lineage"]["pretrained_projector"]["sha256"] == first["lineage"]["pretrained_projector"]["sha256"]
    # Same config and seed: the same loss curve and the same weights, bit for bit on the CPU.
    assert second["train"]["loss_curve"] == first["train"]["loss_curve"]
    a = load_file(tmp_path / "a" / "final" / "non_lora_trainables.safetensors")
    b = load_file(tmp_path / "b" / "final" / "non_lora_trainables.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    other_seed, _ = main_job(tmp_path / "c", cache, "world.seed=1")
    assert other_seed["lineage"]["stage1"]["hash"] != stage1["hash"]
