"""GPU check: the reference freeze grid on a llava-1.5-7b-shaped model with random weights, a few QLoRA steps a cell.

    python benchmarks/gpu_check.py [--cells frozen_frozen frozen_lora unfrozen_lora full] [--steps 10]
                                   [--out gpu_check.json] [--work DIR]
    python benchmarks/gpu_check.py --device cpu --shape tiny --steps 2      # the same code path on the CPU

The model is built from the shipped llava-1.5-7b config (`model/hub_configs/`, nothing downloaded) with random
bf16 weights, on the GPU, and saved once as a local checkpoint (14 GB at 7B); every cell then runs `python -m
vlmablate model=llava15_7b model.checkpoint=THAT quant=nf4 train=rtx4090_qlora cell=CELL` in its own process
(peak memory and the CUDA context start clean), on a synthetic LLaVA JSON set whose every sample fills
`model.max_length` (2048 tokens at the preset's batch of 4), most of them the answer: plan is told how many are
labelled (`plan.labelled_tokens`, counted on the first record as the runner encodes it). The full fine-tune cell
trains an unquantized model, as `python -m vlmablate.plan`'s grid plans it. Its tokenizer is the tiny one
(`model/tiny.py`): token ids change nothing in the model's shapes or cost, so the config's `<image>` and pad ids
are set to the tokenizer's.

Printed: one row per cell (trainable parameters; peak memory, `torch.cuda.max_memory_allocated`, against
`plan`'s estimate; tokens/s and MFU against the GPU table's peak, from the run's summary.json), then the
`--logits-cell` run again with `train.labelled_logits_only=false` (the LM head over every position), its peak
beside the cell's and each beside plan's estimate, then DDP over NCCL on two GPUs against one (where two are
visible), then a verdict per target: every cell trains; plan's trainable count is the runner's; peak memory
within MEMORY_BAND of the estimate; MFU at least the `plan.mfu` that plan's time estimates assume; the LM head
on the labelled tokens peaks lower than on all of them; DDP at least DDP_TARGET times one GPU; the whole check
within BUDGET_S. `--out` writes it all as JSON. Without CUDA it prints SKIP_MESSAGE and exits 0. On the CPU
(`--device cpu`, tiny only) the cells run in this process, with torch's AdamW, and no memory or MFU target is
judged: it checks the script.

Time on one H100/H200 (estimated, not yet measured): building and saving the model ~1 min; each QLoRA cell ~50 s
(start-up, loading and quantizing 14 GB, 10 steps); the full fine-tune ~1.5 min, since its run writes the whole
model twice (the last checkpoint with its 8-bit optimizer states, ~28 GB, and final/, 14 GB); the DDP run ~1
min; the full-logits run again ~50 s. About 7 minutes in all, within the issue's 8. Disk: up to ~56 GB at once
(the random checkpoint plus the full fine-tune's run directory); each run directory is removed once its summary
is read, a cell whose run directory would not fit on the disk is refused before it starts, and a model left in
`--work` by an earlier check is used again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

CELLS = ("frozen_frozen", "frozen_lora", "unfrozen_lora", "full")
LLAVA15 = "llava-hf/llava-1.5-7b-hf"
SKIP_MESSAGE = "gpu_check: no CUDA device; nothing to measure (--device cpu --shape tiny checks the script itself)"
# A llava-1.5-shaped model small enough for the CPU: CLIP tower, mlp2x_gelu projector and Llama LM as the 7B's.
TINY = {"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       image_size=56, projection_dim=32),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=640),
        "max_length": 128}
ANSWER_WORDS = "the red circle is left of the blue square and".split()  # one tiny-tokenizer token or two each
BUDGET_S = 480  # the issue: one command in at most 8 minutes on one large GPU
# plan's estimate must hold (a cell it says fits must not run out of memory) without refusing much that fits
MEMORY_BAND = (0.70, 1.00)
DDP_TARGET = 1.8  # two GPUs over NVLink: LoRA and projector gradients are small, so near-linear scaling
CHECKPOINT_NOTE_GIB = 1.0  # a last checkpoint this large weighs on a few steps' tokens/s


# --- arguments ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shape", choices=("7b", "tiny"), default="7b",
                        help="7b: llava-1.5-7b's shipped config; tiny: the same architecture at test size")
    parser.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS))
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps a cell (no gradient accumulation)")
    parser.add_argument("--ddp-cell", choices=CELLS, default="frozen_lora",
                        help="the cell run again on two GPUs, when two are visible")
    parser.add_argument("--logits-cell", choices=CELLS, default="frozen_lora",
                        help="the cell run again with the LM head on every position "
                             "(train.labelled_logits_only=false)")
    parser.add_argument("--work", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.device == "cpu" and args.shape == "7b":
        parser.error("--device cpu runs --shape tiny only (a 7B model trains for hours on a CPU)")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [d for d in named.split(",") if d.strip()]
    return [str(k) for k in range(torch.cuda.device_count())]


# --- the model and the data ---------------------------------------------------------------------------------


def shape_config(shape: str) -> tuple[dict, int | None]:
    """(llava-1.5-7b's shipped config dict at `shape`, model.max_length override or None)."""
    from vlmablate.plan import load_config_dict

    config = load_config_dict(LLAVA15)
    if shape == "7b":
        return config, None
    config["vision_config"].update(TINY["vision"])
    config["text_config"].update(TINY["text"])
    config["image_seq_length"] = (TINY["vision"]["image_size"] // config["vision_config"]["patch_size"]) ** 2
    return config, TINY["max_length"]


def llava_config(shape: str, tokenizer):
    """The Llava config of `shape`, its `<image>` and pad ids those of `tokenizer` (no shape depends on them)."""
    from transformers import AutoConfig

    from vlmablate.model.tiny import IMAGE_TOKEN

    data, _ = shape_config(shape)
    data["image_token_index"] = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    data["pad_token_id"] = data["text_config"]["pad_token_id"] = tokenizer.pad_token_id
    return AutoConfig.for_model(data.pop("model_type"), **data)


def build_checkpoint(folder: Path, shape: str, device: str) -> Path:
    """A checkpoint folder of `shape` with random bf16 weights (initialised on `device`) and the tiny processor;
    one left complete in `--work` by an earlier check is used again."""
    from transformers import LlavaForConditionalGeneration

    from vlmablate.model.tiny import TinySpec, build_tiny_processor, train_tiny_tokenizer

    done = folder / "gpu_check_shape.json"  # written last: the folder is complete
    if done.exists() and json.loads(done.read_text()) == {"shape": shape}:
        return folder
    tokenizer = train_tiny_tokenizer()
    config = llava_config(shape, tokenizer)
    tokenizer.model_max_length = config.text_config.max_position_embeddings
    torch.manual_seed(0)
    with torch.device(device):  # on the GPU, HF's initialisation of 7B parameters takes seconds
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    vision = config.vision_config
    processor = build_tiny_processor(TinySpec(image_size=vision.image_size, patch_size=vision.patch_size), tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    done.write_text(json.dumps({"shape": shape}))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the cells run in their own processes and need the whole GPU
    return folder


def write_data(folder: Path, records: int, image_size: int, max_length: int) -> Path:
    """A LLaVA JSON set whose samples are all longer than `max_length`: every one is cut to exactly that."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    answer = " ".join(ANSWER_WORDS[k % len(ANSWER_WORDS)] for k in range(max_length))
    rows = []
    for k in range(records):
        Image.new("RGB", (image_size, image_size), (40 * k % 256, 90, 160)).save(folder / "images" / f"{k}.png")
        rows.append({"id": f"gpu-check-{k}", "image": f"images/{k}.png",
                     "conversations": [{"from": "human", "value": "<image>\nDescribe the image in detail."},
                                       {"from": "gpt", "value": answer}]})
    path = folder / "records.json"
    path.write_text(json.dumps(rows))
    return path


# --- one cell -----------------------------------------------------------------------------------------------


def labelled_tokens(checkpoint: Path, data: Path, cfg) -> int:
    """Labelled tokens of the data's first record as the runner encodes it (every record is as long)."""
    from transformers import AutoProcessor

    from vlmablate.data.dataset import LlavaJsonDataset, load_llava_json
    from vlmablate.data.templates import IGNORE_INDEX
    from vlmablate.train.runner import image_aspect_of

    dataset = LlavaJsonDataset(load_llava_json(data)[:1], source_path=data, image_root=data.parent,
                               processor=AutoProcessor.from_pretrained(checkpoint), template=cfg.stage.template,
                               max_length=cfg.model.max_length, image_aspect=image_aspect_of(cfg))
    return int((dataset[0]["labels"][1:] != IGNORE_INDEX).sum())


def cell_overrides(cell: str, checkpoint: Path, data: Path, work: Path, *, steps: int, device: str,
                   max_length: int | None, labelled: int | None = None) -> list[str]:
    """What `python -m vlmablate` is given for `cell` (quant=none for the full fine-tune, as plan's grid), and
    plan the labelled tokens of a sample (`labelled`) when counted."""
    overrides = ["model=llava15_7b", f"model.checkpoint={checkpoint}", f"quant={'none' if cell == 'full' else 'nf4'}",
                 "train=rtx4090_qlora", f"cell={cell}", "data=llava_json", f"data.path={data}",
                 f"data.image_root={data.parent}", f"data.cache_dir={work / 'cache'}", "eval=none", "logger=none",
                 f"train.max_steps={steps}", "train.gradient_accumulation_steps=1", "train.logging_steps=1",
                 "train.progress=false"]
    if labelled is not None:
        overrides.append(f"plan.labelled_tokens={labelled}")
    if max_length is not None:
        overrides.append(f"model.max_length={max_length}")
    if device == "cpu":
        # Loader workers would only compete for the cores, and bitsandbytes' 8-bit optimizer has a slow
        # reference kernel there (paged memory is CUDA's): the CPU run checks the script, not the preset.
        overrides += ["train.use_cpu=true", "train.dataloader_num_workers=0", "train.optim=adamw_torch"]
    return overrides


def compose(overrides: list[str]):
    """The typed and the plain config, composed as `python -m vlmablate OVERRIDES` composes them."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    import vlmablate
    from vlmablate.config import register_configs, to_run_config

    register_configs()
    with initialize_config_dir(config_dir=str(Path(vlmablate.__file__).parent / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return to_run_config(cfg), OmegaConf.to_container(cfg, resolve=True)


def train_command(run_dir: Path, overrides: list[str], gpus: list[str]) -> tuple[list[str], dict]:
    """(argv, environment) of one run on `gpus`: `python -m vlmablate` on one, torchrun over NCCL on several."""
    launcher = [sys.executable, "-m", "vlmablate"]
    if len(gpus) > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(gpus)}",
                    "-m", "vlmablate"]
    # One process sees one GPU: with more in sight, Trainer would wrap the model in DataParallel.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    return [*launcher, *overrides, f"hydra.run.dir={run_dir}"], env


def train(run_dir: Path, overrides: list[str], gpus: list[str]) -> dict:
    """Train one run and return its summary.json: in its own process(es) on CUDA, in this one on the CPU."""
    if gpus:
        argv, env = train_command(run_dir, overrides, gpus)
        log = run_dir.with_suffix(".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            code = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        if not (run_dir / "summary.json").exists():
            lines = log.read_text(errors="replace").strip().splitlines() or ["no output"]
            said = next((line for line in reversed(lines) if re.search(r"Error\b|Exception\b|Could not", line)),
                        lines[-1])
            return {"status": "failed", "error": f"exit {code}, no summary.json: {said.strip()} (see {log})"}
        return json.loads((run_dir / "summary.json").read_text())
    from vlmablate.train.runner import run

    cfg, composed = compose(overrides)
    log = run_dir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    try:  # Trainer prints its log lines: into the run's log, as a run in its own process does
        with log.open("w") as out, redirect_stdout(out), redirect_stderr(out):
            return run(cfg, run_dir, composed=composed, overrides=overrides)
    except Exception as exc:  # noqa: BLE001 - one failed cell is a row that says why; the others go on
        path = run_dir / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {"status": "failed", "error": repr(exc)}


def last_checkpoint_gib(run_dir: Path) -> float:
    """Size of the run's last checkpoint: the runner's training time includes writing it."""
    folders = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda f: int(f.name.split("-")[-1]))
    if not folders:
        return 0.0
    return round(sum(f.stat().st_size for f in folders[-1].rglob("*") if f.is_file()) / 2**30, 2)


def run_dir_gib(memory: dict) -> float:
    """Disk a run directory takes, from plan's terms: the trainable weights twice (last checkpoint, final/), as
    large as their gradients (`lora_and_grads` bounds them), the optimizer states once, and 1 GiB to spare."""
    return round(2 * memory["lora_and_grads"] + memory["optimizer"] + 1.0, 2)


def cell_result(cell: str, plan: dict, summary: dict, *, measured_memory: bool, optim: str) -> dict:
    """One row: the run's counts, rates and peak memory beside plan's estimate."""
    memory = plan["memory_gib"]
    # bitsandbytes pages the states of tensors of 10^5 elements and more; those of the others (biases, norms,
    # LoRA's rank-16 factors of 4096-wide layers: < 0.05 GiB at 7B) stay in PyTorch's allocator and count
    paged = memory["optimizer"] if optim.startswith("paged_") else 0.0
    row = {"cell": cell, "quant": plan["quant"], "status": summary.get("status"), "error": summary.get("error"),
           "plan_trainable": plan["params"]["trainable"]["total"], "plan_gib": memory["total"],
           "paged_optimizer_gib": paged, "plan_terms_gib": memory,
           **dict.fromkeys(("trainable", "total", "quantized", "peak_gib", "ratio", "tokens_per_s", "mfu", "tflops",
                            "peak_tflops", "peak_tflops_source", "steps", "tokens", "padding_efficiency",
                            "final_loss"))}
    if summary.get("status") != "completed":
        return row
    t = summary["train"]
    row.update(trainable=summary["params"]["trainable"]["total"], total=summary["params"]["total"],
               quantized=summary["params"]["components"]["llm"]["quantized"],
               tokens_per_s=t["tokens_per_s"], mfu=t["mfu"], tflops=t["tflops"], peak_tflops=t["peak_tflops"],
               peak_tflops_source=t["peak_tflops_source"], steps=t["steps"], tokens=t["tokens"],
               padding_efficiency=t["padding_efficiency"], final_loss=t["final_loss"])
    if measured_memory:  # on the CPU the runner's peak is the process's RSS, which no estimate models
        row["peak_gib"] = round(t["peak_mem_mb"] / 1024, 2)
        row["ratio"] = round(t["peak_mem_mb"] / 1024 / (memory["total"] - paged), 3)
    return row


def measure_cell(cell: str, paths: dict, args: argparse.Namespace, gpus: list[str], extra: tuple[str, ...] = (),
                 name: str | None = None) -> dict:
    from vlmablate.plan import plan_cell

    overrides = [*cell_overrides(cell, paths["checkpoint"], paths["data"], paths["work"], steps=args.steps,
                                 device=args.device, max_length=paths["max_length"], labelled=paths.get("labelled")),
                 *extra]
    cfg, _ = compose(overrides)
    try:
        plan = plan_cell(cfg)
    except Exception as exc:  # noqa: BLE001 - a row that says why, and the other cells still run
        return {"cell": cell, "quant": cfg.quant.mode, "status": "failed", "error": f"plan: {exc!r}", "steps": None}
    run_dir = paths["work"] / "runs" / (name or cell)
    need, free = run_dir_gib(plan["memory_gib"]), shutil.disk_usage(paths["work"]).free / 2**30
    if need > free:  # refused now rather than failing after the model has loaded and trained
        summary = {"status": "failed", "error": f"its run directory needs ~{need:.1f} GiB of disk (checkpoint, "
                                                f"optimizer states, final/), {free:.1f} GiB free in {paths['work']}"}
    else:
        summary = train(run_dir, overrides, gpus[:1])
    row = cell_result(cell, plan, summary, measured_memory=args.device == "cuda", optim=cfg.train.optim)
    row["plan_mfu"], row["last_checkpoint_gib"] = cfg.plan.mfu, last_checkpoint_gib(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # the full fine-tune's run directory holds ~42 GB at 7B
    return row


def measure_ddp(rows: list[dict], paths: dict, args: argparse.Namespace, gpus: list[str]) -> dict:
    """The DDP cell on two GPUs against its one-GPU row; or why it was not measured."""
    if args.device != "cuda":
        return {"skipped": "not measured on the CPU"}
    if len(gpus) < 2:
        return {"skipped": f"{len(gpus)} CUDA device visible"}
    single = next((r for r in rows if r["cell"] == args.ddp_cell), None)
    if single is None or single.get("tokens_per_s") is None:
        return {"skipped": f"cell {args.ddp_cell} has no one-GPU run to compare with (--cells)"}
    overrides = cell_overrides(args.ddp_cell, paths["checkpoint"], paths["data"], paths["work"], steps=args.steps,
                               device=args.device, max_length=paths["max_length"], labelled=paths.get("labelled"))
    run_dir = paths["work"] / "runs" / f"{args.ddp_cell}-ddp"
    summary = train(run_dir, overrides, gpus[:2])
    shutil.rmtree(run_dir, ignore_errors=True)
    if summary.get("status") != "completed":
        return {"cell": args.ddp_cell, "error": summary.get("error")}
    tokens_per_s = summary["train"]["tokens_per_s"]
    return {"cell": args.ddp_cell, "gpus": 2, "tokens_per_s": tokens_per_s, "one_gpu_tokens_per_s":
            single["tokens_per_s"], "ratio": round(tokens_per_s / single["tokens_per_s"], 3),
            "mfu": summary["train"]["mfu"]}


def measure_logits(rows: list[dict], paths: dict, args: argparse.Namespace, gpus: list[str]) -> dict:
    """The logits cell again with the LM head over every position, against its row (the labelled tokens only)."""
    if args.device != "cuda":
        return {"skipped": "not measured on the CPU"}
    on = next((r for r in rows if r["cell"] == args.logits_cell), None)
    if on is None or on.get("peak_gib") is None:
        return {"skipped": f"cell {args.logits_cell} has no run to compare with (--cells)"}
    off = measure_cell(args.logits_cell, paths, args, gpus, extra=("train.labelled_logits_only=false",),
                       name=f"{args.logits_cell}-full-logits")
    if off.get("peak_gib") is None:
        return {"cell": args.logits_cell, "error": off.get("error")}
    side = {k: {"peak_gib": r["peak_gib"], "plan_gib": r["plan_gib"], "plan_logits_gib": r["plan_terms_gib"]["logits"]}
            for k, r in (("on", on), ("off", off))}
    return {"cell": args.logits_cell, "labelled_tokens": paths["labelled"], **side,
            "ratio": round(on["peak_gib"] / off["peak_gib"], 3),
            "saved_gib": round(off["peak_gib"] - on["peak_gib"], 2),
            "plan_saved_gib": round(off["plan_gib"] - on["plan_gib"], 2)}


# --- the report ---------------------------------------------------------------------------------------------


def _num(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_rows(rows: list[dict]) -> list[str]:
    header = (f"{'cell':<14} {'quant':<5} {'trainable':>13} {'peak GiB':>8} {'plan GiB':>8} {'paged opt':>9} "
              f"{'ratio':>5} {'tokens/s':>9} {'MFU':>6} {'peak TFLOP/s':>12}  peak source")
    lines = [header, "-" * len(header)]
    for r in rows:
        if r["status"] != "completed":
            lines.append(f"{r['cell']:<14} {r['quant']:<5} failed: {r['error']}")
            continue
        lines.append(f"{r['cell']:<14} {r['quant']:<5} {r['trainable']:>13,} {_num(r['peak_gib'], '.2f'):>8} "
                     f"{r['plan_gib']:>8.2f} {r['paged_optimizer_gib']:>9.2f} {_num(r['ratio'], '.2f'):>5} "
                     f"{r['tokens_per_s']:>9,.0f} {_num(r['mfu'], '.3f'):>6} {_num(r['peak_tflops'], '.4g'):>12}  "
                     f"{r['peak_tflops_source']}")
    lines.append("ratio = peak ÷ (plan − paged opt): a paged optimizer keeps its states in CUDA managed memory, "
                 "which max_memory_allocated does not count")
    for r in rows:
        if r.get("last_checkpoint_gib", 0) >= CHECKPOINT_NOTE_GIB:
            lines.append(f"{r['cell']}: tokens/s and MFU count writing its last checkpoint "
                         f"({r['last_checkpoint_gib']:.1f} GiB) as training time")
    return lines


def format_ddp(ddp: dict) -> str:
    if "skipped" in ddp:
        return f"DDP: {ddp['skipped']}"
    if "error" in ddp:
        return f"DDP over NCCL, cell {ddp['cell']}: failed: {ddp['error']}"
    return (f"DDP over NCCL, {ddp['gpus']} GPUs, cell {ddp['cell']}: {ddp['tokens_per_s']:,.0f} tokens/s against "
            f"{ddp['one_gpu_tokens_per_s']:,.0f} on one GPU: x{ddp['ratio']:.2f}")


def format_logits(logits: dict) -> str:
    if "skipped" in logits:
        return f"LM head on the labelled tokens only: {logits['skipped']}"
    if "error" in logits:
        return f"LM head on every position, cell {logits['cell']}: failed: {logits['error']}"
    on, off = logits["on"], logits["off"]
    return (f"LM head on the labelled tokens only ({logits['labelled_tokens']} a sample), cell {logits['cell']}: peak "
            f"{on['peak_gib']:.2f} GiB (plan {on['plan_gib']:.2f}, logits {on['plan_logits_gib']:.2f}) against "
            f"{off['peak_gib']:.2f} GiB on every position (plan {off['plan_gib']:.2f}, logits "
            f"{off['plan_logits_gib']:.2f}): x{logits['ratio']:.3f}, {logits['saved_gib']:.2f} GiB saved "
            f"(plan: {logits['plan_saved_gib']:.2f})")


def _memory_verdict(done: list[dict]) -> tuple[bool, str]:
    low, high = MEMORY_BAND
    outside = [f"{r['cell']} {r['ratio']:.2f}" for r in done if not low <= r["ratio"] <= high]
    spread = f"{min(r['ratio'] for r in done):.2f}-{max(r['ratio'] for r in done):.2f}"
    return not outside, (f"peak ÷ plan in [{low:.2f}, {high:.2f}] in every cell ({spread})"
                         + (f"; outside: {', '.join(outside)}" if outside else ""))


def _mfu_verdict(done: list[dict]) -> tuple[bool, str]:
    target = done[0]["plan_mfu"]
    below = [f"{r['cell']} {r['mfu']:.3f}" for r in done if r["mfu"] < target]
    return not below, (f"≥ plan.mfu {target:g}, what plan's time estimates assume, in every cell"
                       + (f"; below: {', '.join(below)}" if below else ""))


def verdicts(rows: list[dict], ddp: dict, elapsed_s: float, *, steps: int, on_gpu: bool,
             logits: dict | None = None) -> list[dict]:
    """One verdict per target: passed True / False, or None where it was not measured."""
    done = [r for r in rows if r["status"] == "completed"]
    short = ", ".join(r["cell"] for r in rows if r["status"] != "completed" or r["steps"] != steps)
    out = [("runs", not short, f"every cell trained {steps} steps" + (f"; not: {short}" if short else ""))]
    differ = [f"{r['cell']} {r['trainable']:,} vs {r['plan_trainable']:,}" for r in done
              if r["trainable"] != r["plan_trainable"]]
    out.append(("params", not differ, "plan's trainable count is the runner's in every cell"
                + (f"; differ: {', '.join(differ)}" if differ else "")))
    for target, judge in (("memory", _memory_verdict), ("MFU", _mfu_verdict)):
        if not on_gpu:
            out.append((target, None, "not a GPU: the CPU run checks the script, not the targets"))
        elif not done or any(r["ratio" if target == "memory" else "mfu"] is None for r in done):
            out.append((target, False, f"a completed cell has no {target} figure"))
        else:
            out.append((target, *judge(done)))
    logits = logits if logits is not None else {"skipped": "not measured"}
    if "ratio" in logits:
        out.append(("logits", logits["ratio"] < 1, f"peak with the LM head on the labelled tokens only ÷ on every "
                                                   f"position < 1: x{logits['ratio']:.3f}"))
    else:
        out.append(("logits", False if "error" in logits else None,
                    logits.get("skipped") or "the full-logits run failed"))
    if "ratio" in ddp:
        out.append(("DDP", ddp["ratio"] >= DDP_TARGET, f"2 GPUs ≥ {DDP_TARGET:g} x one: x{ddp['ratio']:.2f}"))
    else:
        out.append(("DDP", False if "error" in ddp else None, ddp.get("skipped") or "the DDP run failed"))
    out.append(("time", elapsed_s <= BUDGET_S, f"the whole check in ≤ {BUDGET_S} s: {elapsed_s:.0f} s"))
    return [{"target": t, "passed": p, "detail": d} for t, p, d in out]


def format_verdict(v: dict) -> str:
    word = {True: "PASS", False: "FAIL", None: "n/a"}[v["passed"]]
    return f"verdict {v['target']:<6} {word:<4}  {v['detail']}"


def format_report(result: dict) -> str:
    rows = result["cells"]
    total = next((r["total"] for r in rows if r["total"] is not None), None)
    lines = [f"gpu_check: llava-1.5-7b-shaped model ({result['shape']}, {_num(total, ',')} parameters, random "
             f"weights), train=rtx4090_qlora at batch {result['batch']} x {result['seq_len']} tokens, "
             f"{result['steps']} steps a cell, on {result['device_name']}", ""]
    lines += format_rows(rows)
    lines += [""] + ([format_logits(result["logits"])] if "logits" in result else []) + [format_ddp(result["ddp"]), ""]
    lines += [format_verdict(v) for v in result["verdicts"]]
    return "\n".join(lines)


# --- the command --------------------------------------------------------------------------------------------


def check(args: argparse.Namespace, work: Path) -> dict:
    """Build the model and the data, run every cell and the DDP comparison; the results as one dict."""
    start = time.perf_counter()
    gpus = visible_gpus() if args.device == "cuda" else []
    config, max_length = shape_config(args.shape)
    first, _ = compose(cell_overrides(args.cells[0], work / "model", work / "data" / "records.json", work,
                                      steps=args.steps, device=args.device, max_length=max_length))
    batch, seq_len = first.train.per_device_train_batch_size, first.model.max_length
    paths = {"work": work, "max_length": max_length,
             "checkpoint": build_checkpoint(work / "model", args.shape, args.device),
             "data": write_data(work / "data", args.steps * batch * 2, config["vision_config"]["image_size"],
                                seq_len)}
    paths["labelled"] = labelled_tokens(paths["checkpoint"], paths["data"], first)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "the CPU"
    rows = [measure_cell(cell, paths, args, gpus) for cell in args.cells]
    logits = measure_logits(rows, paths, args, gpus)
    ddp = measure_ddp(rows, paths, args, gpus)
    elapsed = time.perf_counter() - start
    return {"device": args.device, "device_name": device_name, "shape": args.shape, "batch": batch,
            "seq_len": seq_len, "labelled_tokens": paths["labelled"], "steps": args.steps, "cells": rows,
            "logits": logits, "ddp": ddp, "elapsed_s": round(elapsed, 1),
            "verdicts": verdicts(rows, ddp, elapsed, steps=args.steps, on_gpu=args.device == "cuda", logits=logits)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(SKIP_MESSAGE)
        if args.out:
            args.out.write_text(json.dumps({"skipped": SKIP_MESSAGE}, indent=2))
        return 0
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        result = check(args, work.resolve())
    print(format_report(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
