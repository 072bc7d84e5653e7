"""Does the tiny world's frozen vision tower see the mark? Frozen probe vs taught reading, side by side.

The tower is pretrained on colour and shape only. Size and fill it carries anyway (a linear probe on its
frozen features reads them), but the mark, a small dot of ink at an object's centre, it should not: that
is what leaves a frozen tower something it cannot pass on, as CLIP cannot pass on small text. This script
pretrains the tower per seed (VisionPretrainConfig's defaults unless told), then prints the frozen
linear-probe accuracy for size, fill and the mark (chance 0.5 each) beside the mark's accuracy once a
copy of the tower is taught it end to end (`taught_reading`), with the seconds each took.
The gap is what only an unfrozen tower reads.

    python benchmarks/world_vision_mark.py [--seeds 0,1,2] [--n-images 8000] [--epochs 6]
                                           [--teach-images 8000] [--teach-steps 400] [--fast] [--threads N]

`--fast` is a test-size tower and a few teaching steps (seconds): it checks that the script runs, and its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from vlmablate.world.pretrain import TaughtReadingConfig, VisionPretrainConfig, pretrain_vision, taught_reading

FAST_VISION = dict(hidden=32, layers=2, heads=2, intermediate=64, n_images=200, epochs=1, batch_size=32, n_probe=50)
FAST_TEACH = dict(n_images=64, steps=4, batch_size=16, n_eval=50)


def measure(seed: int, vision: VisionPretrainConfig, teach: TaughtReadingConfig) -> dict:
    """One seed (tower init, data and world alike): the frozen probes, then the taught reading."""
    start = time.perf_counter()
    vision, teach = dataclasses.replace(vision, seed=seed), dataclasses.replace(teach, seed=seed)
    model, processor, frozen = pretrain_vision(vision, world_seed=seed, progress=False)
    pretrain_seconds = time.perf_counter() - start
    taught = taught_reading(model, processor, teach, world_seed=seed, attribute="mark", progress=False)
    return {
        "seed": seed,
        "object_acc": frozen["object_acc"],
        "size_probe_acc": frozen["size_probe_acc"],
        "fill_probe_acc": frozen["fill_probe_acc"],
        "mark_probe_acc": frozen["mark_probe_acc"],
        "mark_taught_acc": taught["mark_taught_acc"],
        "taught_object_acc": taught["object_acc"],
        "pretrain_seconds": round(pretrain_seconds, 1),
        "taught_seconds": round(time.perf_counter() - start - pretrain_seconds, 1),
    }


COLUMNS = (
    ("seed", "seed", "{}"),
    ("objects", "object_acc", "{:.3f}"),
    ("size", "size_probe_acc", "{:.3f}"),
    ("fill", "fill_probe_acc", "{:.3f}"),
    ("mark frozen", "mark_probe_acc", "{:.3f}"),
    ("mark taught", "mark_taught_acc", "{:.3f}"),
    ("taught objects", "taught_object_acc", "{:.3f}"),
    ("pretrain s", "pretrain_seconds", "{:.0f}"),
    ("teach s", "taught_seconds", "{:.0f}"),
)


def header() -> str:
    return " | ".join(title for title, _, _ in COLUMNS)


def line(row: dict) -> str:
    """One seed's row, each value under its title."""
    return " | ".join(f"{fmt.format(row[key]):>{len(title)}}" for title, key, fmt in COLUMNS)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated world and tower seeds")
    parser.add_argument("--n-images", type=int, default=VisionPretrainConfig.n_images)
    parser.add_argument("--epochs", type=int, default=VisionPretrainConfig.epochs)
    parser.add_argument("--teach-images", type=int, default=TaughtReadingConfig.n_images)
    parser.add_argument("--teach-steps", type=int, default=TaughtReadingConfig.steps)
    parser.add_argument("--fast", action="store_true", help="a test-size tower and a few steps: runs, means nothing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    vision = VisionPretrainConfig(n_images=args.n_images, epochs=args.epochs)
    teach = TaughtReadingConfig(n_images=args.teach_images, steps=args.teach_steps)
    if args.fast:
        vision, teach = dataclasses.replace(vision, **FAST_VISION), dataclasses.replace(teach, **FAST_TEACH)
    start = time.perf_counter()
    rows = []
    print(header(), flush=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        rows.append(measure(seed, vision, teach))
        print(line(rows[-1]), flush=True)
    print(
        f"\nfrozen probes (chance 0.5) vs the mark once taught; {len(rows)} seed(s), "
        f"{time.perf_counter() - start:.0f}s in all"
    )
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
