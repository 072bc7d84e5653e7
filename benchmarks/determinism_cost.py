"""What `train.deterministic=true` costs: training tokens/s with and without it, side by side.

Full determinism (transformers' `enable_full_determinism`) turns on
`torch.use_deterministic_algorithms`, cuDNN's deterministic mode without benchmarking, a fixed cuBLAS
workspace and CUDA_LAUNCH_BLOCKING=1 (synchronous kernel launches). The switches change process-wide
state, so every run is its own process (`python -m vlmablate`); runs alternate (off, on, off, on, ...)
and the medians of the runs' own tokens/s (training proper, set-up excluded) are compared.

    python benchmarks/determinism_cost.py [--steps 40] [--repeats 3] [override ...]

On a CPU the switches have nothing to change, so the ratio sits at 1; on a GPU it is the price of
bit-identical reruns.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# The runner-overhead benchmark's model size: large enough that kernels, not Python, dominate a step.
MODEL = ["model=tiny_random", "model.tiny.image_size=64", "model.tiny.vision_hidden=128",
         "model.tiny.vision_layers=4", "model.tiny.text_hidden=256", "model.tiny.text_layers=4"]


def tokens_per_s(deterministic: bool, steps: int, overrides: list[str], folder: Path) -> float:
    run_dir = folder / f"{'on' if deterministic else 'off'}-{len(list(folder.iterdir()))}"
    cmd = [sys.executable, "-m", "vlmablate", *MODEL, "world=test", "eval=none", "train.progress=false",
           f"train.max_steps={steps}", "train.save_steps=100000", f"train.deterministic={str(deterministic).lower()}",
           *overrides, f"hydra.run.dir={run_dir}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["determinism"]["torch.use_deterministic_algorithms"] is deterministic
    return summary["train"]["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args, overrides = parser.parse_known_args()
    off, on = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for _ in range(args.repeats):
            off.append(tokens_per_s(False, args.steps, overrides, folder))
            on.append(tokens_per_s(True, args.steps, overrides, folder))
    print(f"tokens/s, deterministic off: {[round(x) for x in off]} (median {statistics.median(off):.0f})")
    print(f"tokens/s, deterministic on:  {[round(x) for x in on]} (median {statistics.median(on):.0f})")
    print(f"ratio on/off: {statistics.median(on) / statistics.median(off):.3f}")


if __name__ == "__main__":
    main()
