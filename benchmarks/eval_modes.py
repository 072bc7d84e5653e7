"""MMBench answer modes side by side: `generate` (exact matching) against `likelihood` (letter scores).

All score the same model on the same benchmark in this process: likelihood (batched), generate
batched, and generate one question at a time (the baseline of DESIGN.md's target: likelihood >= 10x
faster than one `generate` per question). The script prints each one's wall-clock, the speed
ratios, how often the modes pick the same letter, and each mode's accuracy and unparsed rate.

    python benchmarks/eval_modes.py RUN_DIR [--tsv FILE] [--max-questions N] [--batch-size B]
    python benchmarks/eval_modes.py --shape big [--max-questions 20] [--max-new-tokens 2]

RUN_DIR is a finished run (e.g. the main job's); the TSV defaults to its tiny world's benchmark.
`--shape big` scores `shapes.BIG` (a LLaVA-shaped model with random weights, 256 image tokens) instead,
where a forward costs what it would on a real model's scale and generation is not cut short by an early
end-of-sequence: a random model always writes `--max-new-tokens` tokens, a trained one about two (` B`
and `</s>`), so `--max-new-tokens 2` writes what a trained model would. Its letters are noise, so
agreement means nothing there; the timings are the point.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from shapes import SHAPES, compose_run

from vlmablate.eval.load import load_trained
from vlmablate.eval.run import evaluate_mmbench
from vlmablate.eval.suite import benchmark_files
from vlmablate.model.load import load_model
from vlmablate.model.plan import resolve_plan


def random_model(shape: str):
    """(model, processor, cfg) of `shape` with its random initial weights, as a run would load them."""
    cfg, _ = compose_run(SHAPES[shape])
    plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage, lr_scale=cfg.train.lr_scale)
    loaded = load_model(cfg.model, projector_type=plan.projector_type, quant=cfg.quant,
                        skip_modules=plan.skip_modules(), compute_dtype=torch.float32)
    return loaded.model, loaded.processor, cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="score this shape's random model instead of a finished run")
    parser.add_argument("--tsv", default=None)
    parser.add_argument("--max-questions", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="passes of each batched mode, alternating")
    args = parser.parse_args()
    if (args.run_dir is None) == (args.shape is None):
        parser.error("give a RUN_DIR or --shape, one of them")

    model, processor, cfg = load_trained(args.run_dir) if args.shape is None else random_model(args.shape)
    params = sum(p.numel() for p in model.parameters())
    tsv = args.tsv or benchmark_files(cfg.eval, cfg.world)["tsv"]
    results = {}
    # The batched modes alternate, `--repeats` times each, and keep their fastest pass: the first pass
    # over a benchmark pays for warm-up (the allocator meeting each padded shape), whichever mode it is.
    runs = [("likelihood", "likelihood", args.batch_size), ("generate", "generate", args.batch_size)] * args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        for name, mode, batch in [*runs, ("generate x1", "generate", 1)]:
            out_dir = Path(tmp) / name.replace(" ", "_")
            result = evaluate_mmbench(model, processor, tsv, mode=mode, out_dir=out_dir, batch_size=batch,
                                      max_new_tokens=args.max_new_tokens, max_questions=args.max_questions,
                                      n_boot=200)
            if name not in results or result[0]["seconds"] < results[name][0]["seconds"]:
                results[name] = result
    (gen, gen_rows), (lik, lik_rows) = results["generate"], results["likelihood"]
    one = results["generate x1"][0]
    agree = sum(g["prediction"] == lk["prediction"] for g, lk in zip(gen_rows, lik_rows)) / len(gen_rows)
    print(f"model: {args.run_dir or f'shape {args.shape} (random weights)'}, {params / 1e6:.1f}M parameters, "
          f"{torch.get_num_threads()} threads")
    print(f"benchmark: {tsv} ({gen['n_questions']} questions, {gen['n_rows']} rows); batched modes: fastest of "
          f"{args.repeats} alternating passes")
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
