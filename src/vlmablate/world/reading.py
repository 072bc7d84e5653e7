"""Reading documents and the reading probe: how the world's LM learns, and shows, that it can read a board.

A reading document is one conversation in the Vicuna v1 layout that stage 2 and the evaluation use,
with the board where `<image>` stands:

    <s>[system ]USER: <16 cells>\\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: ...</s>

Its questions are the world's own (`language.question`, the benchmark's eight kinds), answered with the
short canonical answer (as LLaVA-1.5's "Answer the question using a single word or phrase." asks), with
the full sentence, or with an option's letter in MMBench's layout. Some documents open with the detailed
description stage 2 also asks for (every object with its size, fill, colour and place, in reading order).
The loss covers every token but the cells (with `loss="answer"`, only the answers): predicting a question
("Is there a red ...") is itself a lookup on the board.

`reading_probe` scores held-out boards, one question each, per kind: greedy exact match of the short
answer and its `</s>`, computed in one teacher-forced forward (every answer token the argmax is exactly
what greedy decoding would produce). With `blank=True` the boards are empty: the score of a model
that does not read them.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from vlmablate.data.templates import VICUNA_V1_SYSTEM
from vlmablate.world import language
from vlmablate.world.board import N_CELLS, BoardEmbedding, BoardVocabulary, embed_inputs
from vlmablate.world.data import CHOICE_PROMPT, LETTERS, SHORT_ANSWER_PROMPT
from vlmablate.world.scenes import Scene, sample_scene, scene_rng

IGNORE_INDEX = -100
SYSTEM = VICUNA_V1_SYSTEM
SHORT_ANSWER = "\n" + SHORT_ANSWER_PROMPT
DETAIL_PROMPTS = ("Describe the image in detail.", "Describe every shape in the image.")
FORMATS = ("short", "sentence", "choice")


@dataclass(frozen=True)
class ReadingConfig:
    """What the reading documents hold."""

    kinds: tuple[str, ...] = language.CATEGORIES
    formats: tuple[str, ...] = ("short",)
    qa_per_doc: tuple[int, int] = (3, 5)
    suffix_share: float = 0.3  # short questions that carry LLaVA-1.5's "single word or phrase" line
    system_share: float = 0.2  # documents that start with the system prompt
    loss: str = "all"  # "all": questions and answers; "answer": answers only
    max_objects: int = 5
    curriculum_steps: int = 0  # the most objects a board holds grows 1 -> max_objects over these steps
    describe_share: float = 0.0  # documents that open with a detailed description (every object, in order)

    def __post_init__(self):
        unknown = sorted(set(self.kinds) - set(language.CATEGORIES)) + sorted(set(self.formats) - set(FORMATS))
        if unknown or self.loss not in ("all", "answer") or not self.kinds or not self.formats:
            raise ValueError(f"bad reading config: kinds {self.kinds}, formats {self.formats}, loss {self.loss!r}")

    def max_objects_at(self, step: int) -> int:
        if not self.curriculum_steps:
            return self.max_objects
        return min(self.max_objects, 1 + int(step * (self.max_objects - 1) / self.curriculum_steps))


class Target(NamedTuple):
    """Where a question's answer is on the board, as positions in its document."""

    asked: int  # the question's last token ("?"), before any options or instruction line
    answer: int  # the position whose logits give the answer's first token
    cells: tuple[int, ...]  # the cells the answer is read from
    key: int  # the question's last word naming its object's colour or shape ("asked" if none)
    match: tuple[int, ...]  # the cells of every object that the key word names


class Choice(NamedTuple):
    """Where a multiple-choice question's options are, as positions in its document."""

    answer: int  # the position whose logits give the option's letter
    letters: tuple[int, ...]  # each option line's letter ("A" in "A. red")
    options: tuple[tuple[int, ...], ...]  # each option's own tokens (" red"; " top", " left")
    correct: int  # the index of the right option
    content: int  # the first token of the right option's text, as a short answer starts (" red")
    key: int  # the question's key word (`Target.key`), or its "?" where it has none
    letter_ids: tuple[int, ...]  # each option's letter as an answer is written (" A")


@dataclass
class ReadingDoc:
    input_ids: list[int]
    learn: list[bool]  # which positions the loss covers
    answers: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, kind) token spans
    targets: list[Target] = field(default_factory=list)
    scene: Scene | None = None
    choices: list[Choice] = field(default_factory=list)  # the multiple-choice questions among `answers`


class Encoder:
    """Cached tokenization of the few thousand distinct strings the documents are made of."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        self.vocab = BoardVocabulary(tokenizer)
        self.encode = functools.lru_cache(maxsize=None)(self._encode)
        self.offsets = functools.lru_cache(maxsize=None)(self._offsets)

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _offsets(self, text: str) -> tuple[tuple[int, int], ...]:
        """Each token's (start, end) characters in `text`, as `encode(text)` splits it."""
        return tuple(map(tuple, self.tokenizer(text, add_special_tokens=False,
                                               return_offsets_mapping=True)["offset_mapping"]))

    def spans(self, text: str, parts: list[tuple[int, int]]) -> list[tuple[int, ...]]:
        """For each character span in `parts`, the positions of the tokens of `encode(text)` inside it."""
        offsets = self.offsets(text)
        return [tuple(j for j, (a, b) in enumerate(offsets) if a >= start and b <= end and b > a)
                for start, end in parts]


def _turn(scene: Scene, kind: str, fmt: str, rng: random.Random, suffix: bool) -> tuple | None:
    """(question, answer, kind, cells the answer is read from, options), or None where the scene has no such
    question; `options` is `(the options, the short answer)` in the choice format, else None."""
    item = language.question(scene, kind, rng)
    if item is None:
        return None
    options = None
    if fmt == "sentence":
        question, answer = item["question"], item["sentence"]
    elif fmt == "choice":  # MMBench's layout: the options under the question, the letter as the answer
        block = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(item["options"]))
        question = f"{item['question']}\n{block}\n{CHOICE_PROMPT}"
        answer = LETTERS[item["options"].index(item["answer"])]
        options = (tuple(item["options"]), item["answer"])
    else:
        question, answer = item["question"] + (SHORT_ANSWER if suffix else ""), item["answer"]
    return question, answer, kind, tuple(item["cells"]), options


def reading_document(scene: Scene, rng: random.Random, enc: Encoder, cfg: ReadingConfig, *,
                     turns: list[tuple[str, str, str]] | None = None, system: bool | None = None) -> ReadingDoc:
    """One conversation about `scene`: `turns` (question, answer, kind[, cells[, options]]) if given, else drawn
    from `cfg`."""
    if turns is None:
        turns, wanted = [], rng.randint(*cfg.qa_per_doc)
        if cfg.describe_share and rng.random() < cfg.describe_share:
            turns.append((rng.choice(DETAIL_PROMPTS), language.describe(scene), "describe", ()))
            wanted += 1
        for _ in range(wanted * 4):  # a spatial question needs two objects: draw again when one is refused
            kind, fmt = rng.choice(cfg.kinds), rng.choice(cfg.formats)
            turn = _turn(scene, kind, fmt, rng, rng.random() < cfg.suffix_share)
            if turn is not None:
                turns.append(turn)
            if len(turns) == wanted:
                break
    if system is None:
        system = rng.random() < cfg.system_share
    doc = ReadingDoc([], [], scene=scene)
    tok = enc.tokenizer

    def add(ids, learn: bool) -> None:
        doc.input_ids.extend(ids)
        doc.learn.extend([learn] * len(ids))

    add((tok.bos_token_id, *enc.encode((SYSTEM + " " if system else "") + "USER: ")), cfg.loss == "all")
    board = len(doc.input_ids)
    add((enc.image_token_id,) * N_CELLS, False)
    for i, (question, answer, kind, *rest) in enumerate(turns):
        cells, options = (rest + [(), None])[:2]
        opening, begin = ("\n" if i == 0 else "USER: "), len(doc.input_ids)
        asked_ids = enc.encode(opening + question.split("\n")[0])  # the question without options or instruction
        text = opening + question + " ASSISTANT:"  # as the chat template renders it
        add(enc.encode(text), cfg.loss == "all")
        start = len(doc.input_ids)
        add((*enc.encode(" " + answer), tok.eos_token_id), True)
        doc.answers.append((start, len(doc.input_ids), kind))
        key = begin + len(asked_ids) - 1
        if cells:
            doc.targets.append(_target(scene, enc, cells, asked_ids, begin, start - 1, board))
            key = doc.targets[-1].key
        if options:
            doc.choices.append(_choice(enc, text, begin, start - 1, *options, key=key))
    return doc


def _choice(enc: Encoder, text: str, begin: int, answer: int, options: tuple[str, ...], short: str, *,
            key: int) -> Choice:
    """Positions of the option lines ("A. red") of a question rendered as `text` from position `begin`."""
    parts, at = [], text.index("\n" + LETTERS[0] + ". ")
    for i, option in enumerate(options):
        line = text.index(f"\n{LETTERS[i]}. {option}\n", at) + 1
        parts += [(line, line + 1), (line + 2, line + 3 + len(option))]  # the letter; " " and the option
        at = line
    spans = [tuple(begin + j for j in span) for span in enc.spans(text, parts)]
    if any(len(span) == 0 for span in spans) or any(len(span) != 1 for span in spans[::2]):
        raise ValueError(f"option lines of {text!r} do not fall on token boundaries")
    return Choice(answer, tuple(span[0] for span in spans[::2]), tuple(spans[1::2]), options.index(short),
                  enc.encode(" " + short)[0], key, tuple(enc.encode(" " + LETTERS[i])[0] for i in range(len(options))))


def _target(scene: Scene, enc: Encoder, cells: tuple[int, ...], asked_ids: tuple[int, ...], begin: int,
            answer: int, board: int) -> Target:
    """Positions for a question whose tokens `asked_ids` start at `begin`. The key is the question's last word
    naming its one object's colour or shape; `match` the cells of every object with that colour or shape."""
    asked = key = begin + len(asked_ids) - 1
    match = cells
    if len(cells) == 1:
        (obj,) = [o for o in scene.objects if language.cell(o) == cells[0]]
        words = {enc.vocab.ids[obj.colour]: "colour", enc.vocab.ids[obj.shape]: "shape"}
        hits = [(begin + j, words[t]) for j, t in enumerate(asked_ids) if t in words]
        if hits:
            key, attribute = hits[-1]
            match = tuple(sorted(language.cell(o) for o in scene.objects
                                 if getattr(o, attribute) == getattr(obj, attribute)))
    return Target(asked, answer, tuple(board + c for c in cells), key, tuple(board + c for c in match))


def collate(docs: list[ReadingDoc], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, attention_mask), right-padded to the longest document."""
    width = max(len(d.input_ids) for d in docs)
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(docs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(docs), width), dtype=torch.long)
    for i, d in enumerate(docs):
        row = torch.tensor(d.input_ids, dtype=torch.long)
        ids[i, : len(row)] = row
        labels[i, : len(row)] = row.masked_fill(~torch.tensor(d.learn), IGNORE_INDEX)
        mask[i, : len(row)] = 1
    return ids, labels, mask


def probe_items(enc: Encoder, kinds: tuple[str, ...], n_per_kind: int, seed: int = 0,
                fmt: str = "short") -> dict[str, list[ReadingDoc]]:
    """Held-out single-question documents per kind, in the evaluation's format (system prompt, and the
    short-answer line or MMBench's options), on boards of 1-5 objects from a split no training document
    draws from."""
    cfg = ReadingConfig(kinds=kinds)
    items = {}
    for kind in kinds:
        rng, docs, i = random.Random(f"reading-probe/{seed}/{kind}/{fmt}"), [], 0
        while len(docs) < n_per_kind:
            scene = sample_scene(scene_rng(seed, "reading_probe", i))
            i += 1
            turn = _turn(scene, kind, fmt, rng, suffix=True)
            if turn is not None:
                docs.append(reading_document(scene, rng, enc, cfg, turns=[turn], system=True))
        items[kind] = docs
    return items


@torch.no_grad()
def reading_probe(model, board: BoardEmbedding, enc: Encoder, items: dict[str, list[ReadingDoc]], *,
                  blank: bool = False, batch_size: int = 64) -> dict[str, float]:
    """Greedy exact-match accuracy per kind on `items` (from `probe_items`); `blank` reads empty boards. The
    batches go to the model's device (retention reads a trained model's LM, which may sit on a GPU)."""
    device = next(model.parameters()).device

    def logits(docs, ids, mask):
        cells = torch.stack([enc.vocab.cells(None if blank else d.scene) for d in docs]).to(device)
        return model(inputs_embeds=embed_inputs(model, board, ids.to(device), cells, enc.image_token_id),
                     attention_mask=mask.to(device)).logits

    was_training = model.training
    model.eval()
    try:
        return score_answers(logits, enc, items, batch_size=batch_size)
    finally:
        model.train(was_training)


@torch.no_grad()
def score_answers(logits_of, enc: Encoder, items: dict[str, list[ReadingDoc]], *,
                  batch_size: int = 64) -> dict[str, float]:
    """Per kind, the share of documents whose every answer token is the argmax of `logits_of(docs, input_ids,
    attention_mask)` at the position before it (what greedy decoding would produce), in one forward."""
    scores = {}
    for kind, docs in items.items():
        correct = 0
        for start in range(0, len(docs), batch_size):
            chunk = docs[start: start + batch_size]
            ids, _, mask = collate(chunk, enc.tokenizer.pad_token_id)
            predicted = logits_of(chunk, ids, mask).argmax(-1).cpu()
            for row, d in enumerate(chunk):
                (a, b, _), = d.answers
                correct += bool((predicted[row, a - 1: b - 1] == ids[row, a:b]).all())
        scores[kind] = round(correct / len(docs), 4)
    return scores
