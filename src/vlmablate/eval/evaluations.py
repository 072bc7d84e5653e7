"""Which evaluation a set's numbers are, and where a run keeps each of its evaluations.

An evaluation of one set (`mmbench`, `mmbench_blank_image`, `textvqa`, `vqa_blank_image`) is decided by
its settings and its benchmark file. `identity` records them, and a name that says them, e.g.
`mmbench-generate-vlmevalkit_a67ace50-dev-MMBench_DEV_EN-1a2b3c4d-1024tok`; the set's metrics carry it as
`evaluation` (with `dir`, where its predictions are). A run reports one evaluation per set, at
`eval/<set>/` and `summary.eval.<set>`: the first one made. An evaluation that differs from the reported
one (`python -m vlmablate.eval run_dir=RUN` with other settings or another file) never replaces it: it is
kept beside it, at `eval/<name>/` and `summary.eval.<name>`. The same evaluation made again replaces
itself. Summaries written before evaluations were named still say enough (mode, extraction, split, file)
for `identity_of` to tell what they were; the fields they lack are not compared.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from vlmablate.config import EvalConfig

MMBENCH_SETS = ("mmbench", "mmbench_blank_image")
VQA_SETS = ("textvqa", "vqa_blank_image")
# What decides an evaluation's numbers; two evaluations are alike when none of these differ.
IDENTITY_FIELDS = ("task", "blank_image", "mode", "extraction", "split", "circular", "use_ocr", "max_questions",
                   "max_new_tokens", "file", "file_sha256")
DIGEST_CHARS = 16  # of the file's SHA-256 kept; the name shows 8


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:DIGEST_CHARS]


def identity(set_name: str, cfg: EvalConfig, file: str | Path) -> dict:
    """What decides the numbers of `set_name` under `cfg` on `file`, and the name that says it."""
    generate = set_name in VQA_SETS or cfg.mode == "generate"
    ident = {"set": set_name, "task": "mmbench" if set_name in MMBENCH_SETS else "textvqa",
             "blank_image": set_name.endswith("_blank_image"), "mode": "generate" if set_name in VQA_SETS else cfg.mode}
    if set_name in MMBENCH_SETS:
        ident.update(extraction=cfg.extraction if generate else None, split=cfg.split, circular=cfg.circular)
    else:
        ident.update(use_ocr=cfg.use_ocr)
    ident.update(max_questions=cfg.max_questions, max_new_tokens=cfg.max_new_tokens if generate else None,
                 file=Path(file).name, file_sha256=file_sha256(file))
    return {"name": evaluation_name(ident), **ident}


def evaluation_name(ident: dict) -> str:
    """`<set>-<mode>[-<extraction>][-<split>]-<file stem>[-<digest>][-circular_<c>][-no_ocr][-first<N>][-<T>tok]`:
    settings at their defaults are left out; a field the identity lacks is left out."""
    parts = [ident["set"], ident.get("mode"), ident.get("extraction"), ident.get("split")]
    if ident.get("file"):
        parts.append(re.sub(r"[^A-Za-z0-9_.]+", "_", Path(ident["file"]).stem))
    if ident.get("file_sha256"):
        parts.append(ident["file_sha256"][:8])
    if ident.get("circular") not in (None, "auto"):
        parts.append(f"circular_{ident['circular']}")
    if ident.get("use_ocr") is False:
        parts.append("no_ocr")
    if ident.get("max_questions") is not None:
        parts.append(f"first{ident['max_questions']}")
    if ident.get("max_new_tokens") is not None:
        parts.append(f"{ident['max_new_tokens']}tok")
    return "-".join(str(p) for p in parts if p)


def identity_of(set_name: str, metrics: dict) -> dict:
    """The identity a set's recorded metrics carry; for a summary written before evaluations were named,
    what its metrics still say (mode, extraction, split, file), the rest unknown."""
    if "evaluation" in metrics:
        return metrics["evaluation"]
    ident = {"set": set_name, "task": "mmbench" if set_name in MMBENCH_SETS else "textvqa",
             "blank_image": metrics.get("blank_image", set_name.endswith("_blank_image"))}
    if set_name in MMBENCH_SETS:
        ident.update(mode=metrics.get("mode", "generate"), extraction=metrics.get("extraction"),
                     split=metrics.get("split", "dev"))
    else:
        ident["mode"] = "generate"
    file = metrics.get("tsv") if set_name in MMBENCH_SETS else metrics.get("file")
    if file:
        ident["file"] = Path(file).name
    return {"name": evaluation_name(ident), **ident, "dir": f"eval/{set_name}"}


def differences(a: dict, b: dict) -> list[str]:
    """The identity fields two evaluations both record and disagree on."""
    return [key for key in IDENTITY_FIELDS if key in a and key in b and a[key] != b[key]]


def describe(a: dict, b: dict) -> str:
    """`mode likelihood vs generate, file x.tsv vs y.tsv`: how two evaluations differ."""
    return ", ".join(f"{key} {a[key]} vs {b[key]}" for key in differences(a, b))


def place(set_name: str, ident: dict, reported: dict) -> str:
    """Where an evaluation of `set_name` goes, given the run's reported evaluations (`summary["eval"]`): the set's
    own place when the run has none for it or has this very one; else beside it, under the evaluation's name.
    An unnamed earlier evaluation (an older summary) may differ in what it did not record, so it is never
    taken for this one."""
    earlier = reported.get(set_name)
    if earlier is None or ("evaluation" in earlier and not differences(earlier["evaluation"], ident)):
        return set_name
    return ident["name"]
