"""One pass over a source before training: which records are bad (and why), and how long each one is.

The pass runs every check that needs no image decoding and no processor: record shape, roles and
their alternation, `<image>` markers against the record's image, where the image path resolves (a
path outside the image root is rejected and never opened) and whether the file exists, and an
estimate of the token length. Optionally (`data.verify_images`, always on in `vlmablate.data.check`)
each image file's integrity is checked with PIL's `verify()` too. What needs decoding or the processor
(corrupt pixel data, the exact length after image-token expansion) is caught when the sample is
encoded, under the same `data.on_bad_sample` policy.

Lengths follow LLaVA's `modality_lengths`: estimated tokens (text tokens plus the template's own
tokens, plus the model's image tokens for image records), negative for text-only records. The result
is cached next to the source's Arrow records, keyed by the source's identity, the tokenizer, the
template, max_length, the image tokens and the image root, so a 665k-record source is scanned once.
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
from vlmablate.data.records import RecordStore
from vlmablate.data.templates import (
    IMAGE_MARKER,
    TemplateError,
    chat_template_of,
    check_image_marker,
    to_messages,
)

SCAN_VERSION = 1
CODES = ("ok", *REASONS)  # a record's reason, stored as its index here (0 = usable)
_BATCH = 2048


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
                progress: bool = True) -> ScanResult:
    """Scan `store` once (cached); see the module docstring."""
    root = Path(image_root).resolve() if image_root is not None else None
    overhead = template_overhead(tokenizer, template)
    key = hashlib.sha256(json.dumps([SCAN_VERSION, store.identity, tokenizer_fingerprint(tokenizer), template,
                                     max_length, image_tokens, str(root), verify_images]).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / "scan"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.npz"
    with FileLock(str(path) + ".lock"):
        if path.exists():
            cached = np.load(path)
            return ScanResult(cached["lengths"], cached["reasons"])
        result = _scan(store, root, tokenizer, max_length, image_tokens, overhead, verify_images, progress)
        tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
        np.savez(tmp, lengths=result.lengths, reasons=result.reasons)
        os.replace(tmp, path)
    return result


def _scan(store, root, tokenizer, max_length, image_tokens, overhead, verify_images, progress) -> ScanResult:
    n = len(store)
    lengths = np.zeros(n, dtype=np.int32)
    reasons = np.zeros(n, dtype=np.int8)
    pending: list[tuple[int, str, bool, int]] = []  # (index, text, has image, number of turn pairs)

    def flush():
        if not pending:
            return
        counts = tokenizer([text for _, text, _, _ in pending], add_special_tokens=False)["input_ids"]
        for (i, _, has_image, pairs), ids in zip(pending, counts):
            estimate = len(ids) + overhead[0] + overhead[1] * max(0, pairs - 1)
            if has_image:
                if overhead[0] + image_tokens > max_length:  # the image itself would be cut
                    reasons[i] = CODES.index("too_long")
                    continue
                lengths[i] = max(1, estimate + image_tokens)
            else:
                lengths[i] = -max(1, estimate)
        pending.clear()

    bar = tqdm(total=n, desc=f"scanning {Path(store.source).name}", disable=not progress, unit="rec")
    for i, record in enumerate(store.iter_records()):
        ref = f"{store.source}#{i}"
        try:
            messages = check_record(record, root, ref, verify_image=verify_images)
        except (DataError, TemplateError) as err:
            reasons[i] = CODES.index(err.reason)
        else:
            text = " ".join(m["content"].replace(IMAGE_MARKER, "") for m in messages)
            pending.append((i, text, record.get("image") is not None,
                            sum(m["role"] == "assistant" for m in messages)))
            if len(pending) >= _BATCH:
                flush()
        bar.update()
    flush()
    bar.close()
    return ScanResult(lengths, reasons)


def template_overhead(tokenizer, template: str) -> tuple[int, int]:
    """Tokens the template adds: (for the first turn pair, incl. BOS and system prompt; for each further pair)."""
    if template == "plain":
        return 2, 0  # BOS and EOS around the caption
    chat_template, _ = chat_template_of(tokenizer)

    def tokens(pairs: int) -> int:
        messages = [m for _ in range(pairs) for m in ({"role": "user", "content": "x"},
                                                      {"role": "assistant", "content": "y"})]
        text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + BOS

    one, two = tokens(1), tokens(2)
    return max(0, one - 2), max(0, two - one - 2)


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer would count differently (vocabulary, merges, added tokens, template)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    text += str(getattr(tokenizer, "chat_template", None))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
