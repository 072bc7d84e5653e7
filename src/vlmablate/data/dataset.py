"""LLaVA-format data sets: loading the JSON, resolving images safely, lazy encoding, a label preflight.

A LLaVA JSON file is a list of records `{"id", "image"?, "conversations": [...]}` (JSON Lines is
accepted too). `LlavaJsonDataset` keeps the records and encodes one on demand: it opens the image,
applies the aspect policy (`square` or LLaVA-1.5's `pad`) and calls `encode_conversation`. Several
of them concatenate with `torch.utils.data.ConcatDataset`. Every error names the source file, the
record index and id, and the reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from vlmablate.data.templates import TEMPLATES, TemplateError, encode_conversation, fully_masked

IMAGE_ASPECTS = ("square", "pad")
_UNREADABLE_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DataError(ValueError):
    """A data file or record that cannot be used; the message names the file, record and reason."""


def llava_turns(pairs: list[tuple[str, str]], image: bool = False) -> list[dict]:
    """LLaVA's human/gpt turns for question–answer pairs; `<image>` only at the start of the first
    human turn, as LLaVA writes it."""
    turns = []
    for k, (question, answer) in enumerate(pairs):
        prefix = "<image>\n" if image and k == 0 else ""
        turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return turns


def load_llava_json(path: str | os.PathLike) -> list[dict]:
    """Read a LLaVA JSON list (or `.jsonl`, one record a line) and check each record's shape."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"{path}: cannot read the data file: {err}") from err
    records = _parse_jsonl(path, text) if path.suffix == ".jsonl" else _parse_json(path, text)
    for i, record in enumerate(records):
        _check_record(record, f"{path}#{i}")
    return records


def _parse_json(path: Path, text: str) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from err
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _parse_jsonl(path: Path, text: str) -> list:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {lineno} is not valid JSON: {err.msg}") from err
    return records


def _check_record(record, where: str) -> None:
    """The cheap structural checks; conversations themselves are validated when encoded."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is {type(record).__name__}, expected an object")
    ref = f"{where} (id={record.get('id', '?')})"
    if not isinstance(record.get("conversations"), list):
        raise DataError(f"{ref}: record has no 'conversations' list")
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise DataError(f"{ref}: 'image' must be one relative path (one image per sample), got {image!r}")


def expand2square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's pad: centre the image on a square canvas of colour `fill`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class LlavaJsonDataset(Dataset):
    """LLaVA records encoded lazily: `__getitem__` opens the image and tokenizes on demand."""

    def __init__(
        self,
        records: list[dict],
        *,
        source_path: str | os.PathLike,
        image_root: str | os.PathLike | None,
        processor,
        template: str,
        max_length: int,
        image_aspect: str = "square",
    ):
        self.source_path = Path(source_path)
        if template not in TEMPLATES:
            raise DataError(f"{self.source_path}: unknown template {template!r}; expected one of {TEMPLATES}")
        if image_aspect not in IMAGE_ASPECTS:
            raise DataError(f"{self.source_path}: unknown image_aspect {image_aspect!r}; expected {IMAGE_ASPECTS}")
        if not isinstance(max_length, int) or max_length < 1:
            raise DataError(f"{self.source_path}: max_length must be a positive int, got {max_length!r}")
        for i, record in enumerate(records):
            _check_record(record, f"{self.source_path}#{i}")
        self.records = records
        self.image_root = Path(image_root).resolve() if image_root is not None else None
        self.processor = processor
        self.template = template
        self.max_length = max_length
        self.image_aspect = image_aspect

    def __len__(self) -> int:
        return len(self.records)

    def record_ref(self, i: int) -> str:
        """`file#index (id=...)`, the prefix of every message about record i."""
        return f"{self.source_path}#{i} (id={self.records[i].get('id', '?')})"

    def image_path(self, i: int) -> Path | None:
        """The resolved path of record i's image (None if text-only), checked to lie inside image_root.

        The check runs on the resolved path (symlinks followed, `..` collapsed) before anything is
        opened, so a record cannot make the loader read a file outside the data set.
        """
        relative = self.records[i].get("image")
        if relative is None:
            return None
        if self.image_root is None:
            raise DataError(f"{self.record_ref(i)}: the record has an image but no image_root was given")
        resolved = (self.image_root / relative).resolve()
        if not resolved.is_relative_to(self.image_root):
            raise DataError(
                f"{self.record_ref(i)}: image path {relative!r} resolves outside image_root "
                f"{self.image_root}; refusing to open it"
            )
        if not resolved.is_file():
            raise DataError(f"{self.record_ref(i)}: image file not found: {resolved}")
        return resolved

    def load_image(self, i: int) -> Image.Image | None:
        """Record i's image as RGB, with the aspect policy applied (None if text-only)."""
        path = self.image_path(i)
        if path is None:
            return None
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")  # convert() loads the pixels, so corrupt data fails here
        except _UNREADABLE_IMAGE as err:
            raise DataError(f"{self.record_ref(i)}: cannot read image {path}: {err}") from err
        if self.image_aspect == "pad":
            mean = self.processor.image_processor.image_mean
            image = expand2square(image, tuple(int(x * 255) for x in mean))
        return image

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.source_path}: index {i} out of range for {len(self)} records")
        image = self.load_image(i)
        try:
            encoded = encode_conversation(
                self.records[i]["conversations"],
                template=self.template,
                processor=self.processor,
                image=image,
                max_length=self.max_length,
                record_ref=self.record_ref(i),
            )
        except TemplateError as err:  # its message already names file, record and id
            raise DataError(str(err)) from err
        encoded["index"] = i
        return encoded

    def modality_lengths(self, image_tokens: int = 0) -> list[int]:
        """Per-record length estimates for modality grouping, from word counts only.

        LLaVA's convention: positive for records with an image, negative for text-only. `image_tokens`
        is added to image records (0 by default, as LLaVA's `modality_lengths` does). Never 0, so the
        sign always tells the modality.
        """
        lengths = []
        for record in self.records:
            words = sum(len(str(turn.get("value", turn.get("content", ""))).split())
                        for turn in record["conversations"] if isinstance(turn, dict))
            if record.get("image") is not None:
                lengths.append(max(1, words + image_tokens))
            else:
                lengths.append(-max(1, words))
        return lengths


def preflight(dataset: Dataset, max_records: int = 256) -> dict:
    """Encode the first records and count those with every label masked; raise if that is most of them.

    Catches a template that does not match the tokenizer (loss 0, nothing learned, LLaVA #1166)
    before training starts. A ConcatDataset is checked source by source, so one bad source among
    good ones is not averaged away.
    """
    if isinstance(dataset, ConcatDataset):
        parts = [preflight(part, max_records) for part in dataset.datasets]
        return {
            "checked": sum(p["checked"] for p in parts),
            "fully_masked": sum(p["fully_masked"] for p in parts),
            "examples": [ref for p in parts for ref in p["examples"]][:5],
        }
    checked = min(len(dataset), max_records)
    masked = [_ref_of(dataset, i) for i in range(checked) if fully_masked(dataset[i]["labels"])]
    if 2 * len(masked) > checked:
        source = getattr(dataset, "source_path", type(dataset).__name__)
        raise DataError(
            f"{source}: {len(masked)} of the first {checked} records: every label is masked: the template "
            "does not match the tokenizer (or max_length cuts every answer), training would learn nothing. "
            f"Examples: {masked[:5]}"
        )
    return {"checked": checked, "fully_masked": len(masked), "examples": masked[:5]}


def _ref_of(dataset: Dataset, i: int) -> str:
    record_ref = getattr(dataset, "record_ref", None)
    return record_ref(i) if callable(record_ref) else f"record {i}"
