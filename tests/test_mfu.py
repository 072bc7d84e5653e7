"""MFU in every run and FLOPs in the plan: the GPU table by device name, the peak's precedence, the cached CPU
measurement, the arithmetic on a hand-made model, the summary of a real tiny run, the sweep report's columns,
W&B's summary, and `python -m vlmablate.plan`'s FLOPs per token against `flops_from_config`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import ROOT, compose_run
from transformers import LlavaConfig, LlavaNextConfig

from vlmablate.model.flops import Matmul, ModelShapes, flops_from_config
from vlmablate.model.plan import resolve_plan
from vlmablate.plan import estimate_compute, format_compute, format_grid, grid_cells, model_config, plan_cell
from vlmablate.train import mfu
from vlmablate.train.mfu import GPU_PEAKS, Peak, device_peak, gpu_peak, mfu_report, model_shapes, sample_shapes


@pytest.mark.parametrize("name,key", [
    ("NVIDIA GeForce RTX 4090", "rtx4090"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA A100-SXM4-40GB", "a100"),
    ("NVIDIA A100 80GB PCIe", "a100"),
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA RTX A6000", "a6000"),
    ("NVIDIA H200", "h200"),
    # other parts with other peaks, which the table must not pass off as one of its own
    ("NVIDIA GeForce RTX 4090 D", None),
    ("NVIDIA GeForce RTX 4090 Laptop GPU", None),
    ("NVIDIA H100 PCIe", None),
    ("NVIDIA H100 NVL", None),
    ("NVIDIA H200 NVL", None),
    ("NVIDIA L40", None),
    ("NVIDIA RTX 6000 Ada Generation", None),
    ("NVIDIA A10", None),
    ("Tesla V100-SXM2-16GB", None),
])
def test_the_gpu_table_by_device_name(name, key):
    entry = gpu_peak(name)
    assert (entry.key if entry else None) == key


def test_the_table_holds_dense_bf16_peaks():
    assert {k: p.tflops for k, p in GPU_PEAKS.items()} == {
        "rtx4090": 165.2, "a100": 312.0, "h100": 989.4, "l40s": 362.05, "a6000": 154.8, "h200": 989.4}
    assert all("dense" in p.source for p in GPU_PEAKS.values())


def test_the_override_comes_first_then_the_table(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_peak(None, "cuda", tmp_path) == Peak(989.4, "table: NVIDIA H100 (SXM), bf16 dense (H100 whitepaper, "
                                                              "dense)")
    assert device_peak(500, "cuda", tmp_path) == Peak(500.0, "config: train.peak_tflops")
    assert device_peak(0.05, "cpu", tmp_path) == Peak(0.05, "config: train.peak_tflops")
    assert not (tmp_path / mfu.CPU_PEAK_FILE).exists()  # overridden: nothing measured
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA B200")
    unknown = device_peak(None, "cuda", tmp_path)
    assert unknown.tflops is None and "unknown GPU 'NVIDIA B200'" in unknown.source
    assert "train.peak_tflops=" in unknown.source


def test_the_cpu_peak_is_measured_once_and_cached(monkeypatch, tmp_path):
    first = device_peak(None, "cpu", tmp_path)
    assert first.tflops > 0 and first.source.startswith("measured: fp32 1024x1024 matmul, best of 5")
    cache = json.loads((tmp_path / mfu.CPU_PEAK_FILE).read_text())
    key = f"{mfu.cpu_name()} | torch threads {torch.get_num_threads()}"
    assert cache[key]["tflops"] == first.tflops

    def no_measuring():
        raise AssertionError("the cached peak must be read, not measured again")

    monkeypatch.setattr(mfu, "measure_cpu_tflops", no_measuring)
    assert device_peak(None, "cpu", tmp_path) == first
    # another thread count is another key: measured once more, the first entry kept
    monkeypatch.setattr(mfu, "measure_cpu_tflops", lambda: 0.123)
    monkeypatch.setattr(mfu.torch, "get_num_threads", lambda: 97)
    assert device_peak(None, "cpu", tmp_path).tflops == 0.123
    assert len(json.loads((tmp_path / mfu.CPU_PEAK_FILE).read_text())) == 2


def test_a_matmul_measurement_is_positive_and_leaves_the_runs_random_stream_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert 0 < mfu.measure_cpu_tflops(size=256, repeats=2) < 100  # no CPU does 100 fp32 TFLOP/s
    assert torch.equal(torch.rand(3), expected)  # measured before training: dropout must draw what it would have


# --- the arithmetic on a model whose FLOPs are written by hand ------------------------------------------------

# No blocks: a 3·4 patch "convolution" over 5 patches (frozen, forward only: 2·5·12 = 120 FLOPs a crop) and a
# trainable 10 → 100 lm_head (forward 2·1000 and weight gradient 2·1000 a token; nothing trains upstream of it).
HAND = ModelShapes(patch=Matmul(3, 4), vision_embeddings_trainable=False, vision_blocks=(), patches=5,
                   prefix_tokens=0, feature_tokens=5, projector=(), connector_trainable=False,
                   llm_embeddings_trainable=False, llm_blocks=(), final_norm_trainable=False,
                   lm_head=Matmul(10, 100, trainable=True))


def test_mfu_arithmetic_on_fixed_flops_and_time():
    shapes = Counter({(100, 0): 3, (50, 1): 2})  # 400 tokens; two samples with one crop each
    report = mfu_report(HAND, shapes, seconds=0.5, peak=Peak(1e-5, "test"), devices=2)
    flops = 4000 * 400 + 120 * 2
    assert report["flops"] == flops == 1_600_240
    assert report["flops_per_token"] == 4000.6
    assert report["tflops"] == pytest.approx(flops / 0.5 / 1e12, rel=1e-6)  # 3.20048e-6
    assert report["mfu"] == pytest.approx(3.20048e-6 / (1e-5 * 2), rel=1e-6)  # over the peak of both devices
    assert report["peak_tflops"] == 1e-5 and report["peak_tflops_source"] == "test"


def test_an_unknown_peak_leaves_mfu_null_with_its_reason(caplog):
    report = mfu_report(HAND, Counter({(10, 0): 1}), seconds=1.0, peak=Peak(None, "unknown GPU 'X'"), devices=1)
    assert report["mfu"] is None and report["tflops"] == pytest.approx(40_000 / 1e12)
    assert report["mfu_unavailable"] == "unknown GPU 'X'" and "unknown GPU 'X'" in caplog.text
    shapes, why = model_shapes(torch.nn.Linear(2, 2))  # not a Llava: no count, no crash
    assert shapes is None and why.startswith("FLOPs not counted: AttributeError")
    report = mfu_report(shapes, Counter({(10, 0): 1}), 1.0, Peak(1.0, "x"), 1, why_not=why)
    assert report["flops_per_token"] is None and report["mfu"] is None and report["mfu_unavailable"] == why


def test_sample_shapes_read_real_lengths_and_crops():
    llava = LlavaConfig()
    image = llava.image_token_index
    inputs = {"input_ids": torch.tensor([[1, image, image, 5, 0], [1, 5, 6, 0, 0], [1, image, 7, 8, 9]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    assert sample_shapes(inputs, llava) == [(4, 1), (3, 0), (5, 1)]
    # LlavaNext: the base image plus the tiles of the grid its size selects (336 x 672: 1 x 2; 672 x 672: 2 x 2)
    nxt = LlavaNextConfig()
    inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == image, nxt.image_token_index)
    inputs["image_sizes"] = torch.tensor([[336, 672], [672, 672]])  # the two image rows, in batch order
    assert sample_shapes(inputs, nxt) == [(4, 3), (3, 0), (5, 5)]


def test_training_time_ends_with_the_last_step_not_the_checkpoint_after_it(monkeypatch):
    """Trainer writes its last checkpoint after the last step's callbacks; that write is not training time."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    from vlmablate.train import trainer as trainer_mod

    clock = iter([10.0, 11.0, 12.5, 99.0])  # train begins, step 1 ends, step 2 ends, train ends (after saving)
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: next(clock))
    timer, control = trainer_mod.TrainTimer(), TrainerControl()
    timer.on_train_begin(None, SimpleNamespace(global_step=0, max_steps=2), control)
    for step in (1, 2):
        timer.on_step_end(None, SimpleNamespace(global_step=step, max_steps=2), control)
    timer.on_train_end(None, SimpleNamespace(global_step=2, max_steps=2), control)
    assert timer.seconds == 2.5 and control.should_log


# --- a real run ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_runs_summary_reports_consistent_flops_and_mfu(run_cell):
    s = run_cell("freeze=lora_llm", "train.max_steps=4", "train.save_steps=4", "eval=none", name="mfu")
    t = s["train"]
    assert s["status"] == "completed"
    assert t["peak_tflops"] > 0 and t["peak_tflops_source"].startswith("measured: fp32")  # train=cpu_tiny: the CPU
    assert t["flops_per_token"] > 0 and t["tflops"] > 0 and 0 < t["mfu"] < 1
    training_s = t["wall_clock_s"] - t["setup_s"]
    assert t["flops"] == pytest.approx(t["flops_per_token"] * t["tokens"], rel=1e-6)
    assert t["flops_per_token"] * t["tokens"] / training_s == pytest.approx(t["tflops"] * 1e12, rel=1e-2)
    assert t["flops_per_token"] * t["tokens_per_s"] == pytest.approx(t["tflops"] * 1e12, rel=1e-3)
    assert t["mfu"] == pytest.approx(t["tflops"] / t["peak_tflops"], rel=1e-4)
    # resumed at step 4 to step 6: `tokens` counts the whole run, the rates only what this attempt trained
    r = run_cell("freeze=lora_llm", "train.max_steps=6", "train.save_steps=4", "eval=none", "train.resume=auto",
                 name="mfu")["train"]
    trained_now, training_s = r["tokens"] - t["tokens"], r["wall_clock_s"] - r["setup_s"]
    assert r["resumed_from"].endswith("checkpoint-4") and 0 < trained_now < r["tokens"]
    assert r["tokens_per_s"] == pytest.approx(trained_now / training_s, rel=1e-2)
    assert r["flops"] == pytest.approx(r["flops_per_token"] * trained_now, rel=1e-6)
    assert r["flops"] / training_s == pytest.approx(r["tflops"] * 1e12, rel=1e-2)


def test_the_sweep_report_has_the_compute_columns(tmp_path):
    from vlmablate.report.compare import write_report

    for seed, mfu_value in ((0, 0.2), (1, 0.4)):
        run = tmp_path / "cell" / f"seed{seed}"
        run.mkdir(parents=True)
        train = {"wall_clock_s": 5.0, "tokens_per_s": 50.0, "flops_per_token": 3.5e10, "tflops": 60.0 + seed,
                 "mfu": mfu_value, "final_loss": 1.0}
        (run / "summary.json").write_text(json.dumps({"status": "completed", "seed": seed, "train": train,
                                                      "cell": {"name": "cell", "label": "CELL"}}))
    (row,) = write_report(tmp_path, n_boot=10)["rows"]
    assert (row["flops_per_token"], row["tflops"], row["mfu"]) == (3.5e10, 60.5, pytest.approx(0.3))
    table = (tmp_path / "comparison.md").read_text().split("## The cells\n\n")[1]  # after the decision
    header, _, line = table.splitlines()[:3]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in line.split("|")]))
    assert (cells["FLOPs/token"], cells["TFLOP/s"], cells["MFU"]) == ("3.5e+10", "60.5", "0.3")
    assert "flops_per_token,tflops,mfu" in (tmp_path / "comparison.csv").read_text().splitlines()[0]


def test_wandb_summary_carries_the_compute_keys(tmp_path):
    from vlmablate.report.wandb_log import finish_wandb

    class FakeRun:
        summary: dict = {}
        settings = type("Settings", (), {"mode": "online"})()
        dir = str(tmp_path / "files")

        def finish(self):
            pass

    run = FakeRun()
    run.summary = {}
    finish_wandb(run, {"status": "completed", "train": {"flops_per_token": 1.5, "tflops": 2.0, "mfu": 0.25,
                                                         "peak_tflops": 8.0, "peak_tflops_source": "config"}})
    assert {k: run.summary[k] for k in ("train.flops_per_token", "train.tflops", "train.mfu", "train.peak_tflops")} \
        == {"train.flops_per_token": 1.5, "train.tflops": 2.0, "train.mfu": 0.25, "train.peak_tflops": 8.0}


def test_the_new_settings_leave_the_config_hash_alone():
    from vlmablate.config import config_hash
    from vlmablate.train.stages import learning_config

    _, base = compose_run("cell=frozen_lora")
    _, other = compose_run("cell=frozen_lora", "train.peak_tflops=100", "plan.gpu=a100", "plan.mfu=0.5",
                           "data.size=1000")
    assert config_hash(learning_config(base)) == config_hash(learning_config(other))
    hashed = learning_config(base)  # absent, not only equal: the hashes made before these keys existed stand
    assert "peak_tflops" not in hashed["train"] and "size" not in hashed["data"]
    assert not {"gpu", "mfu"} & set(hashed["plan"]) and hashed["plan"]["gpu_gb"] == 24.0


# --- the plan --------------------------------------------------------------------------------------------------

SEVEN_B = ("model=llava16_mistral_7b", "quant=nf4", "train=rtx4090_qlora", "data=llava_mix665k", "eval=none")


def cell_flops_per_token(cfg, seq_len: int, crops: int) -> float:
    from vlmablate.train.runner import resolve_model

    plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage, lr_scale=cfg.train.lr_scale)
    config = model_config(resolve_model(cfg), plan.projector_type)
    return flops_from_config(config, plan, seq_len=seq_len, crops=crops).per_token()["total"].total


def test_plan_compute_for_the_issues_example():
    """llava-v1.6-mistral-7b, nf4, a 4090, mix665k: 4096 tokens a sample (model.max_length), 5 crops (2 x 2 grid)."""
    cfg, _ = compose_run(*SEVEN_B)
    compute = plan_cell(cfg)["compute"]
    expected = cell_flops_per_token(cfg, 4096, 5)
    assert compute["flops_per_token"] == expected
    assert (compute["seq_len"], compute["crops"], compute["samples"]) == (4096, 5, 665_298)
    assert compute["tokens_per_s"] == pytest.approx(165.2e12 * 0.35 / expected)
    assert compute["epoch_seconds"] == pytest.approx(665_298 * 4096 / compute["tokens_per_s"])
    text = format_compute(compute)
    assert f"≈ {expected:.4g} (" in text and "665,298 samples × 4096 tokens" in text and "MFU 0.35" in text
    # another GPU, MFU and length; a data config without a size gives the time per 1M tokens only
    cfg, _ = compose_run("model=llava15_7b", "quant=nf4", "train=rtx4090_qlora", "eval=none", "plan.gpu=a100",
                         "plan.mfu=0.5", "plan.seq_len=1024")
    compute = estimate_compute(cfg, model_config(cfg.model, "mlp2x_gelu"))
    assert compute["flops_per_token"] == cell_flops_per_token(cfg, 1024, 1)
    assert compute["seconds_per_1m_tokens"] == pytest.approx(1e6 * compute["flops_per_token"] / (312e12 * 0.5))
    assert compute["epoch_seconds"] is None and "no time per epoch" in format_compute(compute)


def test_plan_rejects_an_unknown_gpu():
    from vlmablate.config import ConfigError

    cfg, _ = compose_run(*SEVEN_B, "plan.gpu=tpu")
    with pytest.raises(ConfigError, match="plan.gpu='tpu' is not one of rtx4090, a100"):
        estimate_compute(cfg, None)


@pytest.mark.slow
def test_the_plan_command_prints_each_cells_flops_per_token(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vlmablate.plan", *SEVEN_B, f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    cfg, _ = compose_run(*SEVEN_B)
    chosen = re.search(r"training FLOPs per token ≈ (\S+) ", out).group(1)
    assert chosen == f"{cell_flops_per_token(cfg, 4096, 5):.4g}"
    cells = grid_cells(cfg, lambda extra: compose_run(*SEVEN_B, *extra)[0])
    for name, cell in cells:
        line = next(line for line in out.splitlines() if line.startswith(name))
        cell_cfg, _ = compose_run(*SEVEN_B, f"vision={cell['vision']}", f"freeze={cell['freeze']}",
                                  f"quant={cell['quant']}")
        assert line.split()[-3] == f"{cell_flops_per_token(cell_cfg, 4096, 5):.4g}"
    assert format_grid(cells, 24) in out  # what main prints is what the functions tested above return
