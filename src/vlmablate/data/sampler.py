"""LLaVA's modality-length grouped sampler.

Image samples (hundreds of image tokens) and text-only samples are never mixed in one batch, and
samples of similar length share a batch, so little compute goes to padding. The order, as LLaVA's
`group_by_modality_length` describes it:

1. split indices by modality: length > 0 has an image, length < 0 is text-only;
2. sort each modality by length, longest first;
3. cut megabatches of `world_size × batch_size` consecutive indices within each modality;
4. shuffle the full megabatches of both modalities together (the order inside one is kept);
5. merge the two partial leftovers and put them last.

Data with one modality only is the same procedure with an empty second list (a known crash
elsewhere). Every index is served exactly once per epoch; under data parallelism the Trainer's
accelerate dataloader hands each rank its `batch_size` share of every megabatch.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


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


class ModalityLengthGroupedSampler(Sampler[int]):
    """A new order every epoch (seed + epoch), deterministic for a seed."""

    def __init__(self, lengths: list[int], *, batch_size: int, world_size: int = 1, seed: int = 0):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator)


def padding_efficiency(batches: list[list[int]], lengths: list[int]) -> float:
    """Real tokens / padded tokens over batches of indices (1.0 = no padding)."""
    real = sum(abs(lengths[i]) for b in batches for i in b)
    padded = sum(max(abs(lengths[i]) for i in b) * len(b) for b in batches if b)
    return real / padded if padded else 1.0
