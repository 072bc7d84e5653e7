"""Padding efficiency (real tokens / padded tokens) of the samplers on a mix665k-like length distribution.

The lengths mimic llava_v1_5_mix665k as LLaVA-1.5 sees it: 93% image conversations (576 image tokens
plus 20-1500 text tokens, most of them short VQA turns) and 7% text-only ShareGPT conversations
(50-2000 tokens). Each sampler's per-rank batches are measured exactly as a DataLoader would draw
them, for 1 and 8 ranks; `random` is the baseline the ratios are taken against.

    python benchmarks/padding_efficiency.py [--records 665000] [--batch-size 16] [--grad-accum 1]
"""

from __future__ import annotations

import argparse
import random

from vlmablate.data.sampler import SAMPLERS, RankBatchSampler, padding_efficiency


def mix665k_like_lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    lengths = []
    for _ in range(n):
        if rng.random() < 0.93:
            text = int(min(1500, rng.lognormvariate(4.3, 0.8))) + 20  # short VQA answers, a long tail
            lengths.append(576 + text)
        else:
            lengths.append(-(int(min(2000, rng.lognormvariate(6.2, 0.7))) + 50))
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=665_000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=1)
    args = parser.parse_args()
    lengths = mix665k_like_lengths(args.records)
    print(f"{args.records:,} records, {sum(n > 0 for n in lengths):,} with an image; "
          f"per-device batch {args.batch_size}, gradient accumulation {args.grad_accum}")
    for world in (1, 8):
        eff = {}
        for kind in SAMPLERS:
            batches = [b for rank in range(world)
                       for b in RankBatchSampler(lengths, kind=kind, batch_size=args.batch_size, num_replicas=world,
                                                 rank=rank, grad_accum=args.grad_accum, seed=0)]
            eff[kind] = padding_efficiency(batches, lengths)
        row = "  ".join(f"{k} {v:.4f} ({v / eff['random']:.3f}x random)" for k, v in eff.items())
        print(f"ranks {world}: {row}")


if __name__ == "__main__":
    main()
