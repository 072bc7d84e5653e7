"""Data parallel on the CPU for real: torchrun / accelerate launch with gloo, checked against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# The same global batch of 8 either way: one process × 8, or two processes × 4.
TINY = ("model=tiny_random", "world=test", "train=cpu_tiny", "train.progress=false", "freeze=lora_llm",
        "vision=unfrozen", "eval=none", "train.max_steps=6", "train.logging_steps=1", "train.record_data_order=true")


def _env() -> dict:
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def one_process(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmablate", *overrides], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)


def two_processes(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "vlmablate", *overrides], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=600)


def only_run_dir(cwd: Path) -> Path:
    """The run directories Hydra made under cwd/outputs (there must be exactly one)."""
    found = [d for d in (cwd / "outputs").glob("*/*") if d.is_dir()]
    assert len(found) == 1, f"expected one run directory, found {found}"
    return found[0]


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    check(one_process(tmp_path / "one", *TINY, "train.per_device_train_batch_size=8"))
    ddp = two_processes(tmp_path / "two", *TINY, "train.per_device_train_batch_size=4")
    check(ddp)
    one = json.loads((only_run_dir(tmp_path / "one") / "summary.json").read_text())
    # Hydra stamps each rank's directory with its own clock; rank 0's is the one both used.
    run_dir = only_run_dir(tmp_path / "two")
    two = json.loads((run_dir / "summary.json").read_text())

    assert one["status"] == two["status"] == "completed"
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["determinism"]["world_size"] == 2
    # The same records in every step: rank 0 and rank 1 together train on exactly one process's batch.
    assert one["train"]["data_order"] == two["train"]["data_order"]
    assert two["train"]["data_order"] == {"steps": 6, "records": 48, "distinct": 48,
                                          "sha256": two["train"]["data_order"]["sha256"]}
    order = json.loads((run_dir / "data_order.json").read_text())
    assert order == json.loads((only_run_dir(tmp_path / "one") / "data_order.json").read_text())
    # Summed over both ranks: as many samples and tokens as the one process saw.
    assert two["train"]["samples_seen"] == one["train"]["samples_seen"] == 48
    assert two["train"]["tokens"] == one["train"]["tokens"]
    # Gradients are averaged over the ranks: the same losses up to float summation order.
    steps_one, losses_one = zip(*one["train"]["loss_curve"])
    steps_two, losses_two = zip(*two["train"]["loss_curve"])
    assert steps_one == steps_two == (1, 2, 3, 4, 5, 6)
    assert losses_two == pytest.approx(losses_one, abs=2e-3)
    assert losses_one[-1] < losses_one[0]  # it learns

    # Only rank 0 wrote: one summary, one log file without rank 1's lines, one Hydra folder.
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "__main__.log", "checkpoints", "data_order.json",
                                                         "final", "summary.json"]
    assert "[rank1]" not in (run_dir / "__main__.log").read_text()
    assert ddp.stdout.count("what trained:") == 1
    # Both ranks' RNG states are in the checkpoint, which is marked complete once.
    checkpoint = run_dir / "checkpoints" / "checkpoint-6"
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert {p.name for p in checkpoint.glob("progress.rank*.json")} == {"progress.rank0.json", "progress.rank1.json"}
    assert json.loads((checkpoint / "COMPLETE").read_text()) == {"step": 6}


def test_unfrozen_vision_with_the_penultimate_layer_trains_without_looking_for_unused_parameters(tmp_path):
    # LLaVA's features come from layer -2, so the last encoder block never reaches the loss; DDP without
    # find_unused_parameters fails on such a parameter. The plan freezes it, so DDP never waits for it.
    proc = two_processes(tmp_path, "model=tiny_random", "world=test", "train=cpu_tiny", "train.progress=false",
                         "stage=align", "data=tiny_world_caption", "freeze=frozen_llm", "vision=unfrozen",
                         "eval=none", "train.max_steps=3", "train.per_device_train_batch_size=4",
                         "train.ddp_find_unused_parameters=false", "model.vision_feature_layer=-2")
    check(proc)
    s = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert s["status"] == "completed" and s["train"]["steps"] == 3
    vision = s["params"]["components"]["vision"]
    # tiny_random's encoder: blocks of 8,544 parameters (hidden 32, MLP 64) and a post-layernorm of 64, which the
    # penultimate layer's features skip: the last block and the post-layernorm are what is unused.
    assert (vision["total"], vision["unused"], vision["trainable"]) == (32480, 8608, 23872)
    assert s["train"]["gradient_audit"]["trainable_tensors_with_grad"] > 0


def test_accelerate_launch_runs_the_same_job(tmp_path):
    # `--cpu` would make accelerate start one process (it leaves multi-CPU to mpirun); `--multi_gpu` is its
    # torchrun launcher, and the train preset's use_cpu puts the ranks on gloo.
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                           "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
                           "-m", "vlmablate", *TINY, "train.per_device_train_batch_size=4", "train.max_steps=2"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    check(proc)
    s = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert s["status"] == "completed" and s["world_size"] == 2 and s["train"]["samples_seen"] == 16


def test_the_main_job_under_torchrun_trains_stage_one_together_and_evaluates_once(tmp_path):
    env = {**_env(), "VLMABLATE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "vlmablate", "world=test", "train.progress=false", "train.max_steps=4",
                           "train.per_device_train_batch_size=4"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    check(proc)
    s = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert s["status"] == "completed" and s["world_size"] == 2 and s["train"]["samples_seen"] == 32
    # Stage 1 was not cached: both ranks trained it together, and rank 0 alone wrote it.
    stage1 = json.loads((Path(s["lineage"]["stage1"]["run_dir"]) / "summary.json").read_text())
    assert s["lineage"]["stage1"]["reused"] is False
    assert stage1["world_size"] == 2 and stage1["train"]["samples_seen"] == 32
    # Evaluation ran once, on rank 0: one evaluation log line, the benchmark scored on every question.
    line = "MMBench (generate, vlmevalkit_a67ace50): circular"  # the mode and the named extraction rule
    assert proc.stdout.count(line) + proc.stderr.count(line) == 1
    assert s["eval"]["mmbench"]["n_questions"] == 40


def test_zero3_loads_a_stage_one_projector_trains_saves_and_resumes(tmp_path):
    """DeepSpeed ZeRO-3 for real, in one CPU process: the weights are shape-[0] partitions while it
    trains, and a stage-1 projector must still load (LLaVA fails here), the saved artifacts must have
    full shapes, and a resume from DeepSpeed's own checkpoint must end where the uninterrupted run ends."""
    pytest.importorskip("deepspeed")
    align = ("model=tiny_random", "world=test", "train=cpu_tiny", "train.progress=false", "eval=none")
    check(one_process(tmp_path, *align, "stage=align", "data=tiny_world_caption", "freeze=frozen_llm",
                      "train.max_steps=2", f"hydra.run.dir={tmp_path / 'align'}"))
    zero3 = (*align, "freeze=lora_llm", "train.deepspeed=zero3", "train.max_steps=4", "train.save_steps=2",
             "train.logging_steps=1", f"model.pretrained_projector={tmp_path / 'align' / 'final' / 'projector'}")

    def torchrun_one(*overrides):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                               "-m", "vlmablate", *overrides], cwd=tmp_path, env=_env(), capture_output=True,
                              text=True, timeout=600)

    check(torchrun_one(*zero3, f"hydra.run.dir={tmp_path / 'whole'}"))
    check(torchrun_one(*zero3, f"hydra.run.dir={tmp_path / 'resumed'}",
                       f"train.resume={tmp_path / 'whole' / 'checkpoints' / 'checkpoint-2'}"))
    whole, resumed = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("whole", "resumed"))
    assert whole["status"] == resumed["status"] == "completed"
    assert whole["lineage"]["pretrained_projector"]["path"].endswith("align/final/projector")
    assert (tmp_path / "whole" / "checkpoints" / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's own state
    shapes = json.loads((tmp_path / "whole" / "final" / "projector" / "projector.json").read_text())["shapes"]
    assert shapes == {"linear_1.bias": [64], "linear_1.weight": [64, 32], "linear_2.bias": [64],
                      "linear_2.weight": [64, 64]}
    assert whole["params"]["components"]["projector"]["trainable"] == 6272  # counted from ds_numel, not [0]
    assert resumed["train"]["loss_curve"] == whole["train"]["loss_curve"]
    for name in ("adapter/adapter_model.safetensors", "non_lora_trainables.safetensors"):
        a, b = (load_file(str(tmp_path / d / "final" / name)) for d in ("whole", "resumed"))
        assert all(t.numel() > 0 for t in a.values())
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name


def test_every_rank_follows_rank_zeros_run_directory(tmp_path, monkeypatch):
    from vlmablate.train import distributed as dist

    rank0, rank1 = tmp_path / "22-07-15_run", tmp_path / "22-07-16_run"  # stamped a second apart
    rank1.mkdir()
    made = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "broadcast", lambda value, from_rank=0: str(rank0))
    assert dist.agree_on_run_dir(rank1, lambda: made.append(True)) == rank0
    assert made == [True] and not rank1.exists()  # the process group was made; the empty stray folder is gone
    assert dist.replica_overrides() == ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    monkeypatch.setenv("RANK", "0")
    assert dist.replica_overrides() == []
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist.agree_on_run_dir(rank1, lambda: made.append(True)) == rank1 and made == [True]
