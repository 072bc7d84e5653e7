"""How often does each paired test call two identical cells different? Simulated grids, no cell effect.

A grid cell is a seeds × questions matrix of CircularEval correctness. Here two cells have the same
per-question rates (the tiny world's spread: mean 0.53, one run's binomial SD 0.017 over 300 questions),
and every run (cell, seed) shifts all its questions' log-odds by its own draw: the training noise,
sized so one run's accuracy varies from seed to seed with the SD given (0.028 measured over six seeds of
frozen/LoRA; 0.017 is no run effect at all). A test that holds its level rejects about α of the time.

- `pair-level`: the report's old test, every (seed, question) pair independent, sign-flip p
  (`eval.metrics.paired_difference`);
- `crossed, paired`: `report.stats.compare` on matched seeds, as the grid's cells are compared;
- `crossed, unpaired`: the same on disjoint seeds, as an A/A comparison is.

    python benchmarks/null_rejection.py [--draws 4000] [--seeds 3] [--sds 0.017,0.028,0.05]
                                        [--pair-level-draws 1000] [--alpha 0.05]
"""

from __future__ import annotations

import argparse
import math
import time

from vlmablate.report import stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=4000, help="simulated grids per row for the crossed test")
    parser.add_argument("--pair-level-draws", type=int, default=1000,
                        help="simulated grids per row for the pair-level test (200 sign flips each; 0: skip)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell")
    parser.add_argument("--sds", default="0.017,0.028,0.05", help="seed-to-seed SDs of one run's accuracy")
    parser.add_argument("--alpha", type=float, default=stats.ALPHA)
    args = parser.parse_args(argv)

    print(f"two identical cells, {args.seeds} seeds each, 300 questions; rejections at alpha = {args.alpha}")
    print(f"{'per-seed SD':>11} {'run SD (logit)':>15} {'crossed, paired':>16} {'crossed, unpaired':>18} "
          f"{'pair-level':>11} {'draws':>12} {'seconds':>8}")
    for sd in (float(x) for x in args.sds.split(",")):
        start = time.perf_counter()
        crossed = stats.null_rejection_rates(args.draws, seeds=args.seeds, per_seed_sd=sd, alpha=args.alpha,
                                             pair_level_boot=0, seed=1)
        pair = (stats.null_rejection_rates(args.pair_level_draws, seeds=args.seeds, per_seed_sd=sd, alpha=args.alpha,
                                           pair_level_boot=200, seed=2)["rates"]["pair_level"]
                if args.pair_level_draws else math.nan)
        rates = crossed["rates"]
        print(f"{sd:>11.3f} {crossed['run_sd_logit']:>15.3f} {rates['crossed_paired']:>16.4f} "
              f"{rates['crossed_unpaired']:>18.4f} {pair:>11.4f} {args.draws:>6}/{args.pair_level_draws:<5} "
              f"{time.perf_counter() - start:>8.1f}")
    binomial = math.sqrt(args.alpha * (1 - args.alpha) / args.draws)
    print(f"binomial SD of a rate at alpha over {args.draws} draws: {binomial:.4f}")


if __name__ == "__main__":
    main()
