"""Board transcripts: a scene written the way the projector will show it to the language model.

The world's vision tower sees the 4×4 board as 16 patches, one per cell; with CLS dropped (what
`vision_feature_select_strategy=default` does) the projector hands the LM 16 vectors in raster order.
A board transcript is those 16 positions written from the scene itself, so the LM can learn to read a
board long before any projector exists, as Vicuna could read long before LLaVA:

- an object's cell is the sum of the LM's own input embeddings of its attribute words (size, colour,
  shape, fill, mark), so "diamond" in a question and the diamond on the board share a vector;
- every cell adds the embeddings of its quarter's words ("top"/"bottom", "left"/"right") and a learned
  vector of its own, as ViT patches carry position embeddings;
- an empty cell is one learned vector plus its place.

`BoardEmbedding` holds the two learned parts (16 place vectors, one empty vector) and builds the cell
vectors from a model's embedding table; `embed_inputs` puts them where the `<image>` tokens are, as
Llava puts the projected patches there. Stage 1 later trains the projector to produce the same vectors
from pixels, and the reading probe (`reading.py`) measures what the LM reads from them.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmablate.world.scenes import COLOURS, FILLS, GRID, MARKS, SHAPES, SIZES, Scene

N_CELLS = GRID * GRID
ATTRIBUTES = ("size", "colour", "shape", "fill", "mark")
ATTRIBUTE_VALUES = {"size": SIZES, "colour": tuple(COLOURS), "shape": SHAPES, "fill": FILLS, "mark": MARKS}
EMPTY = -1  # the word id of an attribute of an empty cell


def attribute_words() -> tuple[str, ...]:
    """Every word a cell is built from, attribute values first, then the place words."""
    return (*(w for a in ATTRIBUTES for w in ATTRIBUTE_VALUES[a]), *place_words())


def place_words() -> tuple[str, ...]:
    return ("top", "bottom", "left", "right")


def single_token_id(tokenizer, word: str) -> int:
    """The one token of ` word` (with its leading space, as the word appears mid-sentence)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"board words must be single tokens; {word!r} is {tokenizer.convert_ids_to_tokens(ids)}")
    return ids[0]


class BoardVocabulary:
    """Word ids of the attributes and places, resolved once for one tokenizer."""

    def __init__(self, tokenizer):
        self.ids = {w: single_token_id(tokenizer, w) for w in attribute_words()}
        rows = [("top" if r < GRID // 2 else "bottom") for r in range(GRID)]
        cols = [("left" if c < GRID // 2 else "right") for c in range(GRID)]
        self.place_ids = torch.tensor([[self.ids[rows[r]], self.ids[cols[c]]]
                                       for r in range(GRID) for c in range(GRID)])

    def cells(self, scene: Scene | None) -> torch.Tensor:
        """[16, 5] word ids (size, colour, shape, fill, mark) per cell in raster order; EMPTY rows where no object
        is. `None` is a blank board."""
        cells = torch.full((N_CELLS, len(ATTRIBUTES)), EMPTY, dtype=torch.long)
        for o in scene.objects if scene is not None else ():
            cells[o.row * GRID + o.col] = torch.tensor([self.ids[getattr(o, a)] for a in ATTRIBUTES])
        return cells


class BoardEmbedding(nn.Module):
    """The learned parts of a transcript: a vector per cell and one for "empty"."""

    def __init__(self, hidden: int, place_ids: torch.Tensor, std: float = 0.02):
        super().__init__()
        self.place = nn.Parameter(torch.randn(N_CELLS, hidden) * std)
        self.empty = nn.Parameter(torch.randn(hidden) * std)
        self.register_buffer("place_ids", place_ids.clone(), persistent=True)

    def forward(self, embed_tokens: nn.Embedding, cells: torch.Tensor) -> torch.Tensor:
        """[batch, 16, hidden] cell vectors for [batch, 16, len(ATTRIBUTES)] word ids."""
        filled = cells != EMPTY
        words = (embed_tokens(cells.clamp(min=0)) * filled.unsqueeze(-1)).sum(2)
        occupied = filled.any(-1, keepdim=True)
        vectors = torch.where(occupied, words, self.empty.to(words.dtype).expand_as(words))
        return vectors + self.place.to(words.dtype) + embed_tokens(self.place_ids).sum(1)


def embed_inputs(model, board: BoardEmbedding, input_ids: torch.Tensor, cells: torch.Tensor,
                 image_token_id: int) -> torch.Tensor:
    """The LM's input embeddings with each row's 16 `<image>` positions replaced by its board's cells."""
    embed_tokens = model.get_input_embeddings()
    inputs = embed_tokens(input_ids)
    slots = input_ids == image_token_id
    if int(slots.sum()) != cells.shape[0] * N_CELLS or (slots.sum(1) != N_CELLS).any():
        raise ValueError(f"every row needs exactly {N_CELLS} image tokens; got {slots.sum(1).tolist()}")
    vectors = board(embed_tokens, cells).to(inputs.dtype)
    return inputs.masked_scatter(slots.unsqueeze(-1), vectors)
