"""Turn a `data` config into one training set: open each source lazily, scan it, take its share, mix.

Each source becomes a `LlavaJsonDataset` over a memory-mapped `RecordStore`, is scanned once (bad
records and length estimates, cached), and contributes the records its `count`, `#N` suffix or
`weight` asks for, drawn deterministically from `data.seed`. `MixedDataset` concatenates the shares,
carries their modality lengths for the sampler, and applies `data.on_bad_sample` to what only
encoding can find (a corrupt image, the exact length after image-token expansion); `verdict.judge`
says whether the bad records stop the run.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from vlmablate.config import DataConfig, SourceConfig, WorldConfig, split_subset
from vlmablate.data.dataset import LlavaJsonDataset
from vlmablate.data.errors import REASONS, DataError
from vlmablate.data.records import RecordStore, open_hf, open_llava_json
from vlmablate.data.scan import CODES, ScanResult, scan_source
from vlmablate.data.synthetic import write_synthetic_llava
from vlmablate.data.templates import image_token_of
from vlmablate.data.verdict import BadPolicy, breaks_substitution, judge
from vlmablate.world.build import ensure_world_data

log = logging.getLogger(__name__)


def resolve_source(source: SourceConfig, data: DataConfig, *, cache_dir: Path, image_size: int,
                   world: WorldConfig | None = None, progress: bool = True) -> tuple[RecordStore, Path | None]:
    """The records and image root of one source; generated sources are written into the cache once."""
    name = source.name
    if source.kind == "hf":
        root = source.image_root
        store = open_hf(builder=source.builder, data_files=source.data_files, split=source.split,
                        columns=source.columns, cache_dir=cache_dir, name=name)
        return store, Path(root) if root else None
    if source.kind == "llava_json":
        path = source.path or data.path
        root = source.image_root if source.path else (source.image_root or data.image_root)
        if not path:
            raise DataError(f"data source {name!r} needs a file: data.path=FILE (or sources.N.path)")
        return open_llava_json(path, cache_dir), Path(root) if root else None
    if source.kind in ("tiny_world_caption", "tiny_world_instruct"):
        if world is None:
            raise DataError(f"data source {name!r} is a tiny-world source but no world config was given")
        files = ensure_world_data(world, progress=progress)
        key = "caption_json" if source.kind == "tiny_world_caption" else "instruct_json"
        return open_llava_json(files[key], cache_dir), Path(files["image_root"])
    if source.kind in ("synthetic_caption", "synthetic_instruct"):
        folder = cache_dir / f"synthetic-s{data.seed}-n{source.num_records}-px{image_size}"
        files = write_synthetic_llava(folder, n_caption=source.num_records, n_instruct=source.num_records,
                                      seed=data.seed, image_size=image_size)
        key = "pretrain_json" if source.kind == "synthetic_caption" else "instruct_json"
        return open_llava_json(files[key], cache_dir), Path(files["image_root"])
    raise DataError(f"data source {name!r}: unknown kind {source.kind!r}")


def share(good: np.ndarray, source: SourceConfig, seed: int, position: int) -> np.ndarray:
    """The record indices a source contributes: all; `count`/#N drawn from the seed; or round(weight x size)."""
    _, suffix = split_subset(source.name)
    count = suffix if suffix is not None else source.count
    if count is None and source.weight is not None:
        count = max(1, round(source.weight * len(good)))
    if count is None:
        return good
    if len(good) == 0:
        raise DataError(f"data source {source.name!r}: no usable records to draw {count} from")
    rng = np.random.default_rng([seed, position])
    repeats, rest = divmod(count, len(good))
    picked = np.concatenate([np.tile(good, repeats), rng.choice(good, size=rest, replace=False)])
    return np.sort(picked)


class MixedDataset(Dataset):
    """The mix: sample k is record `indices[p][k - offset[p]]` of part p."""

    def __init__(self, parts: list[LlavaJsonDataset], indices: list[np.ndarray], scans: list[ScanResult], *,
                 names: list[str], policy: BadPolicy | None = None):
        self.parts, self.scans, self.names = parts, scans, names
        self.policy = policy or BadPolicy()
        self._set_indices(indices)

    def _set_indices(self, indices: list[np.ndarray]) -> None:
        """Each part's share, and what follows from it: where each part starts, every sample's length."""
        self.indices = indices
        self.offsets = np.cumsum([0] + [len(ix) for ix in indices]).tolist()
        self.lengths = np.concatenate([scan.lengths[ix] for scan, ix in zip(self.scans, indices)]).tolist() \
            if indices else []

    @property
    def source_views(self) -> list["SourceView"]:
        """Each source's share of the mix as a dataset of its own (what the preflight checks)."""
        return [SourceView(self, p) for p in range(len(self.parts))]

    def __len__(self) -> int:
        return self.offsets[-1]

    def keep_images_only(self) -> int:
        """Leave the text-only samples out of the mix; return how many there were."""
        before = len(self)
        self._set_indices([ix[scan.lengths[ix] > 0] for scan, ix in zip(self.scans, self.indices)])
        return before - len(self)

    def locate(self, k: int) -> tuple[int, int]:
        """(part, record index in that part's source) of sample k."""
        p = bisect_right(self.offsets, k) - 1
        return p, int(self.indices[p][k - self.offsets[p]])

    def __getitem__(self, k: int) -> dict:
        """Sample `k` of the mix. Its `sample_index` (what `train.record_data_order` records) is the position of
        the record actually encoded: k itself, or under `skip` the substitute's position."""
        p, record = self.locate(k)
        part = self.parts[p]
        try:
            return {**part[record], "sample_index": k}
        except DataError as err:
            if self.policy.on_bad_sample == "error":
                raise
            failed = [(part.record_ref(record), err.reason)]
        # skip: serve the next sample of the same part that encodes, and say which records were skipped
        # (by reference, so that a record met again, here or in another epoch, is counted once)
        picks = self.indices[p]
        start = k - self.offsets[p]
        for step in range(1, min(self.policy.max_bad_in_a_row + 1, len(picks))):
            position = (start + step) % len(picks)
            candidate = int(picks[position])
            try:
                sample = part[candidate]
            except DataError as err:
                failed.append((part.record_ref(candidate), err.reason))
                continue
            return {**sample, "bad_samples": failed, "sample_index": self.offsets[p] + position}
        assert breaks_substitution(len(failed), len(picks), self.policy.max_bad_in_a_row)
        reasons = sorted({reason for _, reason in failed})
        raise DataError(f"{part.source_path}: {len(failed)} samples in a row failed to encode ({', '.join(reasons)}) "
                        f"starting at record {record}, more than data.max_bad_in_a_row="
                        f"{self.policy.max_bad_in_a_row} (or every sample of the source): the source looks broken")

    def report(self) -> dict:
        """Per source: records, bad records by reason, records taken into the mix."""
        sources = {}
        for name, part, scan, ix in zip(self.names, self.parts, self.scans, self.indices):
            sources[name] = {"file": str(part.source_path), "records": len(part), "bad": scan.bad_counts(),
                             "usable": int((scan.reasons == 0).sum()), "in_mix": len(ix)}
        records = sum(len(p) for p in self.parts)
        by_reason: dict[str, int] = {}
        for s in sources.values():
            for reason, n in s["bad"].items():
                by_reason[reason] = by_reason.get(reason, 0) + n
        bad = sum(by_reason.values())
        return {"sources": sources, "records": records, "in_mix": len(self), "bad": bad,
                "bad_fraction": round(bad / records, 6) if records else 0.0,
                "bad_by_reason": dict(sorted(by_reason.items()))}


class SourceView(Dataset):
    """Source p's samples of a mix, in mix order, under the mix's bad-sample policy."""

    def __init__(self, mix: MixedDataset, p: int):
        self.mix, self.p = mix, p
        self.source_path = mix.parts[p].source_path

    def __len__(self) -> int:
        return len(self.mix.indices[self.p])

    def __getitem__(self, j: int) -> dict:
        return self.mix[self.mix.offsets[self.p] + j]

    def record_ref(self, j: int) -> str:
        return self.mix.parts[self.p].record_ref(int(self.mix.indices[self.p][j]))


def build_dataset(data: DataConfig, *, processor, template: str, max_length: int, image_aspect: str,
                  cache_dir: Path, image_size: int, image_tokens: int = 0, world: WorldConfig | None = None,
                  progress: bool = True) -> MixedDataset:
    parts, indices, scans, names = [], [], [], []
    for position, source in enumerate(data.sources):
        store, image_root = resolve_source(source, data, cache_dir=cache_dir, image_size=image_size, world=world,
                                           progress=progress)
        part = LlavaJsonDataset(store, source_path=store.source, image_root=image_root, processor=processor,
                                template=template, max_length=max_length, image_aspect=image_aspect)
        scan = scan_source(store, image_root=image_root, tokenizer=processor.tokenizer, template=template,
                           max_length=max_length, image_tokens=image_tokens, cache_dir=cache_dir,
                           verify_images=data.verify_images, image_token=image_token_of(processor),
                           progress=progress)
        _apply_policy(data, source, part, scan)
        parts.append(part)
        scans.append(scan)
        names.append(source.name)
        indices.append(share(scan.good, source, data.seed, position))
        log.info("data source %s: %d records from %s, %d bad %s, %d in the mix", source.name, len(store),
                 store.source, len(store) - len(scan.good), scan.bad_counts(), len(indices[-1]))
    policy = BadPolicy.of(data)
    mixed = MixedDataset(parts, indices, scans, names=names, policy=policy)
    report = mixed.report()
    judge(policy, records=report["records"], scanned=report["bad_by_reason"]).raise_if_stops()
    if len(mixed) == 0:
        raise DataError(f"data={data.name}: no usable records in any source")
    return mixed


def _apply_policy(data: DataConfig, source: SourceConfig, part: LlavaJsonDataset, scan: ScanResult) -> None:
    first = scan.first_bad()
    if data.on_bad_sample == "error" and first is not None:
        reason = CODES[scan.reasons[first]]
        detail = _reproduce(part, first) or REASONS[reason]
        raise DataError(f"{part.record_ref(first)}: bad record ({reason}){': ' + detail if detail else ''}. "
                        f"{len(part) - len(scan.good)} bad records in this source ({scan.bad_counts()}); set "
                        "data.on_bad_sample=skip to leave them out, or run `python -m vlmablate.data.check` "
                        "for the full list", reason)


def _reproduce(part: LlavaJsonDataset, i: int) -> str:
    """The message the record's own check gives (the scan keeps only the reason code)."""
    from vlmablate.data.scan import check_record
    from vlmablate.data.templates import TemplateError

    try:
        check_record(part.records[i], part.image_root, part.record_ref(i), verify_image=True)
    except (DataError, TemplateError) as err:
        return str(err).removeprefix(part.record_ref(i) + ": ")
    return ""
