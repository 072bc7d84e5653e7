"""LLaVA's modality-length grouped sampler: exact order, coverage, no mixed batches, one modality."""

from __future__ import annotations

import random

import pytest
import torch

from vlmablate.data.sampler import ModalityLengthGroupedSampler, modality_length_grouped_indices, padding_efficiency


def test_exact_order_on_crafted_lengths():
    lengths = [5, -3, 7, -1, 2, 9, -8, 4]
    # images by length: 5(9) 2(7) 0(5) 7(4) 4(2) -> megabatches [5,2] [0,7], leftover [4]
    # text by length:   6(8) 1(3) 3(1)           -> megabatch [6,1], leftover [3]
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(3, generator=torch.Generator().manual_seed(0)).tolist()
    full = [[5, 2], [0, 7], [6, 1]]
    assert modality_length_grouped_indices(lengths, 2, 1, g) == [i for k in order for i in full[k]] + [4, 3]


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_every_record_once_and_batches_never_mix_modalities(world_size):
    rng = random.Random(world_size)
    lengths = [rng.randint(50, 600) if rng.random() < 0.7 else -rng.randint(5, 300) for _ in range(997)]
    batch = 4
    order = list(ModalityLengthGroupedSampler(lengths, batch_size=batch, world_size=world_size, seed=3))
    assert sorted(order) == list(range(len(lengths)))
    mega = batch * world_size
    n_full = sum(n // mega for n in (sum(1 for x in lengths if x > 0), sum(1 for x in lengths if x < 0)))
    for k in range(n_full):  # every rank's micro-batch inside a full megabatch is one modality
        chunk = order[k * mega:(k + 1) * mega]
        assert len({lengths[i] > 0 for i in chunk}) == 1


def test_one_modality_only_and_epochs_differ():
    lengths = [10, 20, 30, 40, 50]
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=2, seed=0)
    first = list(sampler)
    assert sorted(first) == [0, 1, 2, 3, 4] and first[-1] == 0  # shortest is the leftover, last
    sampler.set_epoch(1)
    assert sorted(list(sampler)) == [0, 1, 2, 3, 4]
    assert list(ModalityLengthGroupedSampler([-3, -5], batch_size=2)) == [1, 0]
    with pytest.raises(ValueError, match="non-zero"):
        modality_length_grouped_indices([3, 0], 2, 1)


def test_grouping_removes_padding_on_a_mix665k_like_distribution():
    rng = random.Random(0)
    # image conversations: 576 image tokens + 20..1500 text tokens; text-only: 20..1200 tokens
    lengths = [576 + rng.randint(20, 1500) if rng.random() < 0.9 else -rng.randint(20, 1200) for _ in range(20000)]
    batch = 16
    grouped = list(ModalityLengthGroupedSampler(lengths, batch_size=batch, seed=0))
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    batches = lambda order: [order[i:i + batch] for i in range(0, len(order), batch)]  # noqa: E731
    assert padding_efficiency(batches(grouped), lengths) >= 0.95
    assert padding_efficiency(batches(shuffled), lengths) < 0.75
