"""What does it take to teach the shipped tower the mark? Taught reading at several budgets, side by side.

The vision-side control asks an unfrozen tower to learn the mark in stage 2, where the only signal is
the LM's answer to about 570 mark questions, reaching the tower through the projector at the
unfrozen policies' LR (2e-6 in the config, 2e-5 in the tiny world's preset). This script measures
the other end: the world's shipped tower taught the mark directly, with a linear head on every cell
(`pretrain.taught_reading`: colour and shape heads beside it, every parameter trained, AdamW and a
cosine schedule), at each budget given as steps:batch:lr. It prints the images and the marked or
plain objects each budget labels, and the held-out accuracy of the mark on the cells that hold an
object (chance 0.5, where the frozen tower's linear probe reads it: the tower is blind to the mark). Where the
curve crosses is the budget a tower needs, with the cleanest signal it can get.

    python benchmarks/world_mark_budget.py [--budgets 100:16:2e-4,400:16:2e-4,100:64:2e-3,400:64:2e-3]
                                           [--n-eval 500] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import CLIPImageProcessor, CLIPVisionModel

from vlmablate.world.components import shipped_folder
from vlmablate.world.pretrain import TaughtReadingConfig, _vision_data, taught_reading

DEFAULT_BUDGETS = "100:16:2e-4,400:16:2e-4,100:64:2e-3,400:64:2e-3"


def parse_budgets(text: str) -> list[tuple[int, int, float]]:
    """`steps:batch:lr,...` -> [(steps, batch, lr), ...], with an error that names the bad one."""
    budgets = []
    for item in text.split(","):
        parts = item.split(":")
        try:
            steps, batch, lr = int(parts[0]), int(parts[1]), float(parts[2])
            if len(parts) != 3 or steps < 1 or batch < 1 or lr <= 0:
                raise ValueError
        except (ValueError, IndexError):
            raise SystemExit(f"--budgets: {item!r} is not steps:batch:lr with positive numbers "
                             "(e.g. 400:64:2e-3)") from None
        budgets.append((steps, batch, lr))
    return budgets


def labelled_objects(n_images: int, world_seed: int, image_size: int) -> int:
    """How many objects (each marked or plain) the first n_images teaching scenes hold."""
    _, targets = _vision_data(world_seed, "vision_taught", n_images, image_size)
    mark = targets[:, -1]  # the last untaught attribute's row: the mark, -100 on empty cells
    return int((mark >= 0).sum())


def measure(tower, processor, steps: int, batch: int, lr: float, *, n_eval: int, world_seed: int = 0) -> dict:
    # one pass over fresh images: the budget is the images seen, none seen twice
    cfg = TaughtReadingConfig(steps=steps, batch_size=batch, lr=lr, n_images=steps * batch, n_eval=n_eval)
    start = time.perf_counter()
    result = taught_reading(tower, processor, cfg, world_seed=world_seed, attribute="mark", progress=False)
    return {"steps": steps, "batch": batch, "lr": lr, "images": steps * batch,
            "objects": labelled_objects(steps * batch, world_seed, tower.config.image_size),
            "mark": result["mark_taught_acc"], "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS, help="comma-separated steps:batch:lr")
    parser.add_argument("--n-eval", type=int, default=TaughtReadingConfig.n_eval, help="held-out scenes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    budgets = parse_budgets(args.budgets)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = shipped_folder() / "vision"
    tower, processor = CLIPVisionModel.from_pretrained(folder), CLIPImageProcessor.from_pretrained(folder)
    print(f"{'steps':>6} {'batch':>6} {'lr':>8} {'images':>7} {'objects':>8} {'mark':>6} {'seconds':>8}", flush=True)
    rows = []
    for steps, batch, lr in budgets:
        rows.append(measure(tower, processor, steps, batch, lr, n_eval=args.n_eval))
        r = rows[-1]
        print(f"{steps:>6} {batch:>6} {lr:>8.0e} {r['images']:>7} {r['objects']:>8} {r['mark']:>6.3f} "
              f"{r['seconds']:>8.0f}", flush=True)
    frozen = json.loads((shipped_folder() / "meta.json").read_text())["vision"]["mark_probe_acc"]
    print(f"\nthe shipped tower taught the mark directly (chance 0.5; its frozen linear probe {frozen:.3f}); "
          f"held-out objects of {args.n_eval} scenes")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
