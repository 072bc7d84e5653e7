"""Samplers: LLaVA's exact order against an independent re-implementation, the megabatch variant's rules,
fresh batches per seed and epoch, and per-rank batches that serve every record once, never above the batch size."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import CONF, load_benchmark
from omegaconf import OmegaConf

from vlmablate.config import _CHOICES
from vlmablate.data.sampler import (
    SAMPLERS,
    RankBatchSampler,
    balanced_chunks,
    epoch_generator,
    length_grouped_indices,
    megabatch_mult,
    modality_length_grouped_indices,
    modality_megabatch_indices,
    ordered_indices,
    padding_efficiency,
    shared_batch_fraction,
    sorted_indices,
    split_global_batches,
    step_count,
)

FRESH = [k for k in SAMPLERS if k != "sorted"]  # every sampler whose batches change with the seed and the epoch


def mixed_lengths(n: int, seed: int, short: bool = False) -> list[int]:
    """70% image records, 30% text-only; `short` draws from few lengths, so ties are common."""
    rng = random.Random(seed)
    top = 6 if short else 600
    return [rng.randint(1, top) if rng.random() < 0.7 else -rng.randint(1, top) for _ in range(n)]


def rank_batches(lengths, kind: str, batch: int, world: int, seed: int = 3, epoch: int = 0, accum: int = 1):
    """Each rank's batches, each from its own sampler, as a DataLoader on that rank would draw them."""
    out = []
    for rank in range(world):
        sampler = RankBatchSampler(lengths, kind=kind, batch_size=batch, num_replicas=world, rank=rank,
                                   grad_accum=accum, seed=seed)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
        assert len(sampler) == len(out[-1])
    return out


def all_micro_batches(lengths, kind, batch, world, seed=3, epoch=0, accum=1) -> list[list[int]]:
    return [b for batches in rank_batches(lengths, kind, batch, world, seed, epoch, accum) for b in batches]


def is_mixed(batch: list[int], lengths: list[int]) -> bool:
    return len({lengths[i] > 0 for i in batch}) > 1


# --- an independent LLaVA, written from its description (positions within each modality, as LLaVA does) ---


def llava_split_to_even_chunks(indices, lengths, num_chunks):
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks = [[] for _ in range(num_chunks)]
    totals = [0 for _ in range(num_chunks)]
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def llava_length_grouped(lengths, batch_size, world_size, generator):
    indices = torch.randperm(len(lengths), generator=generator)
    size = world_size * batch_size
    megabatches = [indices[i:i + size].tolist() for i in range(0, len(lengths), size)]
    megabatches = [sorted(mb, key=lambda i: lengths[i], reverse=True) for mb in megabatches]
    megabatches = [llava_split_to_even_chunks(mb, lengths, world_size) for mb in megabatches]
    return [i for mb in megabatches for batch in mb for i in batch]


def llava_modality_grouped(lengths, batch_size, world_size, generator):
    if all(n > 0 for n in lengths):
        return llava_length_grouped(lengths, batch_size, world_size, generator)
    mm_indices, mm_lengths = zip(*[(i, n) for i, n in enumerate(lengths) if n > 0])
    lang_indices, lang_lengths = zip(*[(i, -n) for i, n in enumerate(lengths) if n < 0])
    mm = [mm_indices[i] for i in llava_length_grouped(mm_lengths, batch_size, world_size, generator)]
    lang = [lang_indices[i] for i in llava_length_grouped(lang_lengths, batch_size, world_size, generator)]
    size = world_size * batch_size
    mm_mbs = [mm[i:i + size] for i in range(0, len(mm), size)]
    lang_mbs = [lang[i:i + size] for i in range(0, len(lang), size)]
    megabatches = mm_mbs[:-1] + lang_mbs[:-1]
    megabatches = [megabatches[i] for i in torch.randperm(len(megabatches), generator=generator)]
    megabatches.append(sorted(mm_mbs[-1] + lang_mbs[-1]))
    return [i for mb in megabatches for i in mb]


@pytest.mark.parametrize("batch,world", [(1, 1), (2, 1), (4, 1), (3, 2), (4, 3), (2, 8), (16, 8)])
@pytest.mark.parametrize("short", [False, True])
def test_modality_length_is_llavas_order_exactly(batch, world, short):
    for trial in range(3):
        lengths = mixed_lengths(50 + 97 * trial + batch * world, seed=trial + 7 * batch + world, short=short)
        ours = modality_length_grouped_indices(lengths, batch, world, torch.Generator().manual_seed(trial))
        assert ours == llava_modality_grouped(lengths, batch, world, torch.Generator().manual_seed(trial))
        images = [abs(n) for n in lengths]  # one modality: LLaVA's plain length grouping
        ours = modality_length_grouped_indices(images, batch, world, torch.Generator().manual_seed(trial))
        assert ours == llava_length_grouped(images, batch, world, torch.Generator().manual_seed(trial))
        # text-only: sorted by |length| (LLaVA's code sorts the negative lengths, shortest first)
        text = [-n for n in images]
        assert modality_length_grouped_indices(text, batch, world, torch.Generator().manual_seed(trial)) == \
            modality_length_grouped_indices(images, batch, world, torch.Generator().manual_seed(trial))


def test_balanced_chunks_on_crafted_megabatches():
    lengths = [9, 7, 5, 4, 2, 1]
    # 9 -> chunk 0; 7 -> 1; 5 -> 1 (7 < 9); 4 -> 0 (13 vs 12... 9 < 12); 2 -> 1 (12 < 13), now full; 1 -> 0
    assert balanced_chunks([0, 1, 2, 3, 4, 5], lengths, 2) == [[0, 3, 5], [1, 2, 4]]  # totals 14 and 14
    assert balanced_chunks([0, 1, 2, 3, 4], lengths, 2) == [[0, 2, 4], [1, 3]]  # uneven: round-robin
    assert balanced_chunks([0, 1, 2, 3, 4, 5], [-n for n in lengths], 2) == [[0, 3, 5], [1, 2, 4]]


def test_modality_length_megabatches_final_batch_and_balance():
    rng = random.Random(5)  # distinct lengths: a megabatch's sorted order is then known from its records alone
    lengths = [n if rng.random() < 0.7 else -n for n in rng.sample(range(1, 10_000), 1003)]
    batch, world = 4, 3
    mega = batch * world
    order = modality_length_grouped_indices(lengths, batch, world, torch.Generator().manual_seed(1))
    assert sorted(order) == list(range(len(lengths)))
    n_image, n_text = sum(n > 0 for n in lengths), sum(n < 0 for n in lengths)
    # each modality's last megabatch (full or not) is merged into the final batch, in index order
    final = (n_image - mega * ((n_image - 1) // mega)) + (n_text - mega * ((n_text - 1) // mega))
    head, tail = order[:-final], order[-final:]
    assert tail == sorted(tail) and is_mixed(tail, lengths)
    assert len(head) % mega == 0
    for s in range(0, len(head), mega):
        megabatch = head[s:s + mega]
        assert not is_mixed(megabatch, lengths)
        chunks = [megabatch[k:k + batch] for k in range(0, mega, batch)]
        # the chunks are LLaVA's balanced split of the megabatch sorted longest first
        assert chunks == balanced_chunks(sorted(megabatch, key=lambda i: -abs(lengths[i])), lengths, world)


# --- the megabatch variant, HF's length grouping, and the sorted reference ---------------------------


def test_megabatch_mult_is_hfs_rule():
    assert megabatch_mult(665_000, 16) == 50 and megabatch_mult(665_000, 8192) == 20
    assert megabatch_mult(640, 16) == 10 and megabatch_mult(63, 16) == 1 and megabatch_mult(5, 16) == 1


def reference_modality_megabatch(lengths, batch, world, generator):
    step = batch * world
    steps, remainders = [], []
    for sign in (1, -1):
        indices = [i for i, n in enumerate(lengths) if n * sign > 0]
        perm = [indices[k] for k in torch.randperm(len(indices), generator=generator).tolist()]
        size = max(1, min(len(indices) // (4 * step), 50)) * step
        flat = [i for s in range(0, len(perm), size)
                for i in sorted(perm[s:s + size], key=lambda i: abs(lengths[i]), reverse=True)]
        full = len(flat) // step * step
        steps += [flat[s:s + step] for s in range(0, full, step)]
        remainders += flat[full:]
    return [i for k in torch.randperm(len(steps), generator=generator).tolist() for i in steps[k]] + remainders


@pytest.mark.parametrize("batch,world", [(1, 1), (4, 1), (3, 2), (2, 8)])
def test_modality_megabatch_order_exactly(batch, world):
    for trial in range(3):
        lengths = mixed_lengths(300 + 331 * trial, seed=trial, short=trial == 1)
        ours = modality_megabatch_indices(lengths, batch, world, torch.Generator().manual_seed(trial))
        assert ours == reference_modality_megabatch(lengths, batch, world, torch.Generator().manual_seed(trial))
    one = [abs(n) for n in lengths]
    assert sorted(modality_megabatch_indices(one, batch, world)) == list(range(len(one)))


def test_modality_megabatch_steps_are_pure_sorted_slices_of_megabatches():
    lengths = mixed_lengths(5000, 11)
    batch, world = 4, 2
    step = batch * world
    order = modality_megabatch_indices(lengths, batch, world, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(len(lengths)))
    n_image, n_text = sum(n > 0 for n in lengths), sum(n < 0 for n in lengths)
    full_steps = n_image // step + n_text // step
    remainder = order[full_steps * step:]
    assert len(remainder) == n_image % step + n_text % step
    # the remainders: images, then text, each longest first
    assert [lengths[i] > 0 for i in remainder] == [True] * (n_image % step) + [False] * (n_text % step)
    for s in range(0, full_steps * step, step):
        records = order[s:s + step]
        assert not is_mixed(records, lengths)
        assert [abs(lengths[i]) for i in records] == sorted((abs(lengths[i]) for i in records), reverse=True)
    # a step is a slice of a megabatch of mult steps: its records span far less than the modality's range
    spans = [abs(lengths[order[s]]) - abs(lengths[order[s + step - 1]]) for s in range(0, full_steps * step, step)]
    assert sum(spans) / len(spans) < 30  # lengths 1..600; a random step of 8 spans about 400


def test_length_grouping_is_hfs_with_the_longest_first():
    lengths = [7, 3, 9, 1, 5, 8, 2, 6]
    order = length_grouped_indices(lengths, batch_size=1, world_size=1, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()
    # mult = 8 // 4 = 2: megabatches of 2, each sorted longest first, then the longest record swapped to the front
    megabatches = [sorted(perm[s:s + 2], key=lambda i: -lengths[i]) for s in range(0, 8, 2)]
    longest = next(k for k, mb in enumerate(megabatches) if mb[0] == 2)
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    assert order == [i for mb in megabatches for i in mb] and order[0] == 2


def test_sorted_reference_on_crafted_lengths():
    lengths = [5, -3, 7, -1, 2, 9, -8, 4]
    # images by length: 5(9) 2(7) 0(5) 7(4) 4(2) -> steps [5,2] [0,7], leftover [4]
    # text by length:   6(8) 1(3) 3(1)           -> step [6,1], leftover [3]
    order = torch.randperm(3, generator=torch.Generator().manual_seed(0)).tolist()
    full = [[5, 2], [0, 7], [6, 1]]
    assert sorted_indices(lengths, 2, 1, torch.Generator().manual_seed(0)) == \
        [i for k in order for i in full[k]] + [4, 3]


# --- every sampler: fresh batches per seed and epoch, purity, one modality, zero lengths -------------


@pytest.mark.parametrize("world", [1, 8])
def test_batches_change_with_seed_and_epoch_and_repeat_with_both(world):
    lengths = mixed_lengths(4000, 2)
    for kind in SAMPLERS:
        base = all_micro_batches(lengths, kind, 4, world, seed=0, epoch=0)
        assert base == all_micro_batches(lengths, kind, 4, world, seed=0, epoch=0)
        other_seed = all_micro_batches(lengths, kind, 4, world, seed=1, epoch=0)
        other_epoch = all_micro_batches(lengths, kind, 4, world, seed=0, epoch=1)
        if kind == "sorted":  # fixed batches, only their order changes
            assert shared_batch_fraction(base, other_seed) == shared_batch_fraction(base, other_epoch) == 1.0
            assert base != other_seed
        else:
            assert shared_batch_fraction(base, other_seed) <= 0.01, kind
            assert shared_batch_fraction(base, other_epoch) <= 0.01, kind


def test_seed_and_epoch_are_mixed_not_added():
    orders = {(s, e): torch.randperm(100, generator=epoch_generator(s, e)).tolist() for s in range(3) for e in range(3)}
    assert len({tuple(o) for o in orders.values()}) == 9  # seed 0 epoch 1 is not seed 1 epoch 0
    assert orders[(0, 1)] == torch.randperm(100, generator=epoch_generator(0, 1)).tolist()


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 2), (3, 1), (8, 2)])
def test_modality_megabatch_mixes_at_most_one_micro_batch(world, accum):
    lengths = mixed_lengths(1999, 10 + world)
    batches = all_micro_batches(lengths, "modality_megabatch", 4, world, accum=accum)
    assert sum(is_mixed(b, lengths) for b in batches) <= 1


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 2), (8, 2)])
def test_modality_length_mixes_only_in_the_final_batch(world, accum):
    lengths = mixed_lengths(1999, 20 + world)
    batch = 4
    mega = batch * world * accum
    per_rank = rank_batches(lengths, "modality_length", batch, world, accum=accum)
    counts = (sum(n > 0 for n in lengths), sum(n < 0 for n in lengths))
    steps_in_full = sum((n - 1) // mega for n in counts) * accum  # global micro-batches before the final batch
    for batches in per_rank:
        assert not any(is_mixed(b, lengths) for b in batches[:steps_in_full])
        assert any(is_mixed(b, lengths) for b in batches[steps_in_full:]) or world > 1


@pytest.mark.parametrize("kind", SAMPLERS)
def test_one_modality_only(kind):
    for world in (1, 2, 3):
        for lengths in ([10, 20, 30, 40, 50, 60, 70], [-3, -5, -1, -9, -2, -8, -4]):
            per_rank = rank_batches(lengths, kind, batch=2, world=world, seed=0)
            assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(7))


@pytest.mark.parametrize("kind", ["modality_length", "modality_megabatch", "sorted"])
def test_zero_length_is_refused(kind):  # a record must be an image record or a text-only one
    with pytest.raises(ValueError, match="non-zero"):
        ordered_indices(kind, [3, 0, -2], 2, 1)


def test_unknown_sampler_and_config_choices():
    assert _CHOICES["stage.sampler"] == SAMPLERS
    with pytest.raises(ValueError, match="unknown sampler"):
        RankBatchSampler([1, 2], kind="modality", batch_size=1)


# --- per-rank batches: exactly once, equal steps, never above the batch size -------------------------


def test_split_global_batches_tail_rules():
    # 10 records, 2 ranks x 2: two full global batches, a tail of 2 spread one per rank
    assert split_global_batches(list(range(10)), 2, 2) == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8], [9]]]
    # 9 records, 4 ranks x 2: a tail of 1 < 4 ranks shares two steps with the full batch before: 2,1,1,1 | 1,1,1,1
    assert split_global_batches(list(range(9)), 2, 4) == [[[0, 1], [2], [3], [4]], [[5], [6], [7], [8]]]
    # 11 records, 2 ranks x 5: tail 1 < 2 ranks: 11 over 4 micro-batches of at most 5
    assert split_global_batches(list(range(11)), 5, 2) == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10]]]
    # fewer records than a global batch but enough for every rank
    assert split_global_batches(list(range(5)), 4, 2) == [[[0, 1, 2], [3, 4]]]
    # batch size 1: the one record that cannot go to every rank without a repeat sits out
    assert split_global_batches(list(range(7)), 1, 3) == [[[0], [1], [2]], [[3], [4], [5]]]
    assert step_count(9, 2, 4) == 2 and step_count(7, 1, 3) == 2 and step_count(12, 2, 3) == 2
    with pytest.raises(ValueError, match="cannot feed 8 ranks"):
        split_global_batches(list(range(5)), 1, 8)
    with pytest.raises(ValueError, match="cannot feed 8 ranks"):
        len(RankBatchSampler([1] * 5, kind="random", batch_size=2, num_replicas=8))


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("batch", [1, 2, 3, 16])
def test_ragged_end_never_exceeds_the_batch_size(world, batch):
    global_batch = world * batch
    sizes = {world, world + 1, 2 * world + 1, global_batch + 1, global_batch + world - 1, 3 * global_batch - 1, 997}
    for n in sorted(s for s in sizes if s % 2 == 1 or s == world):
        lengths = mixed_lengths(n, n)
        for kind in ("random", "modality_length", "modality_megabatch"):
            per_rank = rank_batches(lengths, kind, batch, world)
            sizes_seen = [len(b) for batches in per_rank for b in batches]
            assert max(sizes_seen) <= batch and min(sizes_seen) >= 1, (n, kind)
            assert len({len(batches) for batches in per_rank}) == 1  # every rank makes the same number of steps
            served = [i for batches in per_rank for b in batches for i in b]
            assert len(served) == len(set(served))  # never a repeat
            left_out = n % world if batch == 1 else 0
            assert len(served) == n - left_out, (n, kind)


@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_every_record_once_across_ranks_with_equal_steps(kind, world_size):
    lengths = mixed_lengths(997, world_size)
    per_rank = rank_batches(lengths, kind, batch=4, world=world_size, accum=2)
    served = [i for batches in per_rank for b in batches for i in b]
    assert sorted(served) == list(range(len(lengths)))  # exactly once, no duplicate padding
    assert len({len(batches) for batches in per_rank}) == 1
    assert all(0 < len(b) <= 4 for batches in per_rank for b in batches)


# --- measures -------------------------------------------------------------------------------------


def test_padding_efficiency_and_shared_batches_on_crafted_batches():
    lengths = [10, -10, 4, 6]
    assert padding_efficiency([[0, 1], [2, 3]], lengths) == pytest.approx(30 / 32)
    assert padding_efficiency([[0, 2], [1, 3]], lengths) == pytest.approx(30 / 40)
    assert shared_batch_fraction([[0, 1], [2, 3]], [[3, 2], [1, 0]]) == 1.0  # sets, in any place
    assert shared_batch_fraction([[0, 1], [2, 3]], [[0, 2], [1, 3]]) == 0.0
    assert shared_batch_fraction([[0, 1], [2, 3], [0, 1]], [[1, 0], [2]]) == pytest.approx(1 / 3)


def test_the_stage2_default_is_padding_efficient_and_fresh_on_mix665k_like_lengths():
    lengths = load_benchmark("padding_efficiency").mix665k_like_lengths(20_000)
    defaults = {OmegaConf.load(CONF / "stage" / f"{stage}.yaml").sampler for stage in ("instruct", "single")}
    assert defaults == {"modality_megabatch"}
    for world in (1, 8):
        eff = {kind: padding_efficiency(all_micro_batches(lengths, kind, 16, world, seed=0), lengths)
               for kind in ("random", "modality_length", "modality_megabatch")}
        assert eff["modality_megabatch"] >= 0.95 and eff["random"] < 0.75, eff
        assert eff["modality_length"] < 0.75  # LLaVA's grouping balances ranks; it barely cuts padding
