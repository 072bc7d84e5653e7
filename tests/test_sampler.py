"""Samplers: LLaVA's exact order, and per-rank batches that serve every record once for 1, 2 and 8 ranks."""

from __future__ import annotations

import random

import pytest
import torch

from vlmablate.data.sampler import (
    RankBatchSampler,
    length_grouped_indices,
    modality_length_grouped_indices,
    padding_efficiency,
    split_global_batches,
)


def mixed_lengths(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(50, 600) if rng.random() < 0.7 else -rng.randint(5, 300) for _ in range(n)]


def rank_batches(lengths, kind: str, batch: int, world: int, seed: int = 3, epoch: int = 0, accum: int = 1):
    """Each rank's batches, as a DataLoader on that rank would draw them."""
    out = []
    for rank in range(world):
        sampler = RankBatchSampler(lengths, kind=kind, batch_size=batch, num_replicas=world, rank=rank,
                                   grad_accum=accum, seed=seed)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
        assert len(sampler) == len(out[-1])
    return out


def test_exact_order_on_crafted_lengths():
    lengths = [5, -3, 7, -1, 2, 9, -8, 4]
    # images by length: 5(9) 2(7) 0(5) 7(4) 4(2) -> megabatches [5,2] [0,7], leftover [4]
    # text by length:   6(8) 1(3) 3(1)           -> megabatch [6,1], leftover [3]
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(3, generator=torch.Generator().manual_seed(0)).tolist()
    full = [[5, 2], [0, 7], [6, 1]]
    assert modality_length_grouped_indices(lengths, 2, 1, g) == [i for k in order for i in full[k]] + [4, 3]


def test_split_global_batches_tail_rules():
    # 10 records, 2 ranks x 2: two full global batches, tail of 2 spread one per rank
    assert split_global_batches(list(range(10)), 2, 2) == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8], [9]]]
    # 9 records, 4 ranks x 2: tail of 1 < 4 ranks joins the batch before: 9 split 3,2,2,2
    assert split_global_batches(list(range(9)), 2, 4) == [[[0, 1, 2], [3, 4], [5, 6], [7, 8]]]
    # fewer records than a global batch but enough for every rank
    assert split_global_batches(list(range(5)), 4, 2) == [[[0, 1, 2], [3, 4]]]
    with pytest.raises(ValueError, match="cannot feed 8 ranks"):
        split_global_batches(list(range(5)), 1, 8)


@pytest.mark.parametrize("kind", ["random", "length", "modality_length"])
@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_every_record_once_across_ranks_with_equal_steps(kind, world_size):
    lengths = mixed_lengths(997, world_size)
    per_rank = rank_batches(lengths, kind, batch=4, world=world_size)
    served = [i for batches in per_rank for b in batches for i in b]
    assert sorted(served) == list(range(len(lengths)))  # exactly once, no duplicate padding
    assert len({len(batches) for batches in per_rank}) == 1  # every rank makes the same number of steps
    assert all(b for batches in per_rank for b in batches)  # and never gets an empty batch


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_modality_batches_never_mix_except_the_merged_leftovers(world_size):
    lengths = mixed_lengths(997, 10 + world_size)
    batch, accum = 4, 2
    per_rank = rank_batches(lengths, "modality_length", batch=batch, world=world_size, accum=accum)
    mega = batch * world_size * accum
    n_full = sum(n // mega for n in (sum(x > 0 for x in lengths), sum(x < 0 for x in lengths)))
    steps_in_full = n_full * accum  # global micro-batches that lie inside full megabatches
    for batches in per_rank:
        for b in batches[:steps_in_full]:
            assert len({lengths[i] > 0 for i in b}) == 1
    mixed = [b for batches in per_rank for b in batches if len({lengths[i] > 0 for i in b}) > 1]
    assert len(mixed) <= world_size  # only the last global batch, which holds the leftovers


def test_one_modality_only_and_epochs_differ():
    lengths = [10, 20, 30, 40, 50]
    for world in (1, 2):  # a known crash elsewhere: data of one modality only
        per_rank = rank_batches(lengths, "modality_length", batch=2, world=world, seed=0)
        assert sorted(i for b in per_rank for x in b for i in x) == [0, 1, 2, 3, 4]
    text_only = rank_batches([-3, -5, -1, -9], "modality_length", batch=2, world=1, seed=0)[0]
    assert sorted(i for b in text_only for i in b) == [0, 1, 2, 3]
    lengths = mixed_lengths(200, 0)
    first = rank_batches(lengths, "modality_length", batch=4, world=2, epoch=0)
    again = rank_batches(lengths, "modality_length", batch=4, world=2, epoch=0)
    second = rank_batches(lengths, "modality_length", batch=4, world=2, epoch=1)
    assert first == again and first != second
    with pytest.raises(ValueError, match="non-zero"):
        modality_length_grouped_indices([3, 0], 2, 1)


def test_length_grouping_sorts_within_groups_of_megabatches():
    lengths = [7, 3, 9, 1, 5, 8, 2, 6]
    order = length_grouped_indices(lengths, batch_size=1, world_size=1, generator=torch.Generator().manual_seed(0))
    assert order == sorted(range(8), key=lambda i: -lengths[i])  # 8 records < 50 megabatches: one sorted group


def test_padding_efficiency_on_crafted_batches():
    lengths = [10, -10, 4, 6]
    assert padding_efficiency([[0, 1], [2, 3]], lengths) == pytest.approx(30 / 32)
    assert padding_efficiency([[0, 2], [1, 3]], lengths) == pytest.approx(30 / 40)


def test_grouping_removes_padding_on_a_mix665k_like_distribution():
    rng = random.Random(0)
    # image conversations: 576 image tokens + 20..1500 text tokens; text-only: 20..1200 tokens
    lengths = [576 + rng.randint(20, 1500) if rng.random() < 0.9 else -rng.randint(20, 1200) for _ in range(20000)]
    eff = {kind: padding_efficiency(rank_batches(lengths, kind, batch=16, world=1, seed=0)[0], lengths)
           for kind in ("random", "length", "modality_length")}
    assert eff["modality_length"] >= 0.95 and eff["length"] >= 0.95
    assert eff["random"] < 0.75
