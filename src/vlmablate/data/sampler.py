"""Batch orders: random, length grouped, and LLaVA's modality-length grouping, per rank.

`modality_length` is LLaVA's `group_by_modality_length`:

1. split indices by modality: length > 0 has an image, length < 0 is text-only;
2. sort each modality by length, longest first;
3. cut megabatches of `world_size × batch_size` consecutive indices within each modality;
4. shuffle the full megabatches of both modalities together (the order inside one is kept);
5. merge the two partial leftovers and put them last.

Data with one modality only is the same procedure with an empty second list (a known crash
elsewhere). `length` is plain length grouping (HF's `LengthGroupedSampler`: shuffle, then sort
within groups of 50 megabatches, longest first), `random` a permutation.

`RankBatchSampler` turns an order into the batches of one rank. Each run of `world_size × batch_size`
indices is one step's global batch, and rank r takes its r-th slice, so every record is served exactly
once per epoch across ranks and every rank makes the same number of steps. The last global batch,
when short, is spread evenly over the ranks (smaller batches); if it holds fewer records than there
are ranks, it joins the global batch before it (some batches one larger). Under gradient
accumulation the grouping megabatch spans all micro-batches of one optimizer step, as in LLaVA.

The sampler is rank-aware, so it subclasses transformers' `BatchRebalanceSampler`: the marker that
makes Trainer pass it to the DataLoader as a batch sampler and keeps accelerate from sharding it again.
"""

from __future__ import annotations

import torch
from transformers.trainer_pt_utils import BatchRebalanceSampler

SAMPLERS = ("random", "length", "modality_length")
LENGTH_GROUP_MEGABATCHES = 50  # as HF's LengthGroupedSampler (megabatch_mult)


def modality_length_grouped_indices(lengths: list[int], batch_size: int, world_size: int,
                                    generator: torch.Generator | None = None) -> list[int]:
    if any(length == 0 for length in lengths):
        raise ValueError("modality lengths must be non-zero: positive for image samples, negative for text-only")
    megabatch = batch_size * world_size
    full: list[list[int]] = []
    leftovers: list[int] = []
    for sign in (1, -1):
        indices = sorted((i for i, n in enumerate(lengths) if n * sign > 0), key=lambda i: -abs(lengths[i]))
        cut = len(indices) - len(indices) % megabatch
        full += [indices[start:start + megabatch] for start in range(0, cut, megabatch)]
        leftovers += indices[cut:]
    order = torch.randperm(len(full), generator=generator).tolist()
    return [i for k in order for i in full[k]] + leftovers


def length_grouped_indices(lengths: list[int], batch_size: int, world_size: int,
                           generator: torch.Generator | None = None) -> list[int]:
    """Shuffle, then sort groups of LENGTH_GROUP_MEGABATCHES megabatches by length, longest first."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    group = LENGTH_GROUP_MEGABATCHES * batch_size * world_size
    return [i for start in range(0, len(perm), group)
            for i in sorted(perm[start:start + group], key=lambda i: -abs(lengths[i]))]


def ordered_indices(kind: str, lengths: list[int], batch_size: int, world_size: int,
                    generator: torch.Generator | None = None) -> list[int]:
    """One epoch's order of all indices for sampler `kind`."""
    if kind == "modality_length":
        return modality_length_grouped_indices(lengths, batch_size, world_size, generator)
    if kind == "length":
        return length_grouped_indices(lengths, batch_size, world_size, generator)
    if kind == "random":
        return torch.randperm(len(lengths), generator=generator).tolist()
    raise ValueError(f"unknown sampler {kind!r}; expected one of {SAMPLERS}")


def split_global_batches(order: list[int], batch_size: int, num_replicas: int) -> list[list[list[int]]]:
    """Global batches, each as one list of indices per rank (see the module docstring for the tail)."""
    size = batch_size * num_replicas
    if len(order) < num_replicas:
        raise ValueError(f"{len(order)} records cannot feed {num_replicas} ranks (every rank needs one)")
    cut = len(order) - len(order) % size
    batches = [[order[s + r * batch_size: s + (r + 1) * batch_size] for r in range(num_replicas)]
               for s in range(0, cut, size)]
    tail = order[cut:]
    if tail and len(tail) < num_replicas:  # too few for every rank: join the batch before
        tail = [i for part in batches.pop() for i in part] + tail
    if tail:
        batches.append(_even_split(tail, num_replicas))
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
    """The batches of rank `rank` out of `num_replicas`; a new order every epoch (seed + epoch)."""

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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[list[int]]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = ordered_indices(self.kind, self.lengths, self.batch_size, self.num_replicas * self.grad_accum,
                                generator)
        return split_global_batches(order, self.batch_size, self.num_replicas)

    def __iter__(self):
        for parts in self.global_batches():
            yield parts[self.rank]

    def __len__(self) -> int:
        n, size = len(self.lengths), self.batch_size * self.num_replicas
        full, tail = divmod(n, size)
        return full + (1 if tail >= self.num_replicas else 0) if full else 1


def padding_efficiency(batches: list[list[int]], lengths: list[int]) -> float:
    """Real tokens / padded tokens over batches of indices (1.0 = no padding)."""
    real = sum(abs(lengths[i]) for b in batches for i in b)
    padded = sum(max(abs(lengths[i]) for i in b) * len(b) for b in batches if b)
    return real / padded if padded else 1.0
