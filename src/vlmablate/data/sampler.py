"""Batch orders (random, length grouped, LLaVA's modality-length grouping and a padding-efficient variant), per rank.

Every order is a function of (lengths, batch, ranks, generator), and the generator is seeded from
(seed, epoch), so batch composition changes with both and every rank computes the same global order.
Lengths follow LLaVA's `modality_lengths`: > 0 for a record with an image, < 0 for a text-only one.
"One step" below is the global batch of one optimizer step, `world_size × batch_size` (the caller
folds gradient accumulation into `world_size`, as LLaVA does).

- `random`: a permutation.
- `modality_length`: LLaVA's `get_modality_length_grouped_indices`, exactly. Within each modality:
  a random permutation, cut into megabatches of one step, each sorted by length (longest first) and
  split into `world_size` chunks of `batch_size` that balance total length (LLaVA's
  `split_to_even_chunks`: the next record goes to the lightest chunk that is not full; a megabatch
  that does not divide evenly is dealt out round-robin). Then every megabatch except each
  modality's last goes in random order, and the two last ones, merged, end the epoch in index order
  (LLaVA's `sorted(additional_batch)`). With one modality only, it is that modality's grouping as is.
  Its purpose is rank balance; at one rank it barely reduces padding.
- `modality_megabatch`: HF `LengthGroupedSampler`'s megabatch within each modality. A random
  permutation, cut into megabatches of `mult` steps, `mult = min(n // (4 · step), 50)` (at least 1),
  each sorted by length, longest first, then cut into steps. The full steps of both modalities are
  shuffled together (so the epoch does not run long-to-short every 50 steps); the two modalities'
  remainders (each shorter than a step) end the epoch, images first, so at most one micro-batch
  mixes modalities. HF counts its megabatch in per-device batches; here it counts steps, so a
  megabatch spans the same number of steps on any number of ranks.
- `length`: HF's `get_length_grouped_indices` without modality: the same megabatches over all
  records, in order, and the longest record moved to the front of the epoch (so an out-of-memory
  shows at the first step).
- `sorted`: each modality sorted by length over the whole data set, cut into steps, the steps
  shuffled, the leftovers merged last. The least padding, but the batches are fixed: only their
  order changes with the seed and the epoch. A reference point, not a recipe.

`RankBatchSampler` turns an order into the batches of one rank. Each run of `world_size × batch_size`
indices is one global batch, and rank r takes its r-th slice, so every record is served exactly once
per epoch across ranks and every rank makes the same number of steps. No rank ever gets more than
`batch_size`: a short last global batch is spread evenly over the ranks, and one holding fewer
records than there are ranks is spread, with the full global batch before it, over two steps. At
`batch_size` 1 that is impossible without a repeat, so those few (< world size) records sit out the
epoch; they are the order's last, so a different few each epoch.

The sampler is rank-aware, so it subclasses transformers' `BatchRebalanceSampler`: the marker that
makes Trainer pass it to the DataLoader as a batch sampler and keeps accelerate from sharding it again.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import torch
from transformers.trainer_pt_utils import BatchRebalanceSampler

log = logging.getLogger(__name__)

SAMPLERS = ("random", "length", "modality_length", "modality_megabatch", "sorted")
MAX_MEGABATCH_MULT = 50  # HF's LengthGroupedSampler caps mega_batch_mult at 50


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator for one (seed, epoch). Mixed, not added: seed 0 epoch 1 and seed 1 epoch 0 must differ."""
    # torch keeps only 32 bits of a CPU seed, so the mix is reduced to 32 bits by a proper seed sequence.
    state = np.random.SeedSequence([seed, epoch]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _modalities(lengths: list[int]) -> tuple[list[int], list[int]]:
    if any(length == 0 for length in lengths):
        raise ValueError("modality lengths must be non-zero: positive for image samples, negative for text-only")
    return [i for i, n in enumerate(lengths) if n > 0], [i for i, n in enumerate(lengths) if n < 0]


def _longest_first(indices: list[int], lengths: list[int]) -> list[int]:
    return sorted(indices, key=lambda i: -abs(lengths[i]))  # stable: ties keep the random order


def _permuted(indices: list[int], generator: torch.Generator | None) -> list[int]:
    return [indices[k] for k in torch.randperm(len(indices), generator=generator).tolist()]


# --- LLaVA's modality_length ---------------------------------------------------------------------


def balanced_chunks(megabatch: list[int], lengths: list[int], parts: int) -> list[list[int]]:
    """LLaVA's `split_to_even_chunks`: `parts` equal-size chunks of balanced total length."""
    if len(megabatch) % parts:
        return [megabatch[k::parts] for k in range(parts)]
    size = len(megabatch) // parts
    chunks: list[list[int]] = [[] for _ in range(parts)]
    totals = [0.0] * parts
    for i in megabatch:
        lightest = totals.index(min(totals))
        chunks[lightest].append(i)
        totals[lightest] += abs(lengths[i])
        if len(chunks[lightest]) == size:
            totals[lightest] = float("inf")  # full: never the lightest again
    return chunks


def _llava_grouped(indices: list[int], lengths: list[int], batch_size: int, world_size: int,
                   generator: torch.Generator | None) -> list[list[int]]:
    """LLaVA's `get_length_grouped_indices` on one modality, as a list of megabatches (chunks flattened)."""
    shuffled = _permuted(indices, generator)
    size = batch_size * world_size
    megabatches = [_longest_first(shuffled[s:s + size], lengths) for s in range(0, len(shuffled), size)]
    return [[i for chunk in balanced_chunks(mb, lengths, world_size) for i in chunk] for mb in megabatches]


def modality_length_grouped_indices(lengths: list[int], batch_size: int, world_size: int,
                                    generator: torch.Generator | None = None) -> list[int]:
    """LLaVA's `get_modality_length_grouped_indices` (module docstring). Draws: images, text, megabatch order."""
    image, text = _modalities(lengths)
    if not image or not text:
        return [i for mb in _llava_grouped(image or text, lengths, batch_size, world_size, generator) for i in mb]
    image_mbs = _llava_grouped(image, lengths, batch_size, world_size, generator)
    text_mbs = _llava_grouped(text, lengths, batch_size, world_size, generator)
    full = image_mbs[:-1] + text_mbs[:-1]
    order = torch.randperm(len(full), generator=generator).tolist()
    return [i for k in order for i in full[k]] + sorted(image_mbs[-1] + text_mbs[-1])


# --- HF-style megabatches --------------------------------------------------------------------------


def megabatch_mult(n: int, step: int) -> int:
    """HF's `mega_batch_mult`: min(n // (4 · step), 50), at least 1."""
    return max(1, min(n // (4 * step), MAX_MEGABATCH_MULT))


def _sorted_megabatches(indices: list[int], lengths: list[int], step: int,
                        generator: torch.Generator | None) -> list[list[int]]:
    shuffled = _permuted(indices, generator)
    size = megabatch_mult(len(indices), step) * step
    return [_longest_first(shuffled[s:s + size], lengths) for s in range(0, len(shuffled), size)]


def modality_megabatch_indices(lengths: list[int], batch_size: int, world_size: int,
                               generator: torch.Generator | None = None) -> list[int]:
    """Modality-pure HF megabatches, steps shuffled (module docstring). Draws: images, text, step order."""
    step = batch_size * world_size
    steps: list[list[int]] = []
    remainders: list[int] = []
    for indices in _modalities(lengths):
        flat = [i for mb in _sorted_megabatches(indices, lengths, step, generator) for i in mb]
        cut = len(flat) - len(flat) % step
        steps += [flat[s:s + step] for s in range(0, cut, step)]
        remainders += flat[cut:]
    order = torch.randperm(len(steps), generator=generator).tolist()
    return [i for k in order for i in steps[k]] + remainders


def length_grouped_indices(lengths: list[int], batch_size: int, world_size: int,
                           generator: torch.Generator | None = None) -> list[int]:
    """HF's `get_length_grouped_indices` with one step as its batch (module docstring)."""
    megabatches = _sorted_megabatches(list(range(len(lengths))), lengths, batch_size * world_size, generator)
    if megabatches:  # HF: swap the longest record into the first place
        longest = max(range(len(megabatches)), key=lambda k: abs(lengths[megabatches[k][0]]))
        megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [i for mb in megabatches for i in mb]


def sorted_indices(lengths: list[int], batch_size: int, world_size: int,
                   generator: torch.Generator | None = None) -> list[int]:
    """Each modality sorted over the whole data set; fixed steps in random order (module docstring)."""
    step = batch_size * world_size
    steps: list[list[int]] = []
    leftovers: list[int] = []
    for indices in _modalities(lengths):
        flat = _longest_first(indices, lengths)
        cut = len(flat) - len(flat) % step
        steps += [flat[s:s + step] for s in range(0, cut, step)]
        leftovers += flat[cut:]
    order = torch.randperm(len(steps), generator=generator).tolist()
    return [i for k in order for i in steps[k]] + leftovers


_ORDERS = {"length": length_grouped_indices, "modality_length": modality_length_grouped_indices,
           "modality_megabatch": modality_megabatch_indices, "sorted": sorted_indices}


def ordered_indices(kind: str, lengths: list[int], batch_size: int, world_size: int,
                    generator: torch.Generator | None = None) -> list[int]:
    """One epoch's order of all indices for sampler `kind`."""
    if kind == "random":
        return torch.randperm(len(lengths), generator=generator).tolist()
    if kind not in _ORDERS:
        raise ValueError(f"unknown sampler {kind!r}; expected one of {SAMPLERS}")
    return _ORDERS[kind](lengths, batch_size, world_size, generator)


# --- per-rank batches ----------------------------------------------------------------------------


def step_count(records: int, batch_size: int, num_replicas: int) -> int:
    """Steps of one epoch under `split_global_batches`."""
    if records < num_replicas:
        raise ValueError(f"{records} records cannot feed {num_replicas} ranks (every rank needs one)")
    full, tail = divmod(records, batch_size * num_replicas)
    if tail == 0 or (tail < num_replicas and batch_size == 1):  # the second: the tail sits out
        return full
    return full + 1  # a tail of fewer records than ranks takes the full batch before over two steps


def split_global_batches(order: list[int], batch_size: int, num_replicas: int) -> list[list[list[int]]]:
    """Global batches, each as one list of indices per rank, none larger than `batch_size` (module docstring)."""
    steps = step_count(len(order), batch_size, num_replicas)
    size = batch_size * num_replicas
    full, tail = divmod(len(order), size)
    if 0 < tail < num_replicas and batch_size > 1:
        full -= 1  # fewer records than ranks: they and the full batch before share two steps
    batches = [[order[s + r * batch_size: s + (r + 1) * batch_size] for r in range(num_replicas)]
               for s in range(0, full * size, size)]
    rest = order[full * size:]
    rest_steps = steps - full  # 0: none, or a tail that sits out at batch size 1; 1: a tail for every rank; 2: above
    if rest_steps:  # evenly, so every rank gets 1..batch_size records a step
        parts = _even_split(rest, rest_steps * num_replicas)
        batches += [parts[k * num_replicas:(k + 1) * num_replicas] for k in range(rest_steps)]
    return batches


def _even_split(indices: list[int], parts: int) -> list[list[int]]:
    q, r = divmod(len(indices), parts)
    out, start = [], 0
    for k in range(parts):
        n = q + (1 if k < r else 0)
        out.append(indices[start:start + n])
        start += n
    return out


class RankBatchSampler(BatchRebalanceSampler):
    """The batches of rank `rank` out of `num_replicas`; a new order every (seed, epoch)."""

    def __init__(self, lengths: list[int], *, kind: str, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 grad_accum: int = 1, seed: int = 0):
        # BatchRebalanceSampler.__init__ is not called: only its type is wanted (see the module docstring).
        if kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {kind!r}; expected one of {SAMPLERS}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.lengths = list(lengths)
        self.kind = kind
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.grad_accum = grad_accum
        self.seed = seed
        self.epoch = 0
        left_out = len(self.lengths) % num_replicas if batch_size == 1 else 0
        if left_out and rank == 0:
            log.warning("batch size 1 on %d ranks: %d of %d records sit out each epoch (a different few each "
                        "epoch) so that no record is repeated", num_replicas, left_out, len(self.lengths))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[list[int]]]:
        # As LLaVA, one grouping step spans every rank's micro-batches of one optimizer step.
        order = ordered_indices(self.kind, self.lengths, self.batch_size, self.num_replicas * self.grad_accum,
                                epoch_generator(self.seed, self.epoch))
        return split_global_batches(order, self.batch_size, self.num_replicas)

    def __iter__(self):
        for parts in self.global_batches():
            yield parts[self.rank]

    def __len__(self) -> int:
        return step_count(len(self.lengths), self.batch_size, self.num_replicas)


def padding_efficiency(batches: list[list[int]], lengths: list[int]) -> float:
    """Real tokens / padded tokens over batches of indices (1.0 = no padding)."""
    real = sum(abs(lengths[i]) for b in batches for i in b)
    padded = sum(max(abs(lengths[i]) for i in b) * len(b) for b in batches if b)
    return real / padded if padded else 1.0


def shared_batch_fraction(first: list[list[int]], second: list[list[int]]) -> float:
    """The share of `first`'s micro-batches that `second` also has, as sets of records (in any place)."""
    if not first:
        return 0.0
    common = Counter(frozenset(b) for b in first) & Counter(frozenset(b) for b in second)
    return sum(common.values()) / len(first)
