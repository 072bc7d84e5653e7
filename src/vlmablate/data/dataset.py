"""LLaVA-format data sets: records from a `RecordStore`, images resolved safely, lazy encoding.

A LLaVA JSON file is a list of records `{"id", "image"?, "conversations": [...]}` (JSON Lines is
accepted too). `LlavaJsonDataset` encodes one record on demand: it opens the image (from the image
root, or bytes stored in an HF source), applies the aspect mode (`square`, LLaVA-1.5's `pad`, or
`anyres`, which leaves the image whole for LLaVA-NeXT's processor to tile) and calls
`encode_conversation`. Every error names the source file, the record index and id, and the reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from vlmablate.data.errors import DataError
from vlmablate.data.records import RecordStore
from vlmablate.data.scan import check_structure, open_image, record_ref, resolve_image
from vlmablate.data.templates import (
    TEMPLATES,
    TemplateError,
    encode_conversation,
    fully_masked,
)

IMAGE_ASPECTS = ("square", "pad", "anyres")

__all__ = [
    "IMAGE_ASPECTS",
    "DataError",
    "LlavaJsonDataset",
    "expand2square",
    "llava_turns",
    "load_llava_json",
    "preflight",
]


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
        text = path.read_text(encoding="utf-8-sig")  # a UTF-8 byte order mark is allowed, and dropped
    except OSError as err:
        raise DataError(f"{path}: cannot read the data file: {err}") from err
    records = _parse_jsonl(path, text) if path.suffix == ".jsonl" else _parse_json(path, text)
    for i, record in enumerate(records):
        check_structure(record, record_ref(path, i, record))
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
    """LLaVA records encoded lazily: `__getitem__` opens the image and tokenizes on demand.

    `records` is a `RecordStore` (memory-mapped Arrow, what sources build) or a list of dicts.
    """

    def __init__(
        self,
        records: RecordStore | list[dict],
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
        if image_aspect == "anyres" and not getattr(processor.image_processor, "image_grid_pinpoints", None):
            raise DataError(f"{self.source_path}: image_aspect=anyres needs a LLaVA-NeXT processor (with "
                            f"image_grid_pinpoints); {type(processor.image_processor).__name__} has none")
        if not isinstance(max_length, int) or max_length < 1:
            raise DataError(f"{self.source_path}: max_length must be a positive int, got {max_length!r}")
        if isinstance(records, list):
            for i, record in enumerate(records):
                check_structure(record, record_ref(self.source_path, i, record))
            records = RecordStore.from_records(records, source=str(self.source_path))
        self.records = records
        self.image_root = Path(image_root).resolve() if image_root is not None else None
        self.processor = processor
        self.template = template
        self.max_length = max_length
        self.image_aspect = image_aspect

    def __len__(self) -> int:
        return len(self.records)

    def record_ref(self, i: int, record: dict | None = None) -> str:
        """`file#index (id=...)`, the prefix of every message about record i."""
        return record_ref(self.source_path, i, self.records[i] if record is None else record)

    def image_path(self, i: int) -> Path | None:
        """The resolved path of record i's image (None if text-only), checked to lie inside image_root.

        The check runs on the resolved path (symlinks followed, `..` collapsed) before anything is
        opened, so a record cannot make the loader read a file outside the data set.
        """
        record = self.records[i]
        relative = record.get("image")
        return None if relative is None else resolve_image(relative, self.image_root, self.record_ref(i, record))

    def load_image(self, i: int, record: dict | None = None) -> Image.Image | None:
        """Record i's image as RGB, with the aspect mode applied (None if text-only)."""
        record = self.records[i] if record is None else record
        if record.get("image") is None:
            return None
        image = open_image(record, self.image_root, self.record_ref(i, record))
        return apply_aspect(image, self.image_aspect, self.processor)

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.source_path}: index {i} out of range for {len(self)} records")
        record = self.records[i]
        ref = self.record_ref(i, record)
        check_structure(record, ref)
        image = self.load_image(i, record)
        try:
            encoded = encode_conversation(
                record["conversations"],
                template=self.template,
                processor=self.processor,
                image=image,
                max_length=self.max_length,
                record_ref=ref,
            )
        except TemplateError as err:  # its message already names file, record and id
            raise DataError(str(err), err.reason) from err
        encoded["index"] = i
        encoded["record_ref"] = ref  # which record this sample is (a mix may serve a substitute)
        return encoded

    def modality_lengths(self, image_tokens: int = 0) -> list[int]:
        """Per-record length estimates from word counts (LLaVA's own estimate; sources use the scan's
        token counts instead).

        LLaVA's convention: positive for records with an image, negative for text-only. `image_tokens`
        is added to image records (0 by default, as LLaVA's `modality_lengths` does). Never 0, so the
        sign always tells the modality.
        """
        lengths = []
        for record in self.records.iter_records():
            words = sum(len(str(turn.get("value", turn.get("content", ""))).split())
                        for turn in record["conversations"] if isinstance(turn, dict))
            if record.get("image") is not None:
                lengths.append(max(1, words + image_tokens))
            else:
                lengths.append(-max(1, words))
        return lengths


def apply_aspect(image: Image.Image, mode: str, processor) -> Image.Image:
    """`pad`: centre the image on a square of the processor's mean colour (LLaVA-1.5). `square` and
    `anyres` hand the image over unchanged: CLIP's processor makes it square (short side resized,
    centre crop, LLaVA's stage-1 default); LLaVA-NeXT's picks a grid pinpoint and tiles it."""
    if mode == "pad":
        mean = processor.image_processor.image_mean
        return expand2square(image, tuple(int(x * 255) for x in mean))
    return image


def preflight(dataset: Dataset, max_records: int = 256, bad_records: dict[str, str] | None = None) -> dict:
    """Encode the first samples and count the records with every label masked; raise if that is most of them.

    Catches a template that does not match the tokenizer (loss 0, nothing learned, LLaVA #1166)
    before training starts. A ConcatDataset or a mix is checked source by source, so one bad source
    among good ones is not averaged away. Results are per record actually encoded: a mix under
    `data.on_bad_sample=skip` may serve a substitute for a bad record, which is then reported under its
    own reference, and the bad record under `bad` (by reason, each record once). `bad_records`, when
    given, receives every bad record met (reference -> reason), in the order met.
    """
    if isinstance(dataset, ConcatDataset) or hasattr(dataset, "source_views"):
        sources = dataset.source_views if hasattr(dataset, "source_views") else dataset.datasets
        parts = [preflight(part, max_records, bad_records) for part in sources]
        bad: dict[str, int] = {}
        for part in parts:
            for reason, n in part["bad"].items():
                bad[reason] = bad.get(reason, 0) + n
        return {
            "checked": sum(p["checked"] for p in parts),
            "fully_masked": sum(p["fully_masked"] for p in parts),
            "examples": [ref for p in parts for ref in p["examples"]][:5],
            "bad": dict(sorted(bad.items())),
        }
    encoded: dict[str, bool] = {}  # record reference -> fully masked, in the order first met
    met: dict[str, str] = {}
    for i in range(min(len(dataset), max_records)):
        sample = dataset[i]
        for ref, reason in sample.get("bad_samples", ()):
            met.setdefault(ref, reason)
            if bad_records is not None:
                bad_records.setdefault(ref, reason)
        encoded.setdefault(sample.get("record_ref") or _ref_of(dataset, i), fully_masked(sample["labels"]))
    masked = [ref for ref, is_masked in encoded.items() if is_masked]
    if 2 * len(masked) > len(encoded):
        source = getattr(dataset, "source_path", type(dataset).__name__)
        raise DataError(
            f"{source}: {len(masked)} of the first {len(encoded)} records: every label is masked: the template "
            "does not match the tokenizer, training would learn nothing. "
            f"Examples: {masked[:5]}"
        )
    bad: dict[str, int] = {}
    for reason in met.values():
        bad[reason] = bad.get(reason, 0) + 1
    return {"checked": len(encoded), "fully_masked": len(masked), "examples": masked[:5],
            "bad": dict(sorted(bad.items()))}


def _ref_of(dataset: Dataset, i: int) -> str:
    record_ref = getattr(dataset, "record_ref", None)
    return record_ref(i) if callable(record_ref) else f"record {i}"
