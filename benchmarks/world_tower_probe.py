"""How far did stage 2 move the tiny world's vision tower? Linear probes of the untaught attributes, per run.

The mark is the vision side's control: the shipped tower cannot see it (its patch embedding is orthogonal to
the mark's texture, so a linear probe reads it at chance, 0.5), and only a tower that trains can learn to see
it. A run with `vision=unfrozen` saves its tower among its trainable weights
(`final/non_lora_trainables.safetensors`; a full fine-tune in `final/model/`). This script loads the shipped
tower, puts each run's trained weights in, and fits the components' own linear probes for size, fill and the
mark on layer −2, beside the shipped tower's. It also prints how far the weights moved (the median and largest
relative change of a weight tensor). The benchmark's `mark_recognition` can only rise where the probe does.

    python benchmarks/world_tower_probe.py RUN_DIR [RUN_DIR ...] [--n-probe 500]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from safetensors.torch import load_file
from transformers import AutoImageProcessor, CLIPVisionModel

from vlmablate.world.components import shipped_folder
from vlmablate.world.pretrain import untaught_probes

# Where a Llava model keeps its tower (the trainable weights of a LoRA run; a full fine-tune's saved model);
# CLIPVisionModel's own keys have neither prefix.
PREFIXES = ("model.vision_tower.", "vision_tower.")
SAVED = ("non_lora_trainables.safetensors", "model/model.safetensors")


def trained_tower(base: CLIPVisionModel, run_dir: Path) -> tuple[CLIPVisionModel, dict] | None:
    """A copy of `base` with the run's trained tower weights, and how far they moved; None if it kept none."""
    path = next((run_dir / "final" / name for name in SAVED if (run_dir / "final" / name).exists()), None)
    if path is None:
        return None
    weights = {k[len(prefix):]: v for k, v in load_file(path).items()
               for prefix in PREFIXES if k.startswith(prefix)}
    if not weights:
        return None
    tower = CLIPVisionModel(base.config)
    tower.load_state_dict(base.state_dict())
    before = {k: v.detach().clone() for k, v in tower.named_parameters()}
    moved = [float((v - before[k]).norm() / before[k].norm().clamp_min(1e-12))
             for k, v in weights.items() if k in before]
    _, unexpected = tower.load_state_dict(weights, strict=False)
    if unexpected:
        raise ValueError(f"{path}: weights that {type(base).__name__} does not have: {unexpected[:5]}")
    moved.sort()
    return tower, {"tensors": len(weights), "median_change": moved[len(moved) // 2], "max_change": moved[-1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with final/)")
    parser.add_argument("--n-probe", type=int, default=500, help="held-out scenes the probes are scored on")
    parser.add_argument("--world-seed", type=int, default=0, help="the world seed of the probe scenes")
    args = parser.parse_args(argv)

    folder = shipped_folder() / "vision"
    base = CLIPVisionModel.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    print(f"{'tower':<48} {'size':>6} {'fill':>6} {'mark':>6} {'median change':>14} {'max change':>11} {'s':>5}")
    rows = [("shipped (frozen)", base, None)]
    for run in args.runs:
        found = trained_tower(base, run)
        if found is None:
            print(f"{str(run):<48} no trained tower in final/ (vision frozen)")
            continue
        rows.append((str(run), found[0].eval(), found[1]))
    for name, tower, moved in rows:
        start = time.perf_counter()
        probes = untaught_probes(tower, processor, world_seed=args.world_seed, n_probe=args.n_probe)
        change = ("-", "-") if moved is None else (f"{moved['median_change']:.4f}", f"{moved['max_change']:.4f}")
        print(f"{name[-48:]:<48} {probes['size_probe_acc']:>6.3f} {probes['fill_probe_acc']:>6.3f} "
              f"{probes['mark_probe_acc']:>6.3f} {change[0]:>14} {change[1]:>11} {time.perf_counter() - start:>5.1f}")


if __name__ == "__main__":
    main()
