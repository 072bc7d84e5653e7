"""How fast does the world's LM learn to read a board? The reading probe per kind, at every evaluation.

Trains the reader LM of `vlmablate.world.reader` (board transcripts with questions, captions, text-only
dialogues) and prints, every `--eval-every` steps, the greedy exact-match accuracy on held-out boards for
each kind of question, then the final model's score on blank boards (what it gets without reading).
`--set FIELD=VALUE` changes one field of `ReaderConfig` (or of its `reading.` sub-config) per run, so a
small sweep is one command per variant:

    python benchmarks/world_reading.py --steps 800 --set reading.curriculum_steps=500 --set kv_heads=6
    python benchmarks/world_reading.py --set reading.kinds=colour,shape --set heads=3 --json out.json

Values are parsed as Python literals where they can be (`3`, `1e-3`, `(3, 5)`); a comma list becomes a
tuple of strings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from vlmablate.world.components import parse_value
from vlmablate.world.reader import ReaderConfig, train_reader, world_tokenizer
from vlmablate.world.reading import ReadingConfig


def apply_sets(cfg: ReaderConfig, sets: list[str]) -> ReaderConfig:
    """`field=value` and `reading.field=value` overrides of a ReaderConfig, checked against its fields."""
    top, reading = {}, {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants FIELD=VALUE, got {item!r}")
        target, name, cls = (reading, key[len("reading."):], ReadingConfig) if key.startswith("reading.") \
            else (top, key, ReaderConfig)
        known = {f.name for f in dataclasses.fields(cls)}
        if name not in known or name == "reading":
            raise SystemExit(f"unknown field {key!r}; known: {sorted(known - {'reading'})} and reading.<field>")
        value = parse_value(value)
        if name == "kinds" and isinstance(value, str):
            value = (value,)
        target[name] = value
    return dataclasses.replace(cfg, **top, reading=dataclasses.replace(cfg.reading, **reading))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--probe", type=int, default=50, help="held-out questions per kind")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--vocab-size", type=int, default=768)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the config and the probe history here")
    parser.add_argument("--save", default=None, metavar="DIR",
                        help="also save the LM with its tokenizer (save_pretrained) and the board (board.pt) here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = apply_sets(ReaderConfig(steps=args.steps, eval_every=args.eval_every, probe_per_kind=args.probe),
                     args.sets)
    start = time.perf_counter()
    tokenizer = world_tokenizer(args.vocab_size)
    print(f"config: {json.dumps(dataclasses.asdict(cfg))}", flush=True)
    model, board, metrics = train_reader(cfg, tokenizer, progress=False, log=lambda row: print(row, flush=True))
    if args.save:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
        torch.save(board.state_dict(), f"{args.save}/board.pt")
    blank = metrics["blank"]
    print("blank boards:  " + "  ".join(f"{k} {v:.2f}" for k, v in blank.items()))
    print(f"total {time.perf_counter() - start:.0f}s, LM {metrics['params']:,} parameters, "
          f"{metrics['train_seconds']:.0f}s of training")
    result = {"config": dataclasses.asdict(cfg), **metrics}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
