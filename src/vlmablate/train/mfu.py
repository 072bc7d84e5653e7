"""Model FLOPs utilisation of a run: the FLOPs it trained, the device's peak, and their ratio.

What is counted: every sample a training forward saw, at its real length (its non-padding tokens, image
tokens included) and with its image crops (LlavaNext's anyres: the base image plus its tiles; none for a
text-only sample), through `model.flops.count_flops` on the model's shapes after the freeze plan. The
trainer keeps a histogram of (length, crops) per micro-batch (`sample_shapes`), so the count follows the
data's real lengths, attention's quadratic term included, at no cost per step. As in PaLM's MFU
(Chowdhery et al. 2022, appendix B) these are the model's FLOPs: padding and the forward that gradient
checkpointing recomputes are work too, but not counted, so they show as a lower MFU.

The peak, per device: `train.peak_tflops` when set; on a GPU, the table below (bf16 dense, matched from
`torch.cuda.get_device_name`); on the CPU, a short fp32 matmul measurement, cached under the project's
cache root per CPU model and torch thread count. A GPU the table does not know leaves MFU null, with the
reason in `peak_tflops_source` and the log: a run never fails for want of a peak.

mfu = achieved TFLOP/s / (peak × devices): the achieved rate sums every rank's samples over the training
time (Trainer's loop, its one-time set-up left out, as for tokens/s). After a resume, `flops`, `tflops` and
`mfu` cover the attempt that wrote the summary, as `tokens_per_s` does; `tokens` counts the whole run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from vlmablate.model.flops import ModelShapes, count_flops, shapes_from_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuPeak:
    """One GPU of the table: its bf16 dense tensor-core peak (FP32 accumulate), per device."""

    key: str  # the name `plan.gpu` takes
    label: str
    pattern: str  # searched in torch.cuda.get_device_name()
    tflops: float
    source: str


GPU_PEAKS: dict[str, GpuPeak] = {p.key: p for p in (
    # NVIDIA Ada GPU architecture whitepaper, appendix A (GeForce RTX 4090): "Peak BF16 Tensor TFLOPS with FP32
    # Accumulate" 165.2 (330.4 with sparsity). GeForce cards accumulate in FP32 at half the FP16-accumulate rate,
    # and training accumulates in FP32. Not the 4090 D or the laptop part (other SM counts).
    GpuPeak("rtx4090", "NVIDIA GeForce RTX 4090", r"RTX 4090$", 165.2, "Ada whitepaper, dense"),
    # NVIDIA A100 Tensor Core GPU datasheet: "BF16 Tensor Core 312 TFLOPS | 624 TFLOPS*" (* with sparsity); the
    # same for the 40 GB and 80 GB, PCIe and SXM parts.
    GpuPeak("a100", "NVIDIA A100 (SXM 80GB)", r"\bA100\b", 312.0, "A100 datasheet, dense"),
    # NVIDIA H100 datasheet, H100 SXM: "BF16 Tensor Core 1,979 teraFLOPS*", * with sparsity; dense is half, the
    # H100 whitepaper's 989.4 (H100 SXM5: 989.4 / 1,978.9). torch names the SXM part "H100 80GB HBM3"; the PCIe
    # and NVL parts run at lower clocks and are not matched.
    GpuPeak("h100", "NVIDIA H100 (SXM)", r"H100 80GB HBM3|H100 SXM", 989.4, "H100 whitepaper, dense"),
    # NVIDIA L40S datasheet: "BF16 Tensor Core 362.05 | 733 TFLOPS" (the second with sparsity). Not the L40.
    GpuPeak("l40s", "NVIDIA L40S", r"\bL40S\b", 362.05, "L40S datasheet, dense"),
    # NVIDIA Ampere GA102 GPU architecture whitepaper, appendix A (RTX A6000): "Peak BF16 Tensor TFLOPS with FP32
    # Accumulate" 154.8 (309.7 with sparsity; the datasheet's "Tensor Performance 309.7 TFLOPS" is the sparse one).
    # Not the RTX 6000 Ada Generation.
    GpuPeak("a6000", "NVIDIA RTX A6000", r"RTX A6000$", 154.8, "GA102 whitepaper, dense"),
    # NVIDIA H200 datasheet, H200 SXM: "BF16 Tensor Core 1,979 TFLOPS", with sparsity: the H100 SXM's compute
    # (more, faster memory only), so dense is the same 989.4. Not the NVL part (lower clocks). Beyond the first
    # five: the GPU a device check may be lent.
    GpuPeak("h200", "NVIDIA H200 (SXM)", r"\bH200\b(?!.*NVL)", 989.4, "H200 datasheet, dense"),
)}

CPU_PEAK_FILE = "device_peak.json"
CPU_MATMUL_SIZE = 1024  # 2·1024³ ≈ 2.1 GFLOP a matmul: tens of milliseconds on a few cores
CPU_MATMUL_REPEATS = 5


@dataclass(frozen=True)
class Peak:
    """A device's peak TFLOP/s and where it comes from (tflops None: unknown, the source says why)."""

    tflops: Optional[float]
    source: str


# --- the peak ---------------------------------------------------------------------------------------------


def gpu_peak(device_name: str) -> Optional[GpuPeak]:
    """The table's entry for a `torch.cuda.get_device_name()`, or None."""
    return next((p for p in GPU_PEAKS.values() if re.search(p.pattern, device_name.strip())), None)


def cpu_name() -> str:
    """The CPU model (/proc/cpuinfo's model name, else platform's processor)."""
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="ignore").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def measure_cpu_tflops(size: int = CPU_MATMUL_SIZE, repeats: int = CPU_MATMUL_REPEATS) -> float:
    """fp32 matmul TFLOP/s of this process's torch threads: the best of `repeats` after one warm-up.

    The best, not the mean: the peak is what the machine can do, and other load only ever slows it down.
    """
    generator = torch.Generator().manual_seed(0)  # its own: the run's random stream must not see the measurement
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    torch.mm(a, b)  # warm-up: allocation, thread pool start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def cpu_peak(cache_dir: Path) -> Peak:
    """The measured CPU peak, read from `cache_dir/device_peak.json` when this CPU and thread count are there."""
    key = f"{cpu_name()} | torch threads {torch.get_num_threads()}"
    path = Path(cache_dir) / CPU_PEAK_FILE
    try:
        cache = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:  # written atomically, so not ours: measure again and replace it
        cache = {}
    if key not in cache:
        cache[key] = {"tflops": measure_cpu_tflops(), "matmul": CPU_MATMUL_SIZE, "repeats": CPU_MATMUL_REPEATS,
                      "dtype": "float32"}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two runs measuring at once each rename a whole file
        tmp.write_text(json.dumps(cache, indent=2))
        os.replace(tmp, path)
        log.info("CPU peak measured: %.4f TFLOP/s (%s), cached in %s", cache[key]["tflops"], key, path)
    entry = cache[key]
    return Peak(entry["tflops"], f"measured: fp32 {entry['matmul']}x{entry['matmul']} matmul, best of "
                                 f"{entry['repeats']} on {key} (cached in {path})")


def device_peak(override: Optional[float], device: torch.device | str, cache_dir: Path) -> Peak:
    """Per-device peak: `train.peak_tflops` first, then the GPU table or the CPU measurement."""
    if override is not None:
        return Peak(float(override), "config: train.peak_tflops")
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        entry = gpu_peak(name)
        if entry is None:
            return Peak(None, f"unknown GPU {name!r}: no entry in the peak table; set train.peak_tflops=")
        return Peak(entry.tflops, f"table: {entry.label}, bf16 dense ({entry.source})")
    if device.type == "cpu":
        try:
            return cpu_peak(cache_dir)
        except OSError as exc:  # an unwritable cache: no MFU rather than no run
            return Peak(None, f"CPU peak not measured: {exc}")
    return Peak(None, f"no peak known for device type {device.type!r}; set train.peak_tflops=")


# --- the FLOPs ----------------------------------------------------------------------------------------------


def image_crops(config, image_sizes: Optional[torch.Tensor], images: int) -> list[int]:
    """Crops each image sends through the tower: 1 for Llava; LlavaNext's base image plus its anyres tiles,
    as its forward counts them from `image_sizes`."""
    if config.model_type != "llava_next" or image_sizes is None:
        return [1] * images
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for size in image_sizes.tolist()]


def sample_shapes(inputs: dict, config) -> list[tuple[int, int]]:
    """(real tokens, crops) of every sample of a micro-batch; one image per sample with image tokens, in
    batch order as the collator stacks them."""
    rows = torch.stack([inputs["attention_mask"].sum(dim=1),
                        (inputs["input_ids"] == config.image_token_index).any(dim=1).long()]).tolist()
    crops = iter(image_crops(config, inputs.get("image_sizes"), sum(rows[1])))
    return [(length, next(crops) if has_image else 0) for length, has_image in zip(*rows)]


def model_shapes(model) -> tuple[Optional[ModelShapes], Optional[str]]:
    """The model's matmuls for the count, read before any engine wraps it; (None, why) where they cannot be."""
    try:
        return shapes_from_model(model), None
    except Exception as exc:  # an architecture the count does not know: MFU is left out, training goes on
        return None, f"FLOPs not counted: {type(exc).__name__}: {exc}"


def histogram_flops(shapes: ModelShapes, histogram: Counter) -> tuple[float, int]:
    """(training FLOPs, tokens) of the samples of a (length, crops) histogram."""
    flops = sum(n * count_flops(shapes, seq_len=length, crops=crops).total.total
                for (length, crops), n in histogram.items())
    return flops, sum(n * length for (length, _), n in histogram.items())


def mfu_report(shapes: Optional[ModelShapes], histogram: Counter, seconds: float, peak: Optional[Peak],
               devices: int, why_not: Optional[str] = None) -> dict:
    """`train.flops_per_token`, `flops`, `tflops`, `peak_tflops`, `peak_tflops_source` and `mfu` of a run."""
    report = {"flops_per_token": None, "flops": None, "tflops": None,
              "peak_tflops": peak.tflops if peak else None, "peak_tflops_source": peak.source if peak else None,
              "mfu": None}
    if shapes is None or not histogram or seconds <= 0:
        reason = why_not or "no training step was timed"
        log.warning("MFU not reported: %s", reason)
        return {**report, "mfu_unavailable": reason}
    flops, tokens = histogram_flops(shapes, histogram)
    tflops = flops / seconds / 1e12
    report.update(flops_per_token=round(flops / tokens, 1), flops=flops, tflops=float(f"{tflops:.6g}"))
    if peak is None or peak.tflops is None:
        reason = peak.source if peak is not None else "no peak resolved"
        log.warning("MFU not reported: %s", reason)
        return {**report, "mfu_unavailable": reason}
    report["mfu"] = float(f"{tflops / (peak.tflops * devices):.6g}")
    return report
