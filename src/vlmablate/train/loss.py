"""The training loss with the LM head run only on the positions the loss reads (`train.labelled_logits_only`).

A causal LM's loss reads the logits of position t only where label t+1 is set. In a LLaVA sample that is
the assistant's answer: a few hundred tokens, against the 576 to 2,880 image tokens and the prompt around
them. Running the LM head over every position makes a (batch, sequence, vocabulary) tensor, in the compute
dtype and again in fp32 for the loss, almost all of it never read: 2.9 GiB of a 4090's 24 at batch 4 ×
4096 tokens and a 32k vocabulary.

How: transformers' own mechanism. Llava and LlavaNext take `logits_to_keep`, and a boolean
(batch, sequence) mask there keeps exactly the True positions, flattened to (n_kept, hidden), before the LM
head (`modeling_utils.slice_logits_to_keep`). A 1-D tensor of positions would keep the same positions in
every row, the union over the batch, which wastes rows where the answers sit at different places; the mask
keeps each row's own. The loss is the model's own too: its `ForCausalLMLoss` takes `shift_labels` (the
targets already shifted by one, as padding-free collators pass them), so the reduction, the fp32 upcast and
the division by Trainer's `num_items_in_batch` under gradient accumulation are the library's, unchanged.

Both go in as model inputs and Trainer's `compute_loss` runs as before, so the forward is the wrapped
model's: DDP's reducer hooks, accelerate's autocast, PEFT's forward and gradient checkpointing all see the
same call as on the full path. The LM head is whatever module the model holds (frozen, trainable, under
PEFT's `modules_to_save`, or unquantized beside a 4-bit LLM): it is applied by the model, not by us.

No chunking: the kept logits are (n_kept, vocabulary), a few hundred rows a sample, the size the loss
needs anyway; a chunked cross-entropy (Liger's fused linear cross-entropy) would save that too, at the cost
of a kernel of its own.
"""

from __future__ import annotations

import torch
from transformers import modeling_utils

from vlmablate.data.templates import IGNORE_INDEX

# transformers releases before `slice_logits_to_keep` read `logits_to_keep` as positions only; a mask there
# would fail, so they keep the full path.
SUPPORTED = hasattr(modeling_utils, "slice_logits_to_keep")


def labelled_positions(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): keep[b, t] is True where position t predicts a label (labels[b, t + 1] is set), the
    shift the causal-LM loss makes; targets are those labels, in the order `hidden[keep]` lists the rows."""
    following = labels[:, 1:]
    kept = following != ignore_index
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = kept
    return keep, following[kept]


def with_labelled_logits_only(inputs: dict) -> dict:
    """The model inputs with `logits_to_keep` (the labelled positions) and `shift_labels` (their targets).

    `labels` stay: they make the model compute its loss, which then reads `shift_labels` in their place.
    """
    keep, targets = labelled_positions(inputs["labels"])
    return {**inputs, "logits_to_keep": keep, "shift_labels": targets}
