"""One pass over a source before training: which records are bad (and why), and how long each one is.

The pass runs every check that needs no image decoding and no processor: record shape (and JSON Lines
lines that do not parse), roles and their alternation, `<image>` markers against the record's image,
where the image path resolves (a path outside the image root is rejected and never opened) and whether
the file exists. Optionally (`data.verify_images`) each image is decoded too, exactly as encoding decodes
it (`open_image`): PIL's `verify()` passes a truncated JPEG, which only decoding finds. A field holding
NaN or Infinity (which Python's `json` reads and writes) makes its record bad (`non_finite_number`).

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
once. The image files are not in the key, so a cached verdict on them is never trusted: each load checks the
records flagged for their image file (`FILE_REASONS`) again, so an image added or repaired since counts at
once (an image broken since is found when encoded, under the same policy).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
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

SCAN_VERSION = 3  # 2: exact lengths, answer_truncated, invalid_json; 3: non_finite_number, decoding verify
CODES = ("ok", *REASONS)  # a record's reason, stored as its index here (0 = usable)
FILE_REASONS = ("missing_image", "unreadable_image", "image_outside_root")  # verdicts on files, checked on each load
_UNREADABLE_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


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


def record_ref(source, i: int, record) -> str:
    """`file#index (id=...)`, the prefix of every message about a record."""
    ident = record.get("id", "?") if isinstance(record, dict) else "?"
    return f"{source}#{i} (id={ident})"


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


def open_image(record: dict, image_root: Path | None, ref: str) -> Image.Image:
    """The record's image decoded as RGB, as encoding reads it (bytes stored in an HF source, or the file)."""
    if record.get("image_data") is not None:
        source, where = io.BytesIO(record["image_data"]), record["image"]
    else:
        source = where = resolve_image(record["image"], image_root, ref)
    try:
        with Image.open(source) as opened:
            return opened.convert("RGB")  # convert() loads the pixels, so corrupt data fails here
    except _UNREADABLE_IMAGE as err:
        raise DataError(f"{ref}: cannot read image {where}: {err}", "unreadable_image") from err


def check_structure(record, ref: str) -> None:
    """An object with no NaN or Infinity in it, a `conversations` list and at most one image path.

    `ref` names the record (`record_ref`: file, index and id)."""
    if isinstance(record, dict) and INVALID_LINE in record:
        where = record[INVALID_LINE]
        raise DataError(f"{ref}: line {where['line']} is not valid JSON: {where['error']}", "invalid_json")
    if not isinstance(record, dict):
        raise DataError(f"{ref}: record is {type(record).__name__}, expected an object")
    field = non_finite_field(record)
    if field is not None:
        name, value = field
        raise DataError(f"{ref}: field {name} is {json.dumps(value)}, which is not a JSON number (Python's json "
                        "writes it for a float that is not finite); fix or drop that value", "non_finite_number")
    if not isinstance(record.get("conversations"), list):
        raise DataError(f"{ref}: record has no 'conversations' list")
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise DataError(f"{ref}: 'image' must be one relative path (one image per sample), got {image!r}")


def non_finite_field(value, name: str = "") -> tuple[str, float] | None:
    """The first field holding NaN or Infinity, as (`conversations[1].value`-style name, value); None if none."""
    if isinstance(value, float) and not math.isfinite(value):
        return name or "(the record)", value
    if isinstance(value, dict):
        items = ((f"{name}.{k}" if name else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{name}[{k}]", v) for k, v in enumerate(value))
    else:
        return None
    for sub_name, sub in items:
        found = non_finite_field(sub, sub_name)
        if found is not None:
            return found
    return None


def check_record(record, image_root: Path | None, ref: str, *, verify_image: bool = False) -> list[dict]:
    """The record's chat messages if it passes every check that needs no processor (with `verify_image`, its
    image decoded as encoding decodes it); raises DataError or TemplateError (each with a `reason`) otherwise."""
    check_structure(record, ref)
    image = record.get("image")
    messages = to_messages(record["conversations"], ref)
    check_image_marker(messages, image, ref)
    if image is not None and record.get("image_data") is None:
        resolve_image(image, image_root, ref)
    if image is not None and verify_image:
        open_image(record, image_root, ref)
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
    measure = _Measure(tokenizer, template, max_length, image_token, image_tokens)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            cached = np.load(path)
            result = ScanResult(cached["lengths"], cached["reasons"])
            if not _recheck_files(store, root, measure, verify_images, result):
                return result
        else:
            result = _scan(store, root, measure, verify_images, progress)
        tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
        np.savez(tmp, lengths=result.lengths, reasons=result.reasons)
        os.replace(tmp, path)
    return result


def _judge(record, i: int, store, root, measure, verify_images) -> tuple[int, int]:
    """(length, reason code) of record i."""
    ref = record_ref(store.source, i, record)
    try:
        messages = check_record(record, root, ref, verify_image=verify_images)
        return measure(messages, record.get("image") is not None, ref), 0
    except (DataError, TemplateError) as err:
        return 0, CODES.index(err.reason)


def _recheck_files(store, root, measure, verify_images, result: ScanResult) -> bool:
    """Judge again, in place, the records a cached scan flagged for their image file; True if any changed."""
    codes = [CODES.index(reason) for reason in FILE_REASONS]
    changed = False
    for i in np.flatnonzero(np.isin(result.reasons, codes)):
        length, reason = _judge(store[int(i)], int(i), store, root, measure, verify_images)
        if (length, reason) != (result.lengths[i], result.reasons[i]):
            result.lengths[i], result.reasons[i], changed = length, reason, True
    return changed


def _scan(store, root, measure, verify_images, progress) -> ScanResult:
    n = len(store)
    lengths = np.zeros(n, dtype=np.int32)
    reasons = np.zeros(n, dtype=np.int8)
    bar = tqdm(total=n, desc=f"scanning {Path(store.source).name}", disable=not progress, unit="rec")
    for i, record in enumerate(store.iter_records()):
        lengths[i], reasons[i] = _judge(record, i, store, root, measure, verify_images)
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
