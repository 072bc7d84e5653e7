"""Records of a data source, kept on disk as Arrow and read one at a time.

A LLaVA JSON file of 665k records is ~1 GB of text; parsed whole into Python it takes several GB in
every DataLoader worker. Instead each source is converted once, streaming (item by item for a JSON list,
line by line for JSON Lines, both through Python's `json`), into an Arrow file of one JSON string per record, and opened
memory-mapped through HF `datasets`: resident memory stays flat in the number of records, and
workers share the pages. The conversion is cached by the source file's identity (resolved path,
size, modification time) and written under a lock to a temporary name first, so two processes
convert once and a killed conversion is never picked up.

HF `datasets` sources (local json / parquet / arrow / csv through `datasets.load_dataset`) are
already Arrow; a column mapping turns their rows into LLaVA records. An `Image` column is read
undecoded (bytes and path) and decoded only when the sample is encoded.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import datasets
from filelock import FileLock

from vlmablate.data.errors import DataError

RECORDS_VERSION = 2  # bump when the Arrow layout changes (2: invalid JSON Lines kept as INVALID_LINE rows)
INVALID_LINE = "_invalid_json_line"  # the key of the row that stands for a JSON Lines line that does not parse
_FEATURES = datasets.Features({"record": datasets.Value("string")})
_WRITER_BATCH = 10_000


class RecordStore:
    """A sequence of LLaVA records (`{"id", "image"?, "conversations"}`) over an Arrow table.

    `columns` maps the record's fields to the table's columns for HF sources; None means the table has
    one `record` column of JSON text (converted LLaVA JSON). A record decoded from a row always has
    `conversations` (as stored, possibly malformed: checking is the scanner's job) and, when the
    source stores image bytes rather than paths, `image_data` (bytes) beside `image`.
    """

    def __init__(self, table: datasets.Dataset, *, source: str, columns: dict | None = None, identity: str):
        self.table = table
        self.source = source  # what messages name: the file, or the HF data files
        self.columns = columns
        self.identity = identity  # changes whenever the records may have changed

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        return self._decode(self.table[int(i)])

    def iter_records(self, batch_size: int = 2048) -> Iterator[dict]:
        """Every record in order, read in Arrow batches (for the one pass that scans a source)."""
        for batch in self.table.iter(batch_size=batch_size):
            keys = list(batch)
            for values in zip(*(batch[k] for k in keys)):
                yield self._decode(dict(zip(keys, values)))

    def _decode(self, row: dict) -> dict:
        if self.columns is None:
            return json.loads(row["record"])
        record = {"id": row.get(self.columns.get("id") or "", None)}
        conversations = row.get(self.columns["conversations"])
        if isinstance(conversations, str):  # a column of JSON text
            try:
                conversations = json.loads(conversations)
            except json.JSONDecodeError:
                conversations = None
        record["conversations"] = conversations
        image_column = self.columns.get("image")
        image = row.get(image_column) if image_column else None
        if isinstance(image, dict):  # an undecoded datasets.Image: {"bytes", "path"}
            if image.get("bytes") is not None:
                record["image_data"] = image["bytes"]
                record["image"] = image.get("path") or f"<bytes in {image_column}>"
            else:
                record["image"] = image.get("path")
        elif image is not None:
            record["image"] = image
        return record

    @classmethod
    def from_records(cls, records: list[dict], *, source: str) -> RecordStore:
        """An in-memory store (generated data and tests)."""
        rows = [json.dumps(r) for r in records]
        table = datasets.Dataset.from_dict({"record": rows}, features=_FEATURES)
        digest = hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]
        return cls(table, source=source, identity=f"mem-{digest}")


def file_identity(path: Path) -> str:
    """Resolved path + size + modification time: what tells a changed file from the cached one."""
    st = path.stat()
    text = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{RECORDS_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def open_llava_json(path: str | os.PathLike, cache_dir: str | os.PathLike) -> RecordStore:
    """The records of a LLaVA JSON list or JSON Lines file, converted to Arrow once and memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    identity = file_identity(path)
    folder = Path(cache_dir) / "records"
    folder.mkdir(parents=True, exist_ok=True)
    arrow = folder / f"{path.stem}-{identity}.arrow"
    if not arrow.exists():
        with FileLock(str(arrow) + ".lock"):
            if not arrow.exists():  # another process converted it while we waited
                _convert(path, arrow)
    return RecordStore(datasets.Dataset.from_file(str(arrow)), source=str(path), identity=identity)


def _convert(path: Path, arrow: Path) -> None:
    tmp = arrow.with_name(arrow.name + f".tmp{os.getpid()}")
    try:
        with datasets.arrow_writer.ArrowWriter(features=_FEATURES, path=str(tmp), writer_batch_size=_WRITER_BATCH) \
                as writer:
            n = 0
            for text in _record_texts(path):
                writer.write({"record": text})
                n += 1
            writer.finalize()
        if n == 0:
            raise DataError(f"{path}: the data file holds no records")
        os.replace(tmp, arrow)
    finally:
        tmp.unlink(missing_ok=True)


def _record_texts(path: Path) -> Iterator[str]:
    """Each record as JSON text, streamed: JSON Lines by line, a JSON list item by item.

    Both are read by Python's own `json`, so what `json.load` reads is read: `NaN` and `Infinity` too (what
    `json.dump` writes for such floats), which the scan then judges as a bad record of its own
    (`non_finite_number`) instead of the whole file being rejected. A UTF-8 byte order mark is skipped. A
    JSON Lines line that does not parse becomes a row `{INVALID_LINE: {"line": n, "error": ...}}`, so that the
    scan applies `data.on_bad_sample` to it as to any bad record (reason `invalid_json`).
    """
    with path.open("rb") as f:
        bom = len(codecs.BOM_UTF8) if f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8 else 0
        f.seek(bom)
        if path.suffix == ".jsonl":
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield json.dumps(json.loads(line))
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    message = err.msg if isinstance(err, json.JSONDecodeError) else f"not UTF-8 ({err.reason})"
                    yield json.dumps({INVALID_LINE: {"line": lineno, "error": message}})
            return
        first = f.read(64).lstrip()[:1]
        if first != b"[":
            raise DataError(f"{path}: expected a JSON list of records (or a .jsonl file), "
                            f"but the file starts with {first.decode(errors='replace')!r}")
        f.seek(bom)
        for record in _json_list_items(f, path):
            yield json.dumps(record)


_SPACE = re.compile(r"[ \t\n\r]*")
_CHUNK = 1 << 20  # characters read at a time; a record longer than that is read in several


def _json_list_items(f, path: Path) -> Iterator:
    """The items of the JSON list in binary file `f`, one at a time, as `json.loads` would read them."""
    decoder, text = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof, n = "", 0, False, 0

    def more() -> bool:  # append the next chunk to what is left of the buffer; False at the end of the file
        nonlocal buf, pos, eof
        if eof:
            return False
        try:
            chunk = f.read(_CHUNK)
            eof = not chunk
            buf = buf[pos:] + text.decode(chunk, final=eof)
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 after record {n} ({err.reason})") from err
        pos = 0
        return True

    def next_char() -> str:  # the next character that is not whitespace ("" at the end of the file)
        nonlocal pos
        while True:
            pos = _SPACE.match(buf, pos).end()
            if pos < len(buf) or not more():
                return buf[pos:pos + 1]

    def fail(message: str):
        raise DataError(f"{path}: not valid JSON after record {n}: {message}")

    if next_char() != "[":
        fail("expected '['")
    pos += 1
    if next_char() == "]":
        pos += 1
    else:
        while True:
            next_char()
            while True:  # a record cut by the end of the buffer parses once the rest is read
                try:
                    item, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:
                        break
                except json.JSONDecodeError as err:
                    if eof:
                        fail(f"{err.msg} (line {err.lineno} of the record)")
                more()
            pos = end
            n += 1
            yield item
            sep = next_char()
            pos += 1
            if sep == "]":
                break
            if sep != ",":
                fail(f"expected ',' or ']', found {sep or 'the end of the file'!r}")
    if next_char():
        fail("extra data after the list")


def open_hf(*, builder: str, data_files, split: str, columns: dict, cache_dir: str | os.PathLike,
            name: str) -> RecordStore:
    """A local HF `datasets` source (`builder` json / parquet / arrow / csv, or a dataset folder)."""
    if "conversations" not in (columns or {}):
        raise DataError(f"data source {name!r}: an hf source needs columns.conversations (the column of turns)")
    try:
        table = datasets.load_dataset(builder, data_files=data_files, split=split,
                                      cache_dir=str(Path(cache_dir) / "hf"))
    except Exception as err:  # datasets raises many types for missing files, bad formats, bad splits
        raise DataError(f"data source {name!r}: datasets.load_dataset({builder!r}, data_files={data_files!r}, "
                        f"split={split!r}) failed: {err}") from err
    missing = sorted(c for c in columns.values() if c and c not in table.column_names)
    if missing:
        raise DataError(f"data source {name!r}: columns {missing} not in {data_files!r} "
                        f"(it has {table.column_names})")
    image_column = columns.get("image")
    if image_column and isinstance(table.features[image_column], datasets.Image):
        table = table.cast_column(image_column, datasets.Image(decode=False))  # decoded when encoded
    return RecordStore(table, source=f"{builder}:{data_files}", columns=dict(columns),
                       identity=f"hf-{table._fingerprint}")
