"""Retention: what stage 2 cost the language model's prior abilities, on text alone (no image).

The same text-only set is scored twice, by the LM as loaded before training ("before", the run's base)
and by the trained cell ("after"): the mean loss per scored token of each item (nats), averaged over
items, with its perplexity. `difference` is after - before (larger: more forgetting), with a 95% paired
bootstrap interval over items (`eval/metrics.bootstrap_ci` on the per-item differences).

The set:
- the tiny world (`model.source=tiny_world`): `n_world` text-only dialogues of the world's language
  (facts about shapes, colours and numbers, the kind its LM was pretrained on), generated from a fixed
  random seed, always the same ones;
- a real model: `eval.retention.data`, a LLaVA-format JSON of text-only conversations, scored on the
  assistant tokens exactly as training scores them (`data/templates.encode_conversation`, chat template),
  or a JSONL of `{"text": ...}` lines, scored on every token after BOS.

"Before" is computed once per base and set, and cached under the cache root by a hash of the base
checkpoint's identity (its path, weight files, quantization and dtype), of the encoded set and of the batch
size. It is read from the model right after loading, with any LoRA adapter switched off, so a frozen LLM
scores the same items in the same batches through the same weights twice: its difference is 0 by
construction.

The tiny world's LM has a second skill of its own to keep: it was pretrained to read board transcripts (16
cell vectors where `<image>` stands). `ReadingProbe` scores that reading, per kind of question and in both
answer formats, on held-out boards before and after stage 2 (`eval.retention.reading_per_kind`), through the
trained model's own LM: what stage 2 cost the reader the world was built on.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmablate.data.templates import IGNORE_INDEX, TemplateError, encode_conversation
from vlmablate.eval.metrics import bootstrap_ci
from vlmablate.model.plan import unwrap

log = logging.getLogger(__name__)

RETENTION_VERSION = 2  # bump when how items are scored changes: cached "before" values then recompute
WORLD_SEED = 0  # the random seed of the tiny world's retention dialogues
WORLD_MEASURED = ("mean loss per assistant token (nats) on {n} text-only dialogues of the tiny world's language "
                  "(facts about shapes, colours and numbers, the kind its LM was pretrained on), chat template, "
                  "no image; before = the base LM as loaded, after = the trained cell; difference = after - before "
                  "(larger: more forgetting); CI: 95% paired bootstrap over items")
FILE_MEASURED = ("mean loss per {what} (nats) on {n} text-only items of {path}, no image; before = the base LM as "
                 "loaded, after = the trained cell; difference = after - before (larger: more forgetting); CI: "
                 "95% paired bootstrap over items")


class RetentionDataError(ValueError):
    """A retention file that cannot be scored: names the file, the record and the reason."""


@dataclass
class RetentionSet:
    """Encoded items (input ids, labels with IGNORE_INDEX where nothing is scored) and what they measure."""

    items: list[tuple[list[int], list[int]]]
    measured: str

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.items).encode()).hexdigest()


# --- the sets ---------------------------------------------------------------------------------------


def world_records(n: int, seed: int = WORLD_SEED) -> list[dict]:
    """`n` text-only dialogues of the tiny world's language as LLaVA records, the same for a given seed."""
    from vlmablate.data.dataset import llava_turns
    from vlmablate.world import language

    rng = random.Random(f"retention/{seed}")
    return [{"id": f"retention-{i:04d}", "conversations": llava_turns(language.text_only_dialogue(rng))}
            for i in range(n)]


def read_retention_file(path: str | os.PathLike, max_items: int | None = None) -> tuple[str, list]:
    """("chat", LLaVA records) from a .json file or ("text", texts) from a .jsonl file, each checked."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RetentionDataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(records, list) or not records:
            raise RetentionDataError(f"{path}: expected a non-empty list of LLaVA records")
        records = records[:max_items]
        for i, record in enumerate(records):
            where = f"{path}: record {i}" + (f" (id {record.get('id')})" if isinstance(record, dict) else "")
            if not isinstance(record, dict) or "conversations" not in record:
                raise RetentionDataError(f"{where}: not an object with `conversations`")
            if record.get("image") is not None:
                raise RetentionDataError(f"{where}: has an image; the retention set is text alone")
        return "chat", records
    texts = []
    for i, line in enumerate(path.read_text().splitlines()):
        if max_items is not None and len(texts) == max_items:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RetentionDataError(f"{path}: line {i + 1}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise RetentionDataError(f"{path}: line {i + 1}: expected {{\"text\": a non-empty string}}")
        texts.append(row["text"])
    if not texts:
        raise RetentionDataError(f"{path}: no lines with text")
    return "text", texts


def encode_chat(records: list[dict], processor, *, max_length: int, source: str) -> list[tuple[list, list]]:
    """Each text-only conversation as training encodes it: the chat template, loss on the assistant tokens."""
    items = []
    for i, record in enumerate(records):
        ref = f"{source}: record {i}" + (f" (id {record.get('id')})" if record.get("id") is not None else "")
        try:
            enc = encode_conversation(record["conversations"], template="chat", processor=processor, image=None,
                                      max_length=max_length, record_ref=ref)
        except TemplateError as e:
            raise RetentionDataError(f"{e} [reason: {e.reason}]") from None
        items.append((enc["input_ids"].tolist(), enc["labels"].tolist()))
    return items


def encode_texts(texts: list[str], tokenizer, *, max_length: int, source: str) -> list[tuple[list, list]]:
    """Plain texts: BOS (where the tokenizer has one) + the text, every token after the first scored."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    items = []
    for i, text in enumerate(texts):
        ids = (bos + tokenizer(text, add_special_tokens=False)["input_ids"])[:max_length]
        if len(ids) < 2:
            raise RetentionDataError(f"{source}: line {i + 1}: fewer than two tokens, nothing to score")
        items.append((ids, list(ids)))
    return items


def retention_set(cfg, processor, *, tiny_world: bool, max_length: int) -> RetentionSet | None:
    """The configured set (`cfg`: `eval.retention`), or None where retention is off."""
    if not cfg.enabled:
        return None
    if cfg.data is not None:
        kind, records = read_retention_file(cfg.data, cfg.max_items)
        if kind == "chat":
            items = encode_chat(records, processor, max_length=max_length, source=cfg.data)
        else:
            items = encode_texts(records, processor.tokenizer, max_length=max_length, source=cfg.data)
        what = "assistant token" if kind == "chat" else "token"
        return RetentionSet(items, FILE_MEASURED.format(what=what, n=len(items), path=cfg.data))
    if not tiny_world:
        return None
    items = encode_chat(world_records(cfg.n_world), processor, max_length=max_length, source="tiny world dialogues")
    return RetentionSet(items, WORLD_MEASURED.format(n=len(items)))


# --- the LM's text path -----------------------------------------------------------------------------


def text_lm(model) -> torch.nn.Module:
    """A causal LM of the language model's own class whose decoder and head *are* the Llava model's (no copy).

    Built on the meta device, then given the Llava model's `language_model` and `lm_head` modules, so it owns no
    weights: what trains in the Llava model is what this scores. Its config ties the head to the embeddings only
    where the Llava model already does, since lm-eval calls `tie_weights()` and must not change the model.
    """
    from transformers import AutoModelForCausalLM

    inner = unwrap(model)
    language_model, head = inner.model.language_model, inner.lm_head
    config = copy.deepcopy(inner.config.get_text_config())
    config.tie_word_embeddings = head.weight is language_model.get_input_embeddings().weight
    with torch.device("meta"):
        view = AutoModelForCausalLM.from_config(config)
    view.model, view.lm_head = language_model, head
    return view


@contextlib.contextmanager
def kept_modes(model):
    """Put each module's train/eval mode back afterwards (a scorer that calls `.eval()` / `.train()` on a view
    that shares the model's modules would otherwise leave them in its own mode)."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


# --- scoring ----------------------------------------------------------------------------------------


@torch.no_grad()
def item_losses(model, items: list[tuple[list, list]], *, pad_id: int, batch_size: int = 32,
                base: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(mean loss per scored token, scored tokens) of each item, text only; `base`: with LoRA switched off.

    Items are batched in order of length (little padding), and the results put back in the items' order. The
    LM head runs only at the scored positions: a 7B model's full logits are vocabulary x length floats per item.
    """
    device = next(model.parameters()).device
    inner = unwrap(model)  # LoRA layers live inside it, switched off by `disable_adapter` on the wrapper
    adapters_off = getattr(model, "disable_adapter", None) if base else None
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    losses, counts = np.zeros(len(items)), np.zeros(len(items), dtype=int)
    was_training = model.training
    model.eval()
    try:
        with adapters_off() if callable(adapters_off) else contextlib.nullcontext():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                ids, labels, mask = _pad([items[i] for i in rows], pad_id)
                hidden = inner.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
                target = labels[:, 1:].to(device)
                keep = target != IGNORE_INDEX
                nll = F.cross_entropy(inner.lm_head(hidden[:, :-1][keep]).float(), target[keep], reduction="none")
                row_of = torch.arange(len(rows), device=device)[:, None].expand_as(target)[keep]
                sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_of, nll.double())
                scored = keep.sum(1)
                losses[rows] = (sums / scored.clamp(min=1)).cpu().numpy()
                counts[rows] = scored.cpu().numpy()
    finally:
        model.train(was_training)
    return losses, counts


def _pad(chunk: list[tuple[list, list]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, attention_mask), right-padded to the longest item."""
    width = max(len(ids) for ids, _ in chunk)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, (x, y) in enumerate(chunk):
        ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, labels, mask


def retention_result(before: np.ndarray, after: np.ndarray, tokens: np.ndarray, *, measured: str,
                     n_boot: int = 1000) -> dict:
    """summary.json's `eval.retention` from the per-item losses of the base and of the trained LM."""
    diff = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    b, a = float(np.mean(before)), float(np.mean(after))
    return {"before": b, "after": a, "difference": float(diff.mean()), "ci": bootstrap_ci(diff, n_boot=n_boot),
            "n": int(diff.size), "tokens": int(np.sum(tokens)), "perplexity_before": math.exp(b),
            "perplexity_after": math.exp(a), "measured": measured}


def checkpoint_identity(checkpoint: str, **settings) -> dict:
    """What names a base: its path or hub id, its weight files' names, sizes and times, and `settings`."""
    folder = Path(str(checkpoint))
    files = []
    if folder.is_dir():
        files = sorted((str(p.relative_to(folder)), p.stat().st_size, int(p.stat().st_mtime))
                       for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt"))
    return {"checkpoint": str(checkpoint), "files": files, **settings}


@dataclass
class RetentionProbe:
    """A run's retention: the set and the base's per-item losses, taken before training; `measure` after."""

    rset: RetentionSet
    before: np.ndarray
    tokens: np.ndarray
    cached: bool
    before_s: float
    pad_id: int
    batch_size: int
    reading: ReadingProbe | None = None  # the tiny world's LM reading boards, where asked

    @classmethod
    def start(cls, rset: RetentionSet, model, *, pad_id: int, batch_size: int, identity: dict,
              cache_dir: Path) -> RetentionProbe:
        """Read the base's losses from the cache, or score the base (the model as loaded) and cache them."""
        start = time.perf_counter()
        # The batches are part of the key: the same items batched alike give bitwise the same losses, so a
        # frozen LLM's difference is exactly 0 also when "before" comes from the cache.
        material = {"version": RETENTION_VERSION, "base": identity, "set": rset.digest(), "batch_size": batch_size}
        key = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = Path(cache_dir) / "retention" / f"{key}.json"
        cached = path.exists()
        if cached:
            stored = json.loads(path.read_text())
            before, tokens = np.array(stored["losses"], dtype=float), np.array(stored["tokens"], dtype=int)
        else:
            before, tokens = item_losses(model, rset.items, pad_id=pad_id, batch_size=batch_size, base=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"base": identity, "losses": before.tolist(), "tokens": tokens.tolist()},
                                      default=str))
            os.replace(tmp, path)
        return cls(rset, before, tokens, cached, time.perf_counter() - start, pad_id, batch_size)

    def measure(self, model, out_dir: Path, *, n_boot: int = 1000) -> dict:
        """Score the trained model; write the per-item losses to out_dir/items.jsonl; return the section."""
        start = time.perf_counter()
        after, _ = item_losses(model, self.rset.items, pad_id=self.pad_id, batch_size=self.batch_size)
        result = retention_result(self.before, after, self.tokens, measured=self.rset.measured, n_boot=n_boot)
        seconds = time.perf_counter() - start
        result.update(seconds=round(self.before_s + seconds, 3), before_cached=self.cached)
        if self.reading is not None:
            result["reading"] = self.reading.measure(model)
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / "items.jsonl").open("w") as f:
            for i, (b, a, n) in enumerate(zip(self.before, after, self.tokens)):
                f.write(json.dumps({"item": i, "before": float(b), "after": float(a), "tokens": int(n)}) + "\n")
        lo, hi = result["ci"]
        log.info("retention (%d text-only items): loss %.4f -> %.4f, difference %+.4f (95%% CI %+.4f to %+.4f), "
                 "perplexity %.3f -> %.3f; %.2f s (before: %s, %.2f s; after: %.2f s)", result["n"], result["before"],
                 result["after"], result["difference"], lo, hi, result["perplexity_before"],
                 result["perplexity_after"], result["seconds"], "cached" if self.cached else "computed",
                 self.before_s, seconds)
        return result


# --- the tiny world's reading -------------------------------------------------------------------------

READING_VERSION = 1  # bump when how the reading probe is scored changes: cached "before" values then recompute
# The boards of the retention reading probe: held out (the "reading_probe" split no training document draws
# from), and apart from the components' own probes (seeds 0 and 1) and their tests' (2).
READING_SEED = 3
READING_MEASURED = ("greedy exact-match accuracy of the LM reading board transcripts (16 cell vectors where "
                    "<image> stands, as it was pretrained), {n} held-out questions per kind and answer format "
                    "(short answer; MMBench's letter as '@choice'), no image; before = the base LM as loaded, "
                    "after = the trained cell; difference = after - before (negative: forgetting)")


@dataclass
class ReadingProbe:
    """The tiny world's LM reading boards: the base's accuracies per kind, taken before training; `measure` after.

    The LM is read through the trained model's own modules (`text_lm`), so LoRA and full fine-tuning show, and a
    frozen LLM reads the same items through the same weights twice: its difference is 0 per kind by construction.
    """

    items: dict
    board: torch.nn.Module
    enc: object
    before: dict
    cached: bool
    before_s: float
    per_kind: int

    @classmethod
    def start(cls, model, tokenizer, components: Path, recipe, *, per_kind: int, identity: dict,
              cache_dir: Path) -> ReadingProbe:
        """The probe's items from `recipe` (the components' ComponentsConfig), every kind in each of its formats;
        the base's accuracies from the cache, or scored on the model as loaded (LoRA off) and cached."""
        from vlmablate.world.components import every_kind_probe_set, load_board
        from vlmablate.world.reading import Encoder

        start = time.perf_counter()
        enc = Encoder(tokenizer)
        items = every_kind_probe_set(enc, recipe, seed=READING_SEED, per_kind=per_kind)
        board = load_board(components).to(next(model.parameters()).device)
        material = {"version": READING_VERSION, "base": identity, "components": str(components),
                    "meta": json.loads((Path(components) / "meta.json").read_text())["hash"], "per_kind": per_kind,
                    "seed": READING_SEED}
        key = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = Path(cache_dir) / "retention" / f"reading-{key}.json"
        cached = path.exists()
        probe = cls(items, board, enc, {}, cached, 0.0, per_kind)
        if cached:
            probe.before = json.loads(path.read_text())["before"]
        else:
            probe.before = probe.score(model, base=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"material": material, "before": probe.before}, default=str))
            os.replace(tmp, path)
        probe.before_s = time.perf_counter() - start
        return probe

    @torch.no_grad()
    def score(self, model, *, base: bool = False) -> dict[str, float]:
        """Accuracy per kind ("colour", "colour@choice", ...) of the model's LM; `base`: with LoRA switched off."""
        from vlmablate.world.reading import reading_probe

        adapters_off = getattr(model, "disable_adapter", None) if base else None
        with kept_modes(model), (adapters_off() if callable(adapters_off) else contextlib.nullcontext()):
            return reading_probe(text_lm(model), self.board, self.enc, self.items)

    def measure(self, model) -> dict:
        """summary.json's `eval.retention.reading`: before, after and difference per kind, and their means."""
        start = time.perf_counter()
        after = self.score(model)
        kinds = list(self.before)
        difference = {k: round(after[k] - self.before[k], 4) for k in kinds}
        result = {"before": self.before, "after": after, "difference": difference,
                  "mean_before": round(float(np.mean([self.before[k] for k in kinds])), 4),
                  "mean_after": round(float(np.mean([after[k] for k in kinds])), 4),
                  "mean_difference": round(float(np.mean(list(difference.values()))), 4),
                  "per_kind": self.per_kind, "measured": READING_MEASURED.format(n=self.per_kind),
                  "seconds": round(self.before_s + time.perf_counter() - start, 3), "before_cached": self.cached}
        worst = min(kinds, key=difference.get)
        log.info("retention, reading boards (%d questions per kind and format): mean %.3f -> %.3f (%+.3f); most "
                 "lost: %s %.3f -> %.3f", self.per_kind, result["mean_before"], result["mean_after"],
                 result["mean_difference"], worst, self.before[worst], after[worst])
        return result
