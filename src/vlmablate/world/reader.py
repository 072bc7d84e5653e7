"""Pretraining the world's language model as a reader of boards, with the reading probe at every evaluation.

The corpus is drawn fresh at every step from the component seed (never `world.seed`), in three kinds
of document:

- reading documents (`reading.reading_document`): a board transcript, then questions and answers about it;
- caption documents in stage 1's `plain` layout: the board, then a caption and "\\n", as LLaVA's
  stage 1 shows the LM an image and its caption;
- text-only dialogues of facts about shapes, colours and numbers, in the chat template (the general
  text that Vicuna knows and stage 2's text-only records ask for).

Documents are drawn a pool of batches at a time and grouped by length, so a batch is mostly real tokens.
The curriculum (`ReadingConfig.curriculum_steps`) starts from one-object boards: with one object, a
question's answer is wherever the object is, which teaches *what* to copy before *where* to look.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

from vlmablate.model.tiny import train_tiny_tokenizer
from vlmablate.world import language
from vlmablate.world.board import N_CELLS, BoardEmbedding, embed_inputs
from vlmablate.world.reading import (
    IGNORE_INDEX,
    SYSTEM,
    Encoder,
    ReadingConfig,
    ReadingDoc,
    collate,
    probe_items,
    reading_document,
    reading_probe,
)
from vlmablate.world.scenes import sample_scene, scene_rng

MAX_POSITIONS = 512  # room for the board plus a long dialogue in stage 2


@dataclass(frozen=True)
class ReaderConfig:
    """The LM's shape, its schedule, and the mix of documents it reads."""

    hidden: int = 192
    layers: int = 4
    heads: int = 6
    kv_heads: int = 2
    intermediate: int = 512
    rope_theta: float = 10_000.0
    steps: int = 800
    batch_size: int = 32
    lr: float = 2e-3
    warmup: float = 0.05
    pool: int = 4  # batches drawn together and grouped by length
    seed: int = 0
    caption_share: float = 0.1
    text_share: float = 0.1
    reading: ReadingConfig = field(default_factory=ReadingConfig)
    # Attention supervision, each entry "LAYER.HEAD:FROM>TO": that head, at position FROM ("key": the
    # question's last word naming its object's colour or shape, "question": its "?", "answer": the
    # position that predicts the answer, "option": every token of every option of a multiple-choice
    # question), is taught to look at TO ("cells": the cells the answer is read from, "match": the cells
    # of every object the key word names, "key": the key word, "prev": the token before FROM, "letter":
    # the option's letter, "option": the right option's tokens), with weight `attend_loss` (0 turns it
    # off). "option>letter", "option>key" and "answer>option" are the multiple-choice heads: each option's
    # words learn their letter and look at what the question asks about (so an option can tell whether it
    # holds), and the answer finds the option that holds.
    attend_loss: float = 0.0
    # The default heads are the best recipe measured (docs/tiny_world_reading.md, runs R3 and R5).
    attend: tuple[str, ...] = ("0.0:key>match", "0.1:key>prev", "1.0:key>cells", "2.0:answer>key", "3.0:answer>cells")
    # Early read-out: the hidden state after each of these layers, at the position that predicts an
    # answer, is also scored through the final norm and the LM head against the answer's first token
    # (weight `readout_loss`), so the layers that move the looked-up object carry its attributes. For a
    # multiple-choice question that token is the right option's first word, not its letter: the layers
    # above the read-out turn what was read into the letter of the option that says it.
    readout_loss: float = 0.0
    readout_layers: tuple[int, ...] = (1, 2)
    # "first": only each answer's first token is read out early; "all": every token of every answer
    # (and its </s>), so a two-word answer ("top left") has its second word taught there too.
    readout_tokens: str = "first"
    # The option tokens of a multiple-choice question, read out early (after `readout_layers`) as their
    # option's letter in the answer's spelling (" B"), with this weight: an option's words carry the letter
    # that the answer will copy from them.
    letter_readout: float = 0.0
    eval_every: int = 100
    probe_per_kind: int = 50

    def __post_init__(self):
        missing = [spec for spec in self.attend if self.attend_loss
                   and (parse_attend(spec)[0] >= self.layers or parse_attend(spec)[1] >= self.heads)]
        missing += [f"read-out after layer {layer}" for layer in self.readout_layers
                    if (self.readout_loss or self.letter_readout) and layer >= self.layers]
        if missing:
            raise ValueError(f"{missing} name layers or heads a {self.layers}-layer, {self.heads}-head LM lacks")
        if self.readout_tokens not in ("first", "all"):
            raise ValueError(f"readout_tokens is 'first' or 'all', not {self.readout_tokens!r}")


def world_tokenizer(vocab_size: int = 768, n_scenes: int = 2000):
    """The world's BPE tokenizer, trained on a fixed corpus of its language (captions, descriptions,
    questions and their answers, text-only dialogues, LLaVA's prompts), independent of `world.seed`."""
    from vlmablate.world.data import CAPTION_PROMPTS, CHOICE_PROMPT, DETAIL_PROMPTS, SHORT_ANSWER_PROMPT

    rng, texts = random.Random("world-tokenizer"), []
    for i in range(n_scenes):
        scene = sample_scene(scene_rng(0, "tokenizer", i))
        texts += [language.caption(scene, rng), language.describe(scene)]
        for item in language.questions(scene, rng):
            texts += [item["question"], item["sentence"], *item["options"]]
        texts += [t for turn in language.text_only_dialogue(rng) for t in turn]
    # The prompts every conversation repeats (the system prompt, LLaVA's instructions), the chat template's
    # role markers and the option letters (" A", " B", ...) weigh as they do in a chat model's training
    # text, so each comes out as a few tokens rather than letter by letter.
    fixed = [SYSTEM, *CAPTION_PROMPTS, *DETAIL_PROMPTS, CHOICE_PROMPT, SHORT_ANSWER_PROMPT, "USER: ASSISTANT:"]
    return train_tiny_tokenizer(vocab_size, extra_text=" ".join(texts + fixed * 1000 + ["A B C D"] * 4000))


def llama_config(cfg: ReaderConfig, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=MAX_POSITIONS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )


def caption_document(scene, rng: random.Random, enc: Encoder) -> ReadingDoc:
    """Stage 1's `plain` sample: BOS, the board, the caption and "\\n"; loss on the caption and "\\n"."""
    text = enc.encode(language.caption(scene, rng) + "\n")
    ids = [enc.tokenizer.bos_token_id, *([enc.image_token_id] * N_CELLS), *text]
    return ReadingDoc(ids, [False] * (1 + N_CELLS) + [True] * len(text), scene=scene)


def text_document(rng: random.Random, enc: Encoder) -> ReadingDoc:
    """A text-only dialogue in the chat template; loss on every token. No board: `scene` is None."""
    messages = [{"role": role, "content": text} for q, a in language.text_only_dialogue(rng)
                for role, text in (("user", q), ("assistant", a))]
    ids = [enc.tokenizer.bos_token_id, *enc.encode(enc.tokenizer.apply_chat_template(messages, tokenize=False))]
    return ReadingDoc(ids, [True] * len(ids), scene=None)


class DocumentStream:
    """Batches of documents, drawn `pool` batches at a time and grouped by length."""

    def __init__(self, cfg: ReaderConfig, enc: Encoder):
        self.cfg, self.enc = cfg, enc
        self.rng = random.Random(f"reader/{cfg.seed}")
        self.queue: list[list[ReadingDoc]] = []

    def document(self, step: int) -> ReadingDoc:
        r = self.rng.random()
        if r < self.cfg.text_share:
            return text_document(self.rng, self.enc)
        scene = sample_scene(self.rng, max_objects=self.cfg.reading.max_objects_at(step))
        if r < self.cfg.text_share + self.cfg.caption_share:
            return caption_document(scene, self.rng, self.enc)
        return reading_document(scene, self.rng, self.enc, self.cfg.reading)

    def batch(self, step: int) -> list[ReadingDoc]:
        if not self.queue:
            docs = sorted((self.document(step) for _ in range(self.cfg.batch_size * self.cfg.pool)),
                          key=lambda d: len(d.input_ids))
            groups = [docs[i: i + self.cfg.batch_size] for i in range(0, len(docs), self.cfg.batch_size)]
            self.rng.shuffle(groups)
            self.queue = groups
        return self.queue.pop()


def batch_inputs(model, board: BoardEmbedding, enc: Encoder, docs: list[ReadingDoc]):
    """(inputs_embeds, labels, attention_mask) for a batch; rows without a board get a blank one that no
    position uses (their input ids hold no image token)."""
    ids, labels, mask = collate(docs, enc.tokenizer.pad_token_id)
    cells = torch.stack([enc.vocab.cells(d.scene) for d in docs])
    has_board = (ids == enc.image_token_id).any(1)
    inputs = model.get_input_embeddings()(ids)
    if has_board.any():
        inputs[has_board] = embed_inputs(model, board, ids[has_board], cells[has_board], enc.image_token_id)
    return inputs, labels, mask


def parse_attend(spec: str) -> tuple[int, int, str, str]:
    """"2.0:answer>cells" -> (2, 0, "answer", "cells")."""
    try:
        head, _, route = spec.partition(":")
        layer, head = (int(x) for x in head.split("."))
        origin, target = route.split(">")
    except ValueError:
        raise ValueError(f"attention supervision {spec!r} is not LAYER.HEAD:FROM>TO") from None
    routes = {"key": ("cells", "match", "key", "prev"), "question": ("cells", "match", "key", "prev"),
              "answer": ("cells", "match", "key", "prev", "option"), "option": ("letter", "key", "prev")}
    if target not in routes.get(origin, ()):
        raise ValueError(f"attention supervision {spec!r}: FROM>TO is one of "
                         + ", ".join(f"{o}>{t}" for o, ts in routes.items() for t in ts))
    return layer, head, origin, target


def _routes(d: ReadingDoc, origin: str, target: str):
    """(from, (to, ...)) position pairs of one document for one supervised route."""
    if origin == "option":
        for choice in d.choices:
            for letter, option in zip(choice.letters, choice.options):
                for where in option:
                    yield where, {"letter": (letter,), "key": (choice.key,), "prev": (where - 1,)}[target]
    elif target == "option":
        for choice in d.choices:
            yield choice.answer, choice.options[choice.correct]
    else:
        for t in d.targets:
            where = {"answer": t.answer, "question": t.asked, "key": t.key}[origin]
            yield where, {"cells": t.cells, "match": t.match, "key": (t.key,), "prev": (where - 1,)}[target]


def attention_loss(attentions, docs: list[ReadingDoc], specs: tuple[str, ...]) -> torch.Tensor:
    """Per supervised head, the batch's mean -log(attention from FROM on TO)."""
    losses = []
    for layer, head, origin, target in map(parse_attend, specs):
        rows, queries, hot = [], [], []
        for i, d in enumerate(docs):
            for where, goal in _routes(d, origin, target):
                if where <= max(goal):
                    continue  # a position only looks back (and not at itself)
                row = torch.zeros(attentions[0].shape[-1])
                row[list(goal)] = 1.0
                rows.append(i), queries.append(where), hot.append(row)
        if not rows:
            losses.append(attentions[0].new_zeros(()))
            continue
        weights = attentions[layer][torch.tensor(rows), head, torch.tensor(queries)]  # [n, keys]
        losses.append(-torch.log((weights * torch.stack(hot)).sum(-1) + 1e-6).mean())
    return torch.stack(losses)


@torch.no_grad()
def attention_probe(model, board: BoardEmbedding, enc: Encoder, items: dict[str, list[ReadingDoc]],
                    specs: tuple[str, ...]) -> dict[str, list[float]]:
    """Per kind of question (held-out `items`), each supervised head's mean attention from FROM on TO.
    The model must use eager attention (as it does while `attend_loss` is on)."""
    was_training = model.training
    model.eval()
    result = {}
    for kind, docs in items.items():
        ids, _, mask = collate(docs, enc.tokenizer.pad_token_id)
        cells = torch.stack([enc.vocab.cells(d.scene) for d in docs])
        out = model(inputs_embeds=embed_inputs(model, board, ids, cells, enc.image_token_id), attention_mask=mask,
                    output_attentions=True)
        losses = attention_loss(out.attentions, docs, specs)
        result[kind] = [round(float(torch.exp(-v)), 2) if v else None for v in losses]  # geometric mean mass
    model.train(was_training)
    return result


def readout_loss(model, hidden_states, docs: list[ReadingDoc], layers: tuple[int, ...],
                 tokens: str = "first") -> torch.Tensor:
    """Cross-entropy of answer tokens from the hidden state after each of `layers` (the LM head applied
    early): each supervised answer's first token (`tokens="first"`), or every token of every answer
    about the board, its </s> included (`tokens="all"`). A multiple-choice answer is read out as its right
    option's first token (what the letter stands for), never as the letter."""
    rows = []
    for i, d in enumerate(docs):
        lettered = {c.answer for c in d.choices}
        rows += [(i, c.answer, c.content) for c in d.choices]
        if tokens == "first":
            rows += [(i, t.answer, d.input_ids[t.answer + 1]) for t in d.targets if t.answer not in lettered]
        else:
            rows += [(i, p - 1, d.input_ids[p]) for a, b, kind in d.answers
                     if kind != "describe" and a - 1 not in lettered for p in range(a, b)]
    return _early_loss(model, hidden_states, rows, layers)


def _early_loss(model, hidden_states, rows: list[tuple[int, int, int]], layers: tuple[int, ...]) -> torch.Tensor:
    """Mean over `layers` of the cross-entropy of (document, position, token) `rows`, the hidden state after
    each layer put through the final norm and the LM head."""
    if not rows or not layers:
        return hidden_states[0].new_zeros(())
    rows, positions, tokens = (torch.tensor(x) for x in zip(*rows))
    losses = [F.cross_entropy(model.lm_head(model.model.norm(hidden_states[layer + 1][rows, positions])).float(),
                              tokens) for layer in layers]
    return torch.stack(losses).mean()


def probe_set(enc: Encoder, cfg: ReaderConfig, seed: int = 0, n_per_kind: int | None = None):
    """The reading probe's held-out items: per kind in the short format and, where the corpus has the
    choice format, per kind in it too ("colour@choice")."""
    n = n_per_kind or cfg.probe_per_kind
    items = probe_items(enc, cfg.reading.kinds, n, seed=seed)
    if "choice" in cfg.reading.formats:
        items |= {f"{kind}@choice": docs for kind, docs in
                  probe_items(enc, cfg.reading.kinds, n, seed=seed, fmt="choice").items()}
    return items


def letter_readout_loss(model, hidden_states, docs: list[ReadingDoc], layers: tuple[int, ...]) -> torch.Tensor:
    """Cross-entropy, after each of `layers`, of every option token of every multiple-choice question against
    its option's letter as an answer spells it."""
    rows = [(i, where, letter) for i, d in enumerate(docs) for c in d.choices
            for letter, option in zip(c.letter_ids, c.options) for where in option]
    return _early_loss(model, hidden_states, rows, layers)


def train_reader(cfg: ReaderConfig, tokenizer, *, progress: bool = True, log=print, start_from=None):
    """Train a LlamaForCausalLM and its BoardEmbedding; return (model, board, metrics).

    `start_from` (model, board) continues training those instead of fresh ones (they are trained in place).
    metrics["probe"] is the reading probe per kind at every `eval_every` steps and at the end;
    metrics["blank"] is the final model's score on empty boards."""
    enc = Encoder(tokenizer)
    items = probe_set(enc, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, board = start_from or (LlamaForCausalLM(llama_config(cfg, tokenizer)),
                                      BoardEmbedding(cfg.hidden, enc.vocab.place_ids))
        if cfg.attend_loss:
            model.set_attn_implementation("eager")  # the supervised heads' weights must be materialised
        history, losses, attend = [], [], []
        params = [*model.parameters(), *board.parameters()]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
        schedule = get_cosine_schedule_with_warmup(optimizer, max(1, int(cfg.steps * cfg.warmup)), cfg.steps)
        stream = DocumentStream(cfg, enc)
        start = time.perf_counter()
        model.train()
        for step in tqdm(range(1, cfg.steps + 1), desc="reader pretraining", disable=not progress):
            docs = stream.batch(step)
            inputs, labels, mask = batch_inputs(model, board, enc, docs)
            out = model(inputs_embeds=inputs, attention_mask=mask, output_attentions=bool(cfg.attend_loss),
                        output_hidden_states=bool(cfg.readout_loss or cfg.letter_readout))
            loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX)
            total = loss
            if cfg.attend_loss:
                extra = attention_loss(out.attentions, docs, cfg.attend)
                attend.append(extra.detach())
                total = total + cfg.attend_loss * extra.mean()
            if cfg.readout_loss:
                total = total + cfg.readout_loss * readout_loss(model, out.hidden_states, docs, cfg.readout_layers,
                                                             cfg.readout_tokens)
            if cfg.letter_readout:
                total = total + cfg.letter_readout * letter_readout_loss(model, out.hidden_states, docs,
                                                                         cfg.readout_layers)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if step % cfg.eval_every == 0 or step == cfg.steps:
                scores = reading_probe(model, board, enc, items)
                window = losses[-cfg.eval_every:]
                history.append({"step": step, "seconds": round(time.perf_counter() - start, 1),
                                "loss": round(sum(window) / len(window), 4), "probe": scores})
                if attend:
                    recent = torch.stack(attend[-cfg.eval_every:]).mean(0)
                    history[-1]["attend"] = [round(v, 3) for v in recent.tolist()]
                    history[-1]["attend_by_kind"] = attention_probe(model, board, enc, items, cfg.attend)
                log(format_probe_row(history[-1]))
        model.eval()
        blank = reading_probe(model, board, enc, items, blank=True)
    metrics = {"probe": history, "blank": blank, "train_seconds": round(time.perf_counter() - start, 1),
               "params": sum(p.numel() for p in model.parameters()),
               "final_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4) if losses else math.nan}
    return model, board, metrics


def format_probe_row(entry: dict) -> str:
    scores = entry["probe"]
    mean = sum(scores.values()) / len(scores)
    attend = f"  attend {' '.join(f'{v:.2f}' for v in entry['attend'])}" if "attend" in entry else ""
    row = (f"step {entry['step']:>5}  {entry['seconds']:>6.0f}s  loss {entry['loss']:.3f}{attend}  mean {mean:.2f}  "
           + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    if "attend_by_kind" in entry:  # each supervised head's attention on its target, per kind: "kind a/b/c"
        row += "\n    on target: " + "  ".join(f"{k} " + "/".join("-" if v is None else f"{v:.2f}" for v in vs)
                                             for k, vs in entry["attend_by_kind"].items())
    return row
