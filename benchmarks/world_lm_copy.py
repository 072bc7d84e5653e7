"""Can the tiny world's language model copy from its context? First copy vs second copy, side by side.

A pretrained LLM predicts the second copy of a repeated passage almost perfectly (induction heads),
and LLaVA's stages lean on that: stage 1 trains only a projector under a frozen LM, which must then
read the image tokens out of its context. This script measures the same ability in the world's LM:
it feeds sequences of random tokens, each followed by an exact repeat, and prints the mean next-token
loss on the first copy and on the second. An LM that copies scores far lower on the second.

`--train-steps N` also pretrains a fresh LM of the world LM's shape as a plain text LM (captions and
dialogues, no boards), with as many texts again of repeated word sequences (`--repeat-share`), for N
steps, and scores it the same way: what plain text pretraining with copying in it buys, beside what the
world's board-reading pretraining bought.

    python benchmarks/world_lm_copy.py [--train-steps 0] [--repeat-share 0.5] [--n 32] [--length 30] [override ...]

Overrides are the main job's (`world=test`, ...); the world is built first if missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM

from vlmablate.config import register_configs
from vlmablate.train.stages import compose_config
from vlmablate.world import build, pretrain


@torch.inference_mode()
def copy_losses(model, sequences: list[list[int]], bos_id: int) -> tuple[float, float]:
    """Mean next-token loss over the first copy and over the second copy of each sequence fed as
    BOS + s + s. The first token of each copy is left out: nothing in the context predicts it."""
    first, second = [], []
    for seq in sequences:
        ids = torch.tensor([[bos_id, *seq, *seq]])
        loss = F.cross_entropy(model(input_ids=ids).logits[0, :-1].float(), ids[0, 1:], reduction="none")
        n = len(seq)  # loss[i] predicts ids[i + 1]: the first copy is ids[1:n+1], the second ids[n+1:]
        first.append(loss[1:n].mean().item())
        second.append(loss[n + 1:].mean().item())
    return sum(first) / len(first), sum(second) / len(second)


def random_token_sequences(tokenizer, n: int, length: int, seed: int) -> list[list[int]]:
    """n sequences of `length` ids drawn uniformly from the vocabulary, special tokens excluded."""
    special = set(tokenizer.all_special_ids)
    pool = [i for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(seed)
    return [[rng.choice(pool) for _ in range(length)] for _ in range(n)]


def vocabulary_words(tokenizer) -> list[str]:
    """The alphabetic entries of the tokenizer's vocabulary (BPE's leading-space marker removed)."""
    words = {token.lstrip("Ġ") for token in tokenizer.get_vocab()}
    return sorted(w for w in words if w.isalpha() and len(w) > 1)


def repeat_texts(words: list[str], n: int, seed: int, lengths: tuple[int, int] = (5, 25)) -> list[str]:
    """n texts "w1 ... wk w1 ... wk" of k random words, k in `lengths`: text in which copying pays."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        passage = " ".join(rng.choice(words) for _ in range(rng.randint(*lengths)))
        texts.append(f"{passage} {passage}")
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="sequences scored")
    parser.add_argument("--length", type=int, default=30, help="tokens in each copy")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="also pretrain an LM for this many steps on the corpus plus repeated texts (0: don't)")
    parser.add_argument("--repeat-share", type=float, default=0.5, help="share of repeated texts in that corpus")
    parser.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args()
    if not 0 <= args.repeat_share < 1:
        parser.error(f"--repeat-share must be in [0, 1), got {args.repeat_share}")

    register_configs()
    cfg, _ = compose_config(["train.progress=false", *overrides])
    paths = build.ensure_world(cfg.world, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(paths.llm)
    sequences = random_token_sequences(tokenizer, args.n, args.length, args.seed)
    rows = [("world LM", *copy_losses(LlamaForCausalLM.from_pretrained(paths.llm).eval(), sequences,
                                      tokenizer.bos_token_id), None)]

    if args.train_steps:
        texts, held_out = build.lm_texts(cfg.world, paths.data, tokenizer)
        n_repeat = round(len(texts) * args.repeat_share / (1 - args.repeat_share))
        shape = LlamaForCausalLM.from_pretrained(paths.llm).config
        lm_cfg = pretrain.LMPretrainConfig(hidden=shape.hidden_size, layers=shape.num_hidden_layers,
                                           heads=shape.num_attention_heads, kv_heads=shape.num_key_value_heads,
                                           intermediate=shape.intermediate_size)
        # enough epochs that the token budget, not the data, ends it
        lm_cfg = dataclasses.replace(lm_cfg, epochs=1000,
                                     max_train_tokens=args.train_steps * lm_cfg.batch_size * lm_cfg.max_length)
        start = time.perf_counter()
        lm, metrics = pretrain.pretrain_language_model(
            texts + repeat_texts(vocabulary_words(tokenizer), n_repeat, args.seed), held_out, tokenizer, lm_cfg,
            progress=False)
        label = f"{args.train_steps} steps, {args.repeat_share:.0%} repeats"
        rows.append((label, *copy_losses(lm.eval(), sequences, tokenizer.bos_token_id),
                     f"{time.perf_counter() - start:.0f} s, held-out perplexity {metrics['ppl_after']}"))

    print(f"\nnext-token loss on {args.n} random {args.length}-token sequences, each followed by a repeat")
    print(f"{'LM':>28} | {'first copy':>10} | {'second copy':>11} | {'drop':>6} | note")
    for label, first, second, note in rows:
        print(f"{label:>28} | {first:>10.3f} | {second:>11.3f} | {first - second:>+6.3f} | {note or ''}")


if __name__ == "__main__":
    main()
