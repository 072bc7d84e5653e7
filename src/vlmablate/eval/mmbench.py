"""MMBench questions: read a VLMEvalKit-style TSV, group its circular copies, build LLaVA-1.5's prompt.

A TSV row is one circular copy of a question: copy k of question q has index `q + k * 1_000_000`,
its options rotated left by k and its answer letter remapped. `read_mmbench_tsv` groups the rows
under their main question (copy 0) and checks them. Reading follows what VLMEvalKit sees through
`pandas.read_csv` without needing pandas:

- columns are found by name; header names are lower-cased except the one-letter option columns
  (VLMEvalKit does the same), so `L2-category`, `l2-category` and `l2_category` are one column;
- a cell is missing when pandas would read NaN (empty, `nan`, `NaN`, `None`, `NA`, `null`, ...) or
  when LLaVA's `is_none` would call it none (`nan`/`none` in any case). An option is present iff its
  cell is not missing; the present options must be A, B, ... without gaps;
- `image` holds base64, or, when 64 characters or fewer, the `index` of the row that holds the
  image (one hop, as VLMEvalKit's loader asserts). Every image cell is decoded strictly (standard
  alphabet, no stray characters) and must open as an image when the file is read, not when the model
  first needs it;
- `split="dev"` needs an `answer` in every row; `split="test"` (MMBench's test split has no answers)
  reads none. The file's own `split` column is optional and only recorded.

Copies found in the file must carry the main question's option texts (as a multiset) and the same
correct text, else the file is rejected: scoring such a copy would test a different question. A copy
whose order is not the exact left rotation is only warned about, since CircularEval needs nothing
but each copy's own answer. Every error is a ValueError naming the file, the row and the reason.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import logging
import os
import string
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlmablate.eval.extract import PANDAS_NA

log = logging.getLogger(__name__)

COPY_STRIDE = 1_000_000
CIRCULAR_MODES = ("auto", "expand", "off")
SPLITS = ("dev", "test")
REQUIRED_COLUMNS = ("index", "question", "A", "B", "image")
IMAGE_REF_MAX_CHARS = 64
ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."

# pandas' default NaN spellings are extract.PANDAS_NA; then LLaVA's `is_none` ('nan' / 'none', any case).
_LLAVA_NONE = frozenset({"nan", "none"})
_HEADER_ALIASES = {"l2_category": "l2-category"}
# What a file has been warned about, by (file, size, mtime, message). One run reads its TSV several times
# (the config check before training, the evaluation, its blank-image baseline, the W&B table); a warning
# about the file is news the first time only.
_WARNED: set[tuple] = set()


@dataclass
class Copy:
    """One row of the TSV: one circular copy of a question."""

    index: int  # q + k * 1_000_000
    k: int
    options: dict[str, str]  # present options only, in letter order
    answer: str | None  # the correct letter; None when the split has no answers


@dataclass
class Question:
    """A main question with its copies (copy 0 first) and its resolved base64 image."""

    q: int
    question: str
    hint: str | None
    category: str
    l2_category: str
    split: str | None
    image_b64: str | None
    copies: list[Copy]


@dataclass
class _Row:
    where: str  # "FILE line L (row N, index I)", the prefix of every message about this row
    index: int
    question: str
    hint: str | None
    options: dict[str, str]
    answer: str | None
    category: str
    l2_category: str
    split: str | None
    image: str


def read_mmbench_tsv(path: str | os.PathLike, *, circular: str = "auto", split: str = "dev") -> list[Question]:
    """Read an MMBench TSV into main questions, in file order, each with its circular copies.

    `circular`: `auto` uses the copies the file has (none: one copy per question); `expand` also
    generates the rotations when the file has no copies at all (a file that has copies is used as
    it is); `off` keeps copy 0 only and ignores copy rows (they still count for duplicate indices
    and broken image references, which make the file itself unreadable).
    `split`: `dev` needs every row's answer; `test` reads no answers (every `Copy.answer` is None).
    """
    if circular not in CIRCULAR_MODES:
        raise ValueError(f"circular={circular!r}: expected one of {', '.join(CIRCULAR_MODES)}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    path = Path(path)
    rows = _read_rows(path, split)
    images = _resolve_images(rows)
    mains = {row.index: row for row in rows if row.index < COPY_STRIDE}
    file_copies = {} if circular == "off" else _group_copies(rows, mains, path)
    if circular == "expand" and not file_copies:
        copies = {q: _rotations(main) for q, main in mains.items()}
    else:
        copies = {q: _checked_copies(mains[q], rows_q, path) for q, rows_q in file_copies.items()}
    return [_question(main, images[main.index], copies.get(q, [])) for q, main in mains.items()]


def prompt_text(question: Question, copy: Copy) -> str:
    """LLaVA-1.5's MMBench prompt (`model_vqa_mmbench.py`, single-prediction mode), without `<image>`."""
    lines = [] if question.hint is None else [question.hint]
    lines.append(question.question)
    lines.extend(f"{letter}. {text}" for letter, text in copy.options.items())
    lines.append(ANSWER_INSTRUCTION)
    return "\n".join(lines)


def decode_image(b64: str) -> Image.Image:
    """Decode a base64 image cell into an RGB PIL image (VLMEvalKit drops alpha and palettes the same way)."""
    try:
        image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        image.load()
    except (binascii.Error, ValueError, OSError) as err:
        raise ValueError(f"not a decodable base64 image ({len(b64)} characters): {err}") from err
    return image.convert("RGB")


def read_table(path: str | os.PathLike) -> tuple[list[str], list[tuple[int, int, list[str]]]]:
    """The TSV's header and its non-blank rows as (line, row, cells): the line of the file the row starts
    on (as an editor numbers them: the header is line 1) and its number among the rows after the header
    (row 1 is the first)."""
    path = Path(path)
    # Base64 images are far longer than the csv module's 128 KiB default field limit. The limit is
    # process-wide, so it is only ever raised.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    table = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t")
            line = 1  # a quoted cell may span lines: a row is named by the line it starts on
            for cells in reader:
                table.append((line, cells))
                line = reader.line_num + 1
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: cannot read the MMBench TSV: {err}") from err
    if not table:
        raise ValueError(f"{path}: the file is empty (expected a header row)")
    rows = [(line, number, cells) for number, (line, cells) in enumerate(table[1:], start=1)
            if any(c.strip() for c in cells)]
    return table[0][1], rows


def column_name(raw: str) -> str:
    """A header cell as VLMEvalKit names the column: lower-cased unless it is an option letter."""
    name = raw.strip()
    name = name if _is_option_column(name) else name.lower()
    return _HEADER_ALIASES.get(name, name)


# ----------------------------------------------------------------------------- reading rows


def _read_rows(path: Path, split: str) -> list[_Row]:
    header, table = read_table(path)
    columns = _columns(header, path)
    if split == "dev" and "answer" not in columns:
        raise ValueError(f"{path}: no answer column, so this dev split cannot be scored (header: "
                         f"{', '.join(header)}). A test split has no answers: evaluate it with eval.split=test, "
                         "which writes the MMBench submission file instead of scores")
    if split == "test" and "answer" in columns:
        warn_once(path, f"{path} has an answer column; eval.split=test does not read it (use eval.split=dev to score)")
    rows, seen = [], {}
    for line, number, cells in table:
        row = _parse_row(cells, columns, f"{path} line {line}", f"row {number}", split=split)
        if row.index in seen:
            raise ValueError(f"{row.where}: duplicate index {row.index} (first at line {seen[row.index]})")
        seen[row.index] = line
        rows.append(row)
    return rows


def _columns(header: list[str], path: Path) -> dict[str, int]:
    """Column name -> position, names normalised the way VLMEvalKit normalises them."""
    columns: dict[str, int] = {}
    for position, raw in enumerate(header):
        name = column_name(raw)
        if name in columns:
            raise ValueError(f"{path}: column {raw!r} appears twice in the header")
        columns[name] = position
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {', '.join(missing)} "
                         f"(header: {', '.join(header)})")
    return columns


def warn_once(path: Path, message: str) -> None:
    """Log a warning about the file unless this process has given it for the file as it is now."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, message)
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("%s", message)


def _is_option_column(name: str) -> bool:
    return len(name) == 1 and name in string.ascii_uppercase


def is_missing(cell: str | None) -> bool:
    """Whether pandas would read the cell as NaN, or LLaVA's `is_none` would call it none."""
    if cell is None:
        return True
    text = cell.strip()
    return text in PANDAS_NA or text.lower() in _LLAVA_NONE


def _parse_row(cells: list[str], columns: dict[str, int], line: str, row: str, *, split: str) -> _Row:
    """`line` ("FILE line L") and `row` ("row N") name the row in messages."""
    prefix = f"{line} ({row})"
    if len(cells) > len(columns):
        raise ValueError(f"{prefix}: {len(cells)} cells but the header has {len(columns)} columns")

    def cell(name: str) -> str | None:
        position = columns.get(name)
        value = cells[position] if position is not None and position < len(cells) else None
        return None if is_missing(value) else value

    raw_index = cell("index")
    try:
        index = int(raw_index.strip()) if raw_index is not None else None
    except ValueError:
        index = None
    if index is None or index < 0:
        raise ValueError(f"{prefix}: index {raw_index!r} is not a non-negative integer")
    where = f"{line} ({row}, index {index})"
    question = cell("question")
    if question is None:
        raise ValueError(f"{where}: the question cell is empty")
    options = _options(cell, sorted(n for n in columns if _is_option_column(n)), where)
    answer = cell("answer") if split == "dev" else None
    answer = None if answer is None else answer.strip()
    if answer is None and split == "dev":
        raise ValueError(f"{where}: the answer cell is empty; every row of a dev split needs its answer "
                         "(eval.split=test evaluates a split without answers)")
    if answer is not None and answer not in options:
        raise ValueError(f"{where}: answer {answer!r} is not one of the options {', '.join(options)}")
    return _Row(where=where, index=index, question=question, hint=cell("hint"), options=options,
                answer=answer, category=cell("category") or "", l2_category=cell("l2-category") or "",
                split=cell("split"), image=cells[columns["image"]] if columns["image"] < len(cells) else "")


def _options(cell, letters: list[str], where: str) -> dict[str, str]:
    """The present options; they must run A, B, ... without a gap (a gap would renumber the rest)."""
    present = {letter: cell(letter) for letter in letters if cell(letter) is not None}
    expected = list(string.ascii_uppercase[:len(present)])
    if list(present) != expected:
        raise ValueError(f"{where}: options {', '.join(present) or 'none'} are present; "
                         f"they must run A, B, ... without gaps")
    if len(present) < 2:
        raise ValueError(f"{where}: a question needs at least options A and B")
    return present


# ----------------------------------------------------------------------------- images


def _resolve_images(rows: list[_Row]) -> dict[int, str]:
    """Index -> real base64 for every row; a short cell is the index of the row holding the image."""
    raw = {row.index: row.image for row in rows}
    resolved = {}
    for row in rows:
        if len(row.image) > IMAGE_REF_MAX_CHARS:
            _check_image(row)
            resolved[row.index] = row.image
            continue
        try:
            target = int(row.image.strip())
        except ValueError:
            raise ValueError(f"{row.where}: image cell {row.image!r} is neither base64 (more than "
                             f"{IMAGE_REF_MAX_CHARS} characters) nor the index of another row") from None
        if target not in raw:
            raise ValueError(f"{row.where}: image refers to index {target}, which is not in the file")
        if len(raw[target]) <= IMAGE_REF_MAX_CHARS:
            # VLMEvalKit asserts the same: a reference must point at a row that holds the image.
            raise ValueError(f"{row.where}: image refers to index {target}, whose image cell is itself "
                             f"a reference ({raw[target]!r})")
        resolved[row.index] = raw[target]
    return resolved


def _check_image(row: _Row) -> None:
    """Strict base64 that opens as an image: a bad cell fails here, naming its row, not after the model loads."""
    try:
        data = base64.b64decode(row.image, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"{row.where}: the image cell is not valid base64 ({len(row.image)} characters: "
                         f"{err})") from None
    try:
        with Image.open(io.BytesIO(data)):  # reads the header only; pixels are decoded when needed
            pass
    except UnidentifiedImageError:
        raise ValueError(f"{row.where}: the image cell is base64 but not an image ({len(data)} bytes in no "
                         "format PIL knows)") from None
    except OSError as err:
        raise ValueError(f"{row.where}: the image cell is base64 but not a readable image ({err})") from None


# ----------------------------------------------------------------------------- circular copies


def _group_copies(rows: list[_Row], mains: dict[int, _Row], path: Path) -> dict[int, list[_Row]]:
    copies: dict[int, list[_Row]] = {}
    for row in rows:
        if row.index < COPY_STRIDE:
            continue
        q = row.index % COPY_STRIDE
        if q not in mains:
            raise ValueError(f"{row.where}: circular copy of question {q}, which is not in {path}")
        copies.setdefault(q, []).append(row)
    return copies


def rotate_options(options: dict[str, str], k: int) -> dict[str, str]:
    """MMBench's copy k: the option texts shifted left by k (copy 1 of A,B,C,D shows B,C,D,A)."""
    letters, texts = list(options), list(options.values())
    return {letter: texts[(j + k) % len(texts)] for j, letter in enumerate(letters)}


def rotate_answer(answer: str | None, letters: list[str], k: int) -> str | None:
    """The letter that holds the correct text after a left shift by k."""
    if answer is None:
        return None
    return letters[(letters.index(answer) - k) % len(letters)]


def _rotations(main: _Row) -> list[Copy]:
    letters = list(main.options)
    return [Copy(index=main.index + k * COPY_STRIDE, k=k, options=rotate_options(main.options, k),
                 answer=rotate_answer(main.answer, letters, k))
            for k in range(1, len(letters))]


def _checked_copies(main: _Row, rows: list[_Row], path: Path) -> list[Copy]:
    copies = []
    for row in sorted(rows, key=lambda r: r.index):
        k = row.index // COPY_STRIDE
        _check_copy(main, row, k, path)
        copies.append(Copy(index=row.index, k=k, options=row.options, answer=row.answer))
    return copies


def _check_copy(main: _Row, row: _Row, k: int, path: Path) -> None:
    n = len(main.options)
    if k >= n:
        raise ValueError(f"{row.where}: copy k={k}, but question {main.index} has only {n} options")
    if sorted(row.options.values()) != sorted(main.options.values()):
        raise ValueError(f"{row.where}: options {list(row.options.values())} are not those of question "
                         f"{main.index} {list(main.options.values())}")
    if main.answer is not None and row.answer is not None \
            and row.options[row.answer] != main.options[main.answer]:
        raise ValueError(f"{row.where}: answer {row.answer} ({row.options[row.answer]!r}) is not the correct "
                         f"option of question {main.index} ({main.options[main.answer]!r})")
    if row.options != rotate_options(main.options, k):
        warn_once(path, f"{row.where}: options are not question {main.index}'s options rotated left by {k}; "
                  "keeping the file's order")


def _question(main: _Row, image_b64: str, copies: list[Copy]) -> Question:
    copy0 = Copy(index=main.index, k=0, options=main.options, answer=main.answer)
    return Question(q=main.index, question=main.question, hint=main.hint, category=main.category,
                    l2_category=main.l2_category, split=main.split, image_b64=image_b64,
                    copies=[copy0, *copies])
