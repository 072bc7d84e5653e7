"""One pass over a source before training: which records are bad (and why), and how long each one is.

The pass runs every check that needs no image decoding and no processor: record shape (and JSON Lines
lines that do not parse), roles and their alternation, `<image>` markers against the record's image,
where the image path resolves (a path outside the image root is rejected and never opened) and whether
the file exists. Optionally (`data.verify_images`, always on in `vlmablate.data.check`) each image
file's integrity is checked with PIL's `verify()` too.

Each usable record is then rendered and tokenized exactly as encoding does (`templates.render_conversation`
and `tokenize_rendered`), with the image counted as the model's `image_tokens`, which gives its length
and two more reasons before training: `too_long` when the image tokens would end beyond `max_length`
(wherever `<image>` sits in the turn), and `answer_truncated` when the first trained token lies beyond
it. For Llava the length is exact; LLaVA-NeXT's tiles vary with the image, so there it is the base grid's
estimate and encoding applies the same two rules to the exact count (under the same `data.on_bad_sample`
policy), as it does for what needs decoding (corrupt pixel data).

Lengths follow LLaVA's `modality_lengths`: positive for image records, negative for text-only. The result
is cached next to the source's Arrow records, keyed by the source's identity, the tokenizer, the
template, max_length, the image token and count, and the image root, so a 665k-record source is scanned
once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image
from tqdm.auto import tqdm

from vlmablate.data.errors import REASONS, DataError
from vlmablate.data.records import INVALID_LINE, RecordStore
from vlmablate.data.templates import (
    IMAGE_MARKER,
    TemplateError,
    check_image_marker,
    render_conversation,
    to_messages,
    tokenize_rendered,
)

SCAN_VERSION = 2  # 2: exact lengths, answer_truncated, invalid_json
CODES = ("ok", *REASONS)  # a record's reason, stored as its index here (0 = usable)


@dataclass(frozen=True)
class ScanResult:
    lengths: np.ndarray  # int32: > 0 image records, < 0 text-only, 0 for bad records
    reasons: np.ndarray  # int8 indices into CODES

    @property
    def good(self) -> np.ndarray:
        """Indices of the usable records."""
        return np.flatnonzero(self.reasons == 0)

    def bad_counts(self) -> dict[str, int]:
        counts = Counter(int(c) for c in self.reasons if c)
        return {CODES[c]: n for c, n in sorted(counts.items())}

    def first_bad(self) -> int | None:
        bad = np.flatnonzero(self.reasons)
        return int(bad[0]) if len(bad) else None


def resolve_image(relative, image_root: Path | None, ref: str) -> Path:
    """The image's resolved path, checked to lie inside the image root before anything opens it."""
    if image_root is None:
        raise DataError(f"{ref}: the record has an image but the source has no image_root", "missing_image")
    resolved = (image_root / relative).resolve()
    if not resolved.is_relative_to(image_root):
        raise DataError(f"{ref}: image path {relative!r} resolves outside image_root {image_root}; "
                        "refusing to open it", "image_outside_root")
    if not resolved.is_file():
        raise DataError(f"{ref}: image file not found: {resolved}", "missing_image")
    return resolved


def check_structure(record, ref: str) -> None:
    """An object with a `conversations` list and at most one image path."""
    if isinstance(record, dict) and INVALID_LINE in record:
        where = record[INVALID_LINE]
        raise DataError(f"{ref}: line {where['line']} is not valid JSON: {where['error']}", "invalid_json")
    if not isinstance(record, dict):
        raise DataError(f"{ref}: record is {type(record).__name__}, expected an object")
    if not isinstance(record.get("conversations"), list):
        raise DataError(f"{ref} (id={record.get('id', '?')}): record has no 'conversations' list")
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise DataError(f"{ref} (id={record.get('id', '?')}): 'image' must be one relative path "
                        f"(one image per sample), got {image!r}")


def check_record(record, image_root: Path | None, ref: str, *, verify_image: bool = False) -> list[dict]:
    """The record's chat messages if it passes every check that needs no decoding; raises DataError or
    TemplateError (each with a `reason`) otherwise."""
    check_structure(record, ref)
    image = record.get("image")
    messages = to_messages(record["conversations"], ref)
    check_image_marker(messages, image, ref)
    if image is not None and record.get("image_data") is None:
        path = resolve_image(image, image_root, ref)
        if verify_image:
            try:
                with Image.open(path) as opened:
                    opened.verify()
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
                raise DataError(f"{ref}: cannot read image {path}: {err}", "unreadable_image") from err
    return messages


def scan_source(store: RecordStore, *, image_root: str | os.PathLike | None, tokenizer, template: str,
                max_length: int, image_tokens: int, cache_dir: str | os.PathLike, verify_images: bool = False,
                image_token: str = IMAGE_MARKER, progress: bool = True) -> ScanResult:
    """Scan `store` once (cached); see the module docstring."""
    root = Path(image_root).resolve() if image_root is not None else None
    key = hashlib.sha256(json.dumps([SCAN_VERSION, store.identity, tokenizer_fingerprint(tokenizer), template,
                                     max_length, image_tokens, image_token, str(root), verify_images]
                                    ).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / "scan"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.npz"
    with FileLock(str(path) + ".lock"):
        if path.exists():
            cached = np.load(path)
            return ScanResult(cached["lengths"], cached["reasons"])
        measure = _Measure(tokenizer, template, max_length, image_token, image_tokens)
        result = _scan(store, root, measure, verify_images, progress)
        tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
        np.savez(tmp, lengths=result.lengths, reasons=result.reasons)
        os.replace(tmp, path)
    return result


def _scan(store, root, measure, verify_images, progress) -> ScanResult:
    n = len(store)
    lengths = np.zeros(n, dtype=np.int32)
    reasons = np.zeros(n, dtype=np.int8)
    bar = tqdm(total=n, desc=f"scanning {Path(store.source).name}", disable=not progress, unit="rec")
    for i, record in enumerate(store.iter_records()):
        ref = f"{store.source}#{i}"
        try:
            messages = check_record(record, root, ref, verify_image=verify_images)
            lengths[i] = measure(messages, record.get("image") is not None, ref)
        except (DataError, TemplateError) as err:
            reasons[i] = CODES.index(err.reason)
        bar.update()
    bar.close()
    return ScanResult(lengths, reasons)


class _Measure:
    """A record's length in tokens as encoding will make it, or the reason it cannot be trained on."""

    def __init__(self, tokenizer, template: str, max_length: int, image_token: str, image_tokens: int):
        self.tokenizer, self.template, self.max_length = tokenizer, template, max_length
        self.image_token, self.image_tokens = image_token, image_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def __call__(self, messages: list[dict], has_image: bool, ref: str) -> int:
        text, spans = render_conversation(messages, template=self.template, tokenizer=self.tokenizer,
                                          image_token=self.image_token, has_image=has_image, ref=ref,
                                          first_reply_only=True)
        ids, offsets = tokenize_rendered(text, self.tokenizer, ref)
        reply_start = spans[0][0] if spans else len(text)
        first_trained = next((k for k, (start, _) in enumerate(offsets) if start >= reply_start), len(ids))
        length = len(ids)
        if has_image:
            if self.image_token_id not in ids:
                raise TemplateError(f"{ref}: the tokenizer does not encode {self.image_token!r} as one token")
            at = ids.index(self.image_token_id)  # the one real image token; marked ones are text
            if at + self.image_tokens > self.max_length:
                raise TemplateError(f"{ref}: image tokens would end at position {at + self.image_tokens} but "
                                    f"max_length is {self.max_length}", "too_long")
            length += self.image_tokens - 1
            first_trained += (self.image_tokens - 1) if at < first_trained else 0
        if first_trained >= self.max_length and first_trained < length:
            raise TemplateError(f"{ref}: the answer starts at token {first_trained + 1} but max_length is "
                                f"{self.max_length}", "answer_truncated")
        return length if has_image else -length


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer would count differently (vocabulary, merges, added tokens, template)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    text += str(getattr(tokenizer, "chat_template", None))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
