"""Batching encoded LLaVA samples into model inputs (Llava and LlavaNext, mixed image / text-only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmablate.data.templates import IGNORE_INDEX

PADDING_SIDES = ("right", "left")


class LlavaCollator:
    """Pads `input_ids` / `labels`, builds `attention_mask` and stacks the images of the batch.

    Only model inputs come out: `input_ids`, `attention_mask`, `labels`, and `pixel_values` /
    `image_sizes` when at least one sample has an image; plus `sample_index` (the records' positions
    in the mix) and `bad_samples` ((record reference, reason) pairs) when a record had to be skipped
    while encoding, which the trainer takes out before the forward. Text-only samples add no pixel
    rows; the model places image features by the image tokens in `input_ids`, so the images only have
    to be in batch order.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if pad_token_id is None:
            raise ValueError("LlavaCollator needs a pad_token_id (the tokenizer has no pad token; set one)")
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side

    def __call__(self, features: list[dict]) -> dict:
        if not features:
            raise ValueError("LlavaCollator got an empty batch")
        batch = self._pad_text(features)
        pixels = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = _stack_pixel_values(pixels)
        sizes = [f["image_sizes"] for f in features if f.get("image_sizes") is not None]
        if sizes:
            batch["image_sizes"] = torch.cat(sizes, dim=0)
        if all("sample_index" in f for f in features):  # which records of the mix (the trainer takes it out)
            batch["sample_index"] = [int(f["sample_index"]) for f in features]
        bad = [entry for f in features for entry in f.get("bad_samples", ())]
        if bad:  # records skipped while encoding (data.on_bad_sample=skip); the trainer counts and removes them
            batch["bad_samples"] = bad
        return batch

    def _pad_text(self, features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        shape = (len(features), longest)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            cols = slice(0, n) if self.padding_side == "right" else slice(longest - n, longest)
            input_ids[row, cols] = feature["input_ids"]
            attention_mask[row, cols] = 1
            labels[row, cols] = feature["labels"]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _stack_pixel_values(pixels: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-sample pixel_values along dim 0.

    LlavaNext's anyres gives (1, n_patches, C, H, W) with n_patches varying by aspect ratio: the
    patch dimension is zero-padded to the batch maximum, as the HF processor does for a batch; the
    model drops the padding using `image_sizes`.
    """
    if pixels[0].dim() == 5:
        most = max(p.shape[1] for p in pixels)
        pixels = [F.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
    shapes = {tuple(p.shape[1:]) for p in pixels}
    if len(shapes) != 1:
        raise ValueError(f"pixel_values of one batch must share their shape after dim 0, got {sorted(shapes)}")
    return torch.cat(pixels, dim=0)
