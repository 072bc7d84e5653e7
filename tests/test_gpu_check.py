"""benchmarks/gpu_check.py on the CPU: its arguments, its commands, its rows and report, the skip without CUDA,
and the whole check on a tiny llava-1.5-shaped model through the runner."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

gpu_check = load_benchmark("gpu_check")


def test_arguments_default_to_the_whole_grid_on_cuda_and_refuse_a_7b_on_the_cpu():
    args = gpu_check.parse_args([])
    assert (args.device, args.shape, args.cells, args.steps, args.ddp_cell, args.work, args.out) == \
        ("cuda", "7b", ["frozen_frozen", "frozen_lora", "unfrozen_lora", "full"], 10, "frozen_lora", None, None)
    args = gpu_check.parse_args(["--device", "cpu", "--shape", "tiny", "--cells", "full", "frozen_lora",
                                 "--steps", "2", "--out", "r.json", "--work", "w"])
    assert (args.device, args.shape, args.cells, args.steps, args.out, args.work) == \
        ("cpu", "tiny", ["full", "frozen_lora"], 2, Path("r.json"), Path("w"))
    assert gpu_check.parse_args([]).logits_cell == "frozen_lora"  # run again with the LM head on every position
    for bad in (["--device", "cpu"], ["--cells", "lora"], ["--steps", "0"], ["--shape", "13b"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def test_without_cuda_the_check_says_so_and_exits_0(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.json"
    assert gpu_check.main(["--out", str(out), "--work", str(tmp_path / "w")]) == 0
    assert capsys.readouterr().out == ("gpu_check: no CUDA device; nothing to measure "
                                       "(--device cpu --shape tiny checks the script itself)\n")
    assert json.loads(out.read_text()) == {"skipped": gpu_check.SKIP_MESSAGE}
    assert not (tmp_path / "w").exists()  # nothing built


def test_a_cell_is_the_preset_run_as_python_m_vlmablate_and_ddp_is_torchrun(monkeypatch):
    overrides = gpu_check.cell_overrides("full", Path("/w/model"), Path("/w/data/records.json"), Path("/w"),
                                         steps=10, device="cuda", max_length=None)
    assert overrides == ["model=llava15_7b", "model.checkpoint=/w/model", "quant=none", "train=rtx4090_qlora",
                         "cell=full", "data=llava_json", "data.path=/w/data/records.json", "data.image_root=/w/data",
                         "data.cache_dir=/w/cache", "eval=none", "logger=none", "train.max_steps=10",
                         "train.gradient_accumulation_steps=1", "train.logging_steps=1", "train.progress=false"]
    cpu = gpu_check.cell_overrides("frozen_lora", Path("/w/model"), Path("/w/data/records.json"), Path("/w"),
                                   steps=2, device="cpu", max_length=128)
    assert cpu[2] == "quant=nf4" and cpu[-4:] == ["model.max_length=128", "train.use_cpu=true",
                                                  "train.dataloader_num_workers=0", "train.optim=adamw_torch"]
    counted = gpu_check.cell_overrides("full", Path("/w/model"), Path("/w/data/records.json"), Path("/w"),
                                       steps=10, device="cuda", max_length=None, labelled=1430)
    assert counted == [*overrides, "plan.labelled_tokens=1430"]  # plan's logits term counts the data's answers
    cfg, _ = gpu_check.compose(gpu_check.cell_overrides("frozen_lora", Path("/w/model"), Path("/w/d.json"),
                                                        Path("/w"), steps=10, device="cuda", max_length=None))
    assert (cfg.train.per_device_train_batch_size, cfg.model.max_length, cfg.quant.mode, cfg.quant.double_quant,
            cfg.train.optim, cfg.train.bf16, cfg.train.gradient_checkpointing, cfg.train.gradient_accumulation_steps,
            cfg.vision.policy, cfg.freeze.name) == \
        (4, 2048, "nf4", True, "paged_adamw_8bit", True, True, 1, "frozen", "lora_llm")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    gpus = gpu_check.visible_gpus()
    assert gpus == ["3", "5", "7"]
    argv, env = gpu_check.train_command(Path("/w/runs/full"), ["cell=full"], gpus[:1])
    assert argv == [sys.executable, "-m", "vlmablate", "cell=full", "hydra.run.dir=/w/runs/full"]
    assert env["CUDA_VISIBLE_DEVICES"] == "3"
    argv, env = gpu_check.train_command(Path("/w/runs/ddp"), ["cell=frozen_lora"], gpus[:2])
    assert argv == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                    "vlmablate", "cell=frozen_lora", "hydra.run.dir=/w/runs/ddp"]
    assert env["CUDA_VISIBLE_DEVICES"] == "3,5"


def test_the_7b_shape_is_llava_15_7b_with_the_tiny_tokenizers_ids():
    from transformers import LlavaForConditionalGeneration

    from vlmablate.model.tiny import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer()
    config = gpu_check.llava_config("7b", tokenizer)
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers, config.text_config.vocab_size,
            config.vision_config.image_size, config.vision_config.patch_size, config.image_seq_length) == \
        (4096, 32, 32064, 336, 14, 576)
    assert (config.image_token_index, config.text_config.pad_token_id) == \
        (tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072  # llava-hf/llava-1.5-7b-hf's count


def test_a_cell_short_of_disk_is_refused_before_it_loads_anything(monkeypatch, tmp_path):
    # plan on llava-1.5-7b's shipped config: the full fine-tune's run directory holds its 13.13 GiB of bf16
    # weights twice and 13.13 GiB of 8-bit optimizer states
    monkeypatch.setattr(gpu_check.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(0, 0, 30 * 2**30))
    monkeypatch.setattr(gpu_check, "train", lambda *a: pytest.fail("a refused cell must not train"))
    paths = {"checkpoint": "llava-hf/llava-1.5-7b-hf", "data": tmp_path / "records.json", "work": tmp_path,
             "max_length": None}
    row = gpu_check.measure_cell("full", paths, gpu_check.parse_args([]), ["0"])
    assert (row["status"], row["quant"], row["plan_trainable"], row["plan_gib"], row["paged_optimizer_gib"]) == \
        ("failed", "none", 7_050_828_800, 44.03, 13.13)  # logits on plan.labelled_tokens' 512 a sample
    assert row["error"] == (f"its run directory needs ~40.4 GiB of disk (checkpoint, optimizer states, final/), "
                            f"30.0 GiB free in {tmp_path}")


def _plan(quant: str, trainable: int, total_gib: float, optimizer_gib: float) -> dict:
    return {"quant": quant, "params": {"trainable": {"total": trainable}},
            "memory_gib": {"total": total_gib, "optimizer": optimizer_gib}}


def _summary(trainable: int, peak_mb: float, tokens_per_s: float, tflops: float) -> dict:
    return {"status": "completed", "params": {"total": 7_063_427_072, "trainable": {"total": trainable},
                                              "components": {"llm": {"quantized": 6_476_005_376}}},
            "train": {"tokens_per_s": tokens_per_s, "tflops": tflops, "peak_tflops": 989.4,
                      "mfu": float(f"{tflops / 989.4:.6g}"), "peak_tflops_source": "table: NVIDIA H200 (SXM)",
                      "steps": 10, "tokens": 81920, "padding_efficiency": 1.0, "final_loss": 10.4,
                      "peak_mem_mb": peak_mb}}


def test_a_row_divides_the_peak_by_the_estimate_less_paged_optimizer_states():
    row = gpu_check.cell_result("frozen_lora", _plan("nf4", 61_018_112, 14.2, 0.11),
                                _summary(61_018_112, 12.5 * 1024, 5432.1, 346.29),
                                measured_memory=True, optim="paged_adamw_8bit")
    assert (row["peak_gib"], row["plan_gib"], row["paged_optimizer_gib"], row["ratio"]) == (12.5, 14.2, 0.11, 0.887)
    assert (row["mfu"], row["tokens_per_s"], row["trainable"], row["plan_trainable"]) == \
        (0.35, 5432.1, 61_018_112, 61_018_112)
    unpaged = gpu_check.cell_result("frozen_lora", _plan("nf4", 1, 14.2, 0.11), _summary(1, 12.5 * 1024, 1.0, 1.0),
                                    measured_memory=True, optim="adamw_torch")
    assert (unpaged["paged_optimizer_gib"], unpaged["ratio"]) == (0.0, 0.88)
    cpu = gpu_check.cell_result("full", _plan("none", 1, 1.0, 0.0), _summary(1, 300.0, 1.0, 1.0),
                                measured_memory=False, optim="adamw_torch")
    assert (cpu["peak_gib"], cpu["ratio"]) == (None, None)
    failed = gpu_check.cell_result("full", _plan("none", 5, 60.0, 12.6),
                                   {"status": "failed", "error": "OutOfMemoryError: CUDA out of memory"},
                                   measured_memory=True, optim="paged_adamw_8bit")
    assert (failed["status"], failed["error"], failed["trainable"], failed["ratio"], failed["plan_trainable"]) == \
        ("failed", "OutOfMemoryError: CUDA out of memory", None, None, 5)


def test_the_report_of_a_crafted_result_set():
    cells = [("frozen_frozen", "nf4", 21_040_128, 9.12, 11.0, 0.04, 9876.4, 396.0),
             ("frozen_lora", "nf4", 61_018_112, 12.5, 14.2, 0.11, 5432.1, 346.29),
             ("full", "none", 6_759_546_880, 41.0, 60.25, 12.6, 3100.0, 250.0)]
    rows = []
    for cell, quant, trainable, peak, plan_gib, optimizer, tokens_per_s, tflops in cells:
        row = gpu_check.cell_result(cell, _plan(quant, trainable, plan_gib, optimizer),
                                    _summary(trainable, peak * 1024, tokens_per_s, tflops),
                                    measured_memory=True, optim="paged_adamw_8bit")
        row["plan_mfu"], row["last_checkpoint_gib"] = 0.35, 27.93 if cell == "full" else 0.12
        rows.append(row)
    rows.insert(2, gpu_check.cell_result("unfrozen_lora", _plan("nf4", 364_320_768, 20.0, 0.6),
                                         {"status": "failed", "error": "OutOfMemoryError: CUDA out of memory"},
                                         measured_memory=True, optim="paged_adamw_8bit"))
    ddp = {"cell": "frozen_lora", "gpus": 2, "tokens_per_s": 10500.0, "one_gpu_tokens_per_s": 5432.1, "ratio": 1.933}
    logits = {"cell": "frozen_lora", "labelled_tokens": 1430,
              "on": {"peak_gib": 12.5, "plan_gib": 14.2, "plan_logits_gib": 1.02},
              "off": {"peak_gib": 13.8, "plan_gib": 14.65, "plan_logits_gib": 1.47},
              "ratio": 0.906, "saved_gib": 1.3, "plan_saved_gib": 0.45}
    result = {"shape": "7b", "batch": 4, "seq_len": 2048, "steps": 10, "device_name": "NVIDIA H200", "cells": rows,
              "logits": logits, "ddp": ddp,
              "verdicts": gpu_check.verdicts(rows, ddp, 371.6, steps=10, on_gpu=True, logits=logits)}
    # ratios: 9.12 / (11 - 0.04) = 0.832, 12.5 / (14.2 - 0.11) = 0.887, 41 / (60.25 - 12.6) = 0.860;
    # MFU = achieved / peak: 396 / 989.4 = 0.400, 346.29 / 989.4 = 0.350, 250 / 989.4 = 0.253
    assert gpu_check.format_report(result).splitlines() == [
        "gpu_check: llava-1.5-7b-shaped model (7b, 7,063,427,072 parameters, random weights), train=rtx4090_qlora "
        "at batch 4 x 2048 tokens, 10 steps a cell, on NVIDIA H200",
        "",
        "cell           quant     trainable peak GiB plan GiB paged opt ratio  tokens/s    MFU peak TFLOP/s  "
        "peak source",
        "-" * 111,
        "frozen_frozen  nf4      21,040,128     9.12    11.00      0.04  0.83     9,876  0.400        989.4  "
        "table: NVIDIA H200 (SXM)",
        "frozen_lora    nf4      61,018,112    12.50    14.20      0.11  0.89     5,432  0.350        989.4  "
        "table: NVIDIA H200 (SXM)",
        "unfrozen_lora  nf4   failed: OutOfMemoryError: CUDA out of memory",
        "full           none  6,759,546,880    41.00    60.25     12.60  0.86     3,100  0.253        989.4  "
        "table: NVIDIA H200 (SXM)",
        "ratio = peak ÷ (plan − paged opt): a paged optimizer keeps its states in CUDA managed memory, which "
        "max_memory_allocated does not count",
        "full: tokens/s and MFU count writing its last checkpoint (27.9 GiB) as training time",
        "",
        "LM head on the labelled tokens only (1430 a sample), cell frozen_lora: peak 12.50 GiB (plan 14.20, logits "
        "1.02) against 13.80 GiB on every position (plan 14.65, logits 1.47): x0.906, 1.30 GiB saved (plan: 0.45)",
        "DDP over NCCL, 2 GPUs, cell frozen_lora: 10,500 tokens/s against 5,432 on one GPU: x1.93",
        "",
        "verdict runs   FAIL  every cell trained 10 steps; not: unfrozen_lora",
        "verdict params PASS  plan's trainable count is the runner's in every cell",
        "verdict memory PASS  peak ÷ plan in [0.70, 1.00] in every cell (0.83-0.89)",
        "verdict MFU    FAIL  ≥ plan.mfu 0.35, what plan's time estimates assume, in every cell; below: full 0.253",
        "verdict logits PASS  peak with the LM head on the labelled tokens only ÷ on every position < 1: x0.906",
        "verdict DDP    PASS  2 GPUs ≥ 1.8 x one: x1.93",
        "verdict time   PASS  the whole check in ≤ 480 s: 372 s",
    ]
    rows[0]["ratio"], rows[1]["trainable"] = 1.04, 61_018_113
    lines = [gpu_check.format_verdict(v) for v in gpu_check.verdicts(rows, {"skipped": "1 CUDA device visible"},
                                                                      500.0, steps=10, on_gpu=True)]
    assert lines[1:] == [
        "verdict params FAIL  plan's trainable count is the runner's in every cell; differ: frozen_lora 61,018,113 vs "
        "61,018,112",
        "verdict memory FAIL  peak ÷ plan in [0.70, 1.00] in every cell (0.86-1.04); outside: frozen_frozen 1.04",
        "verdict MFU    FAIL  ≥ plan.mfu 0.35, what plan's time estimates assume, in every cell; below: full 0.253",
        "verdict logits n/a   not measured",
        "verdict DDP    n/a   1 CUDA device visible",
        "verdict time   FAIL  the whole check in ≤ 480 s: 500 s",
    ]


@pytest.mark.slow
def test_the_tiny_check_trains_every_cell_on_the_cpu_through_the_runner(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert gpu_check.main(["--device", "cpu", "--shape", "tiny", "--steps", "2", "--work", str(tmp_path / "w"),
                           "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["cells"]
    assert [(r["cell"], r["quant"], r["status"], r["steps"]) for r in rows] == [
        ("frozen_frozen", "nf4", "completed", 2), ("frozen_lora", "nf4", "completed", 2),
        ("unfrozen_lora", "nf4", "completed", 2), ("full", "none", "completed", 2)]
    # tiny sizes: vision 32 wide, 3 blocks (the last unused: feature layer -2), 56 px / 14; LM 64 wide, MLP 128,
    # 2 layers, vocabulary 640; LoRA r=16 on every LM linear
    projector = 32 * 64 + 64 + 64 * 64 + 64
    lora = 2 * 16 * (4 * (64 + 64) + 2 * (64 + 128) + (128 + 64))
    block = 4 * (32 * 32 + 32) + 2 * 2 * 32 + (32 * 64 + 64) + (64 * 32 + 32)
    tower = 3 * 14 * 14 * 32 + 32 + 17 * 32 + 2 * 32 + 2 * block  # patches, CLS, positions, pre-norm, used blocks
    lm = 640 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64 + 640 * 64
    assert [r["trainable"] for r in rows] == [projector, projector + lora, projector + lora + tower,
                                              projector + tower + lm] == [6272, 41088, 77632, 206976]
    assert all(r["trainable"] == r["plan_trainable"] for r in rows)
    assert [r["total"] for r in rows] == [tower + block + 2 * 32 + projector + lm] * 4 == [215584] * 4
    assert [r["quantized"] for r in rows] == [2 * (4 * 64 * 64 + 3 * 64 * 128)] * 3 + [0]
    for r in rows:  # every sample is cut to exactly model.max_length: batch 4 x 128 tokens a step, no padding
        assert (r["tokens"], r["padding_efficiency"], r["peak_gib"], r["ratio"]) == (2 * 4 * 128, 1.0, None, None)
        assert r["tokens_per_s"] > 0 and r["mfu"] == pytest.approx(r["tflops"] / r["peak_tflops"], rel=1e-4)
    assert result["ddp"] == result["logits"] == {"skipped": "not measured on the CPU"}
    # the answer fills every sample after the system prompt, the 16 image tokens and the question: plan counts
    # those logits (53 with the tiny tokenizer)
    assert 128 // 4 < result["labelled_tokens"] < 128 - 16
    assert [(v["target"], v["passed"]) for v in result["verdicts"]] == [
        ("runs", True), ("params", True), ("memory", None), ("MFU", None), ("logits", None), ("DDP", None),
        ("time", True)]
    printed = capsys.readouterr().out.splitlines()  # a library may log to stdout before the report
    report = printed[next(k for k, line in enumerate(printed) if line.startswith("gpu_check: ")):]
    assert report[0] == ("gpu_check: llava-1.5-7b-shaped model (tiny, 215,584 parameters, random weights), "
                         "train=rtx4090_qlora at batch 4 x 128 tokens, 2 steps a cell, on the CPU")
    assert [line.split()[:3] for line in report[4:8]] == [["frozen_frozen", "nf4", "6,272"],
                                                          ["frozen_lora", "nf4", "41,088"],
                                                          ["unfrozen_lora", "nf4", "77,632"],
                                                          ["full", "none", "206,976"]]
    assert report[-7] == "verdict runs   PASS  every cell trained 2 steps"
    assert not (tmp_path / "w" / "runs" / "full").exists()  # each run directory goes once its summary is read
    saved = json.loads((tmp_path / "w" / "model" / "config.json").read_text())
    assert (saved["text_config"]["hidden_size"], saved["image_seq_length"], saved["image_token_index"]) == (64, 16, 4)


@pytest.mark.slow
def test_on_cuda_a_cell_runs_in_its_own_process_and_leaves_the_summary_the_check_reads(tmp_path):
    # The GPU path's launcher, run on the CPU: `python -m vlmablate` with the cell's overrides and hydra.run.dir.
    checkpoint = gpu_check.build_checkpoint(tmp_path / "model", "tiny", "cpu")
    weights = (checkpoint / "model.safetensors").stat().st_mtime_ns
    assert gpu_check.build_checkpoint(tmp_path / "model", "tiny", "cpu") == checkpoint  # a second check reuses it
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == weights
    data = gpu_check.write_data(tmp_path / "data", 4, 56, 128)
    overrides = gpu_check.cell_overrides("frozen_lora", checkpoint, data, tmp_path, steps=1, device="cpu",
                                         max_length=128)
    summary = gpu_check.train(tmp_path / "runs" / "frozen_lora", overrides, ["0"])
    assert (summary["status"], summary["run_dir"], summary["train"]["steps"], summary["train"]["tokens"]) == \
        ("completed", str(tmp_path / "runs" / "frozen_lora"), 1, 4 * 128)
    assert gpu_check.last_checkpoint_gib(tmp_path / "runs" / "frozen_lora") < 0.01
    assert (tmp_path / "runs" / "frozen_lora.log").stat().st_size > 0
    broken = gpu_check.train(tmp_path / "runs" / "broken", [*overrides, "quant=nf5"], ["0"])  # Hydra refuses it
    assert broken["status"] == "failed"
    assert broken["error"].startswith("exit 1, no summary.json: ") and "nf5" in broken["error"]
