"""MMBench's test split has no answers: its score comes from the official server, from a submission file.

The file is what LLaVA's `scripts/convert_mmbench_for_submission.py` uploads: every row of the TSV,
in file order, with its columns except `hint`, `category`, `source`, `image`, `comment` and
`l2-category` (cells pandas reads as NaN left empty), and a `prediction` column right after the
last option column. The prediction is the model's reply, stripped (LLaVA's `text`): the server does
its own answer extraction. In likelihood mode it is the chosen letter. The table is written as
`submission.xlsx` (what the server takes), on a sheet named "Sheet1" as pandas' `to_excel` names it in
LLaVA's script, and as `submission.tsv` (readable and diffable). A worksheet cannot hold control
characters (openpyxl refuses them, so LLaVA's script stops on such a reply); they are dropped from the
table before either file is written, so the two files hold the same text.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

from vlmablate.eval.mmbench import column_name, is_missing, read_table

log = logging.getLogger(__name__)

DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")
SHEET_NAME = "Sheet1"  # pandas' to_excel default, which LLaVA's script keeps
# What a worksheet cannot store: C0 control characters other than tab, line feed and carriage return
# (openpyxl's ILLEGAL_CHARACTERS_RE, spelled out so that reading the table needs no openpyxl).
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def submission_table(tsv: str | Path, predictions: dict[int, str]) -> tuple[list[str], list[list]]:
    """(header, rows) of the submission: the file's rows with their prediction ("" for rows not predicted)."""
    header, rows = read_table(tsv)
    names = [column_name(raw) for raw in header]
    kept = [i for i, name in enumerate(names) if name not in DROPPED_COLUMNS]
    options = [i for i in kept if len(names[i]) == 1]
    after = kept.index(options[-1]) + 1 if options else len(kept)
    out_header = [header[i] for i in kept[:after]] + ["prediction"] + [header[i] for i in kept[after:]]
    index_at = names.index("index")
    out_rows = []
    for _, _, cells in rows:
        cells = cells + [""] * (len(header) - len(cells))
        index = int(cells[index_at].strip())
        # As LLaVA's pandas round trip leaves them: an empty cell where pandas reads NaN.
        values: list = [index if i == index_at else "" if is_missing(cells[i]) else cells[i] for i in kept]
        out_rows.append(values[:after] + [predictions.get(index, "")] + values[after:])
    return _storable(out_header), [_storable(row) for row in out_rows]


def _storable(row: list) -> list:
    """The row as a worksheet can hold it, for both files alike: control characters dropped."""
    return [CONTROL_CHARACTERS.sub("", v) if isinstance(v, str) else v for v in row]


def write_submission(tsv: str | Path, predictions: dict[int, str], out_dir: Path) -> dict:
    """Write `submission.xlsx` and `submission.tsv` into out_dir; say how many rows got a prediction."""
    header, rows = submission_table(tsv, predictions)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"xlsx": out_dir / "submission.xlsx", "tsv": out_dir / "submission.tsv"}
    _write_tsv(paths["tsv"], header, rows)
    _write_xlsx(paths["xlsx"], header, rows)
    at = header.index("prediction")
    predicted = sum(1 for row in rows if row[at] != "")
    missing = len(rows) - predicted
    if missing:
        # eval.max_questions, or eval.circular=off on a file with copies: the server counts these as wrong.
        log.warning("%s: %d of %d rows have no prediction", paths["xlsx"], missing, len(rows))
    return {"xlsx": str(paths["xlsx"]), "tsv": str(paths["tsv"]), "rows": len(rows), "predicted": predicted}


def _write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    tmp = path.with_suffix(".tsv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)


def _write_xlsx(path: Path, header: list[str], rows: list[list]) -> None:
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.title = SHEET_NAME
    sheet.append(header)
    for row in rows:
        sheet.append(row)
    tmp = path.with_suffix(".xlsx.tmp")
    book.save(tmp)
    tmp.replace(path)
