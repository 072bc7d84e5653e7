"""Runs that survive interruption: killed at a random step, resumed, and bit for bit the run never killed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vlmablate.config import ConfigError
from vlmablate.train import checkpoints

TINY = ("model=tiny_random", "world=test", "train=cpu_tiny", "train.progress=false", "freeze=lora_llm",
        "vision=unfrozen", "eval=none", "train.max_steps=12", "train.save_steps=1", "train.logging_steps=1",
        "train.save_total_limit=2", "train.record_data_order=true")
# What must not differ between a run never stopped and one killed and resumed (wall-clock and memory may).
SAME = ("steps", "loss_curve", "first_loss", "final_loss", "train_loss", "tokens", "padding_efficiency",
        "samples_seen", "fully_masked_samples", "data_order")


def cli(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vlmablate", *TINY, f"hydra.run.dir={run_dir}", *extra]


def weights(run_dir: Path) -> dict:
    final = run_dir / "final"
    return {**load_file(str(final / "adapter" / "adapter_model.safetensors")),
            **{f"non_lora/{k}": v for k, v in load_file(str(final / "non_lora_trainables.safetensors")).items()}}


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["status"] == sb["status"] == "completed"
    assert {k: sa["train"][k] for k in SAME} == {k: sb["train"][k] for k in SAME}
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not (wa[k] == wb[k]).all()]
    assert not different, f"weights differ: {different[:5]}"


@pytest.fixture(scope="module")
def never_killed(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume") / "never-killed"
    subprocess.run(cli(run_dir), check=True, capture_output=True, text=True, timeout=600)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_run_killed_at_a_random_step_resumes_to_the_same_result(never_killed, tmp_path, sig):
    at = random.randint(2, 9)
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(cli(run_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = run_dir / "checkpoints" / f"checkpoint-{at}" / checkpoints.COMPLETE
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    out = proc.communicate(timeout=300)[0]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else None
    if sig == signal.SIGTERM:
        # The step under way finishes, its checkpoint is written, and the exit status says "terminated".
        assert proc.returncode == 143, out[-3000:]
        assert summary["status"] == "interrupted"
        stopped = summary["interrupted_at_step"]
        assert at <= stopped < 12
        assert checkpoints.newest_complete(run_dir / "checkpoints").name == f"checkpoint-{stopped}"
    else:
        assert proc.returncode == -signal.SIGKILL, f"killed at step {at}: {out[-3000:]}"
        assert summary is None  # killed outright: nothing was written but checkpoints
    # A save cut short leaves a folder without its COMPLETE mark; resume never takes it.
    half = run_dir / "checkpoints" / "checkpoint-11"
    half.mkdir(exist_ok=True)
    (half / "trainer_state.json").write_text("{ half written")
    newest = checkpoints.newest_complete(run_dir / "checkpoints")
    assert newest is not None and checkpoints.step_of(newest) >= at

    resumed = subprocess.run(cli(run_dir, "train.resume=auto"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, f"killed at step {at}: {resumed.stdout[-3000:]}{resumed.stderr[-3000:]}"
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["train"]["resumed_from"] == str(newest)
    assert_same_run(never_killed, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ("freeze=frozen_llm", "vision=frozen"),    # the projector alone: projector/
    ("freeze=frozen_llm", "vision=last_n"),    # vision blocks beside it: trainables.safetensors
    ("freeze=full_llm", "vision=frozen"),      # the whole LLM: model/
], ids=["projector", "vision-blocks", "full-llm"])
def test_every_plan_resumes_from_its_own_artifacts(run_cell, tmp_path, overrides):
    """Each kind of checkpoint the plan writes is read back exactly: resuming at step 2 of 4 ends where
    the run that never stopped ends."""
    common = ("train.max_steps=4", "train.save_steps=2", "train.logging_steps=1", *overrides)
    whole = run_cell(*common, name="whole")
    resumed = run_cell(*common, f"train.resume={tmp_path / 'whole' / 'checkpoints' / 'checkpoint-2'}",
                       name="resumed")
    assert resumed["train"]["resumed_from"].endswith("checkpoint-2")
    assert {k: resumed["train"][k] for k in SAME if k != "data_order"} == \
        {k: whole["train"][k] for k in SAME if k != "data_order"}
    files = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole" / "final").rglob("*.safetensors"))
    assert files
    for rel in files:
        a, b = load_file(str(tmp_path / "whole" / rel)), load_file(str(tmp_path / "resumed" / rel))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), f"{rel} differs"


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    parent = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = parent / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if complete:
            checkpoints.mark_complete(folder, step)
    (parent / "checkpoint-x").mkdir()  # not a checkpoint name
    assert checkpoints.resolve_resume(None, parent) is None
    assert checkpoints.resolve_resume("auto", parent) == parent / "checkpoint-4"
    assert checkpoints.resolve_resume("auto", tmp_path / "nothing-yet") is None  # a fresh start
    assert checkpoints.resolve_resume(str(parent / "checkpoint-2"), parent) == parent / "checkpoint-2"
    with pytest.raises(ConfigError, match="incomplete"):
        checkpoints.resolve_resume(str(parent / "checkpoint-6"), parent)
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        checkpoints.resolve_resume(str(parent / "checkpoint-x"), parent)
    # Rotation keeps the newest complete ones and drops the half-written one older than them.
    checkpoints.mark_complete(parent / "checkpoint-6", 6)
    (parent / "checkpoint-5").mkdir()
    deleted = checkpoints.rotate(parent, keep=2)
    assert sorted(p.name for p in deleted) == ["checkpoint-2", "checkpoint-5"]
    assert [p.name for p in checkpoints.checkpoints(parent)] == ["checkpoint-4", "checkpoint-6"]


def test_a_checkpoint_written_by_another_number_of_ranks_is_refused(tmp_path):
    checkpoints.save_progress(tmp_path, 0, {"samples_seen": 8})
    assert checkpoints.load_progress(tmp_path, 0) == {"samples_seen": 8}
    with pytest.raises(ConfigError, match="progress.rank1.json"):
        checkpoints.load_progress(tmp_path, 1)


@pytest.fixture
def restore_determinism():
    """train.deterministic switches process-wide settings; leave them as they were for the other tests."""
    import torch

    keys = ("CUDA_LAUNCH_BLOCKING", "CUBLAS_WORKSPACE_CONFIG", "ASCEND_LAUNCH_BLOCKING", "HCCL_DETERMINISTIC",
            "FLASH_ATTENTION_DETERMINISTIC")
    env = {k: os.environ.get(k) for k in keys}
    flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(flags[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[1], flags[2]
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.slow
def test_same_seed_same_run_and_the_settings_are_recorded(run_cell, restore_determinism):
    a = run_cell("train.max_steps=3", "train.deterministic=true", name="a")
    b = run_cell("train.max_steps=3", "train.deterministic=true", name="b")
    assert a["train"]["loss_curve"] == b["train"]["loss_curve"]
    assert a["determinism"]["seed"] == 42 and a["determinism"]["train.deterministic"] is True
    assert a["determinism"]["torch.use_deterministic_algorithms"] is True
    assert a["determinism"]["CUBLAS_WORKSPACE_CONFIG"] == ":16:8" and a["determinism"]["CUDA_LAUNCH_BLOCKING"] == "1"
    wa, wb = (load_file(str(Path(s["artifacts"]["adapter"]) / "adapter_model.safetensors")) for s in (a, b))
    assert all((wa[k] == wb[k]).all() for k in wa)
    c = run_cell("train.max_steps=3", "train.seed=7", name="c")
    assert c["determinism"]["seed"] == 7 and c["train"]["loss_curve"] != a["train"]["loss_curve"]


@pytest.mark.parametrize("overrides", [
    ("freeze=lora_llm", "vision=unfrozen"),   # adapter/ + non_lora_trainables
    ("freeze=frozen_llm", "vision=last_n"),   # projector/ + trainables
    ("freeze=full_llm", "vision=frozen"),     # model/
], ids=["lora", "projector-vision-blocks", "full-llm"])
def test_artifacts_from_an_engines_state_dict_equal_those_from_the_parameters(tmp_path, overrides):
    """Under FSDP the parameters are shards and Trainer hands over the gathered state dict, whose keys
    carry the engine's wrappers: the files written from it are the very files written from the model."""
    from conftest import compose_run

    from vlmablate.model.plan import resolve_plan
    from vlmablate.train.artifacts import save_artifacts
    from vlmablate.train.runner import load_cell_model, prepare_model

    cfg, _ = compose_run("model=tiny_random", "world=test", *overrides)
    plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage)
    model, _, _ = load_cell_model(cfg, prepare_model(cfg, plan), plan, None)
    gathered = {k.replace("layers.0.", "layers.0._fsdp_wrapped_module._checkpoint_wrapped_module."): v
                for k, v in model.state_dict().items()}
    assert any("_fsdp_wrapped_module" in k for k in gathered)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    a = save_artifacts(model, plan, tmp_path / "a", plan_record={})
    b = save_artifacts(model, plan, tmp_path / "b", plan_record={}, state_dict=gathered, trainable=trainable)
    assert a.keys() == b.keys()
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert files
    for rel in files:
        x, y = load_file(str(tmp_path / "a" / rel)), load_file(str(tmp_path / "b" / rel))
        assert x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x), rel
    if plan.projector.trainable:
        meta = [json.loads((tmp_path / d / "projector" / "projector.json").read_text())["sha256"] for d in "ab"]
        assert meta[0] == meta[1]


def test_train_switches_reach_trainers_arguments(tmp_path, restore_determinism):
    from conftest import compose_run

    from vlmablate.train.runner import training_arguments

    # (train.ddp_backend is passed on as well, but TrainingArguments wants a process group for it.)
    cfg, _ = compose_run("model=tiny_random", "train=cpu_tiny", "train.deterministic=true",
                         "train.ddp_find_unused_parameters=false")
    args = training_arguments(cfg, tmp_path)
    assert (args.full_determinism, args.ddp_find_unused_parameters) == (True, False)
    assert args.output_dir == str(tmp_path / "checkpoints")
    default, _ = compose_run("model=tiny_random", "train=cpu_tiny")
    args = training_arguments(default, tmp_path)
    assert (args.ddp_backend, args.full_determinism, args.ddp_find_unused_parameters) == (None, False, None)
