"""MMBench answer modes side by side: `generate` (exact matching) against `likelihood` (letter scores).

All score the same model on the same benchmark in this process: likelihood (batched), generate
batched, and generate one question at a time (the baseline of DESIGN.md's target: likelihood >= 10x
faster than one `generate` per question). The script prints each one's wall-clock, the speed
ratios, how often the modes pick the same letter, and each mode's accuracy and unparsed rate.

    python benchmarks/eval_modes.py RUN_DIR [--tsv FILE] [--max-questions N] [--batch-size B]

RUN_DIR is a finished run (e.g. the main job's); the TSV defaults to its tiny world's benchmark.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from vlmablate.eval.load import load_trained
from vlmablate.eval.run import evaluate_mmbench
from vlmablate.eval.suite import benchmark_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tsv", default=None)
    parser.add_argument("--max-questions", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    model, processor, cfg = load_trained(args.run_dir)
    tsv = args.tsv or benchmark_files(cfg.eval, cfg.world)["tsv"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, mode, batch in (("likelihood", "likelihood", args.batch_size),
                                  ("generate", "generate", args.batch_size), ("generate x1", "generate", 1)):
            out_dir = Path(tmp) / name.replace(" ", "_")
            results[name] = evaluate_mmbench(model, processor, tsv, mode=mode, out_dir=out_dir,
                                             batch_size=batch, max_new_tokens=args.max_new_tokens,
                                             max_questions=args.max_questions, n_boot=200)
    (gen, gen_rows), (lik, lik_rows) = results["generate"], results["likelihood"]
    one = results["generate x1"][0]
    agree = sum(g["prediction"] == lk["prediction"] for g, lk in zip(gen_rows, lik_rows)) / len(gen_rows)
    print(f"benchmark: {tsv} ({gen['n_questions']} questions, {gen['n_rows']} rows)")
    for name, m in (("likelihood", lik), ("generate", gen), ("generate x1", one)):
        print(f"{name:>12}: {m['seconds']:7.2f} s   circular {m['circular_acc']:.3f}  vanilla {m['vanilla_acc']:.3f}  "
              f"unparsed {m['unparsed_rate']:.3f}")
    ratio = one["seconds"] / lik["seconds"]
    print(f"likelihood is {ratio:.1f}x faster than one generate per question (target >= 10x: "
          f"{'met' if ratio >= 10 else 'NOT met'}) and {gen['seconds'] / lik['seconds']:.1f}x faster than batched "
          f"generate (batch {args.batch_size})")
    print(f"the two modes pick the same letter on {agree:.1%} of rows")


if __name__ == "__main__":
    sys.exit(main())
