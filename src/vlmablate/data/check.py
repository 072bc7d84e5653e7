"""`python -m vlmablate.data.check data=... [model=...]`: the run's verdict on its data, without training.

What a user runs before spending GPU hours. With the same config groups as training it builds the data as
the run builds it (the same sources, scan and mix), runs the run's own preflight on it (the first
`data.preflight_records` samples of each source), and then decodes every image of the mix, as training
will. The bad records found (by the scan, and when encoded or decoded, each record once) are judged by the
rule the run applies (`verdict.judge`: the same counts, the same `data.on_bad_sample`, `max_bad_fraction`
and `max_bad_in_a_row`). It prints per source the records, the bad ones by reason with an example each,
what goes into the mix, the modality split and length estimates, the padding efficiency of random batches
against the configured sampler's, and the verdict; it exits 1 when the data would stop the run, and writes
`data_check.json` into the output folder. "OK" means the run will not stop for its data, up to what only
encoding finds beyond the preflight's records and the images (LLaVA-NeXT's exact tile count, a processor
failure), which the run meets under the same policy.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from vlmablate.config import RunConfig, cache_root, register_configs, to_run_config

register_configs()
log = logging.getLogger(__name__)


def check_data(cfg: RunConfig, out_dir: Path | None = None) -> tuple[dict, bool]:
    """The report and whether the data would let a training run start and finish."""
    from transformers import AutoConfig, AutoProcessor

    from vlmablate.data.sources import build_dataset
    from vlmablate.data.verdict import BadPolicy
    from vlmablate.model.load import resolve_checkpoint
    from vlmablate.model.plan import resolve_plan
    from vlmablate.train.runner import image_aspect_of, image_size_of, resolve_model

    plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage)
    checkpoint = resolve_checkpoint(resolve_model(cfg), projector_type=plan.projector_type)
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=cfg.model.trust_remote_code)
    image_tokens = int(getattr(AutoConfig.from_pretrained(checkpoint), "image_seq_length", 0) or 0)
    policy = BadPolicy.of(cfg.data)
    # Built as the run builds it, but counting everything: the policy is applied to the counts at the end.
    counting = replace(cfg.data, on_bad_sample="skip", max_bad_fraction=1.0, max_bad_in_a_row=sys.maxsize)
    dataset = build_dataset(counting, processor=processor, template=cfg.stage.template,
                            max_length=cfg.model.max_length, image_aspect=image_aspect_of(cfg),
                            cache_dir=cache_root(cfg.data.cache_dir), image_size=image_size_of(processor),
                            image_tokens=image_tokens, world=cfg.world, progress=cfg.train.progress)
    report = dataset.report()
    found, runs, stop = _encode_checks(dataset, report, cfg.data.preflight_records, cfg.train.progress)
    _add_lengths(report, dataset, cfg)
    report["verdict"], report["policy"] = _verdict(dataset, report, found, runs, stop, policy)
    if out_dir is not None:
        (out_dir / "data_check.json").write_text(json.dumps(report, indent=2))
    return report, report["policy"]["would_train"]


def _encode_checks(dataset, report: dict, preflight_records: int, progress: bool):
    """The run's preflight on each source, then every image of the mix decoded. Returns the bad records found
    (reference -> reason, each once), each source's longest stretch of samples that fail (with its size), and
    the preflight's own stop (most samples fully masked), if any."""
    from vlmablate.data.dataset import preflight
    from vlmablate.data.errors import DataError
    from vlmablate.data.scan import CODES
    from vlmablate.data.verdict import longest_bad_run

    found: dict[str, str] = {}
    runs: dict[str, tuple[int, int]] = {}
    stop, checked = None, []
    for name, part, scan, picks, view in zip(dataset.names, dataset.parts, dataset.scans, dataset.indices,
                                             dataset.source_views):
        entry = report["sources"][name]
        entry["examples"] = {CODES[code]: part.record_ref(int(np.flatnonzero(scan.reasons == code)[0]))
                             for code in np.unique(scan.reasons[scan.reasons > 0])}
        mine: dict[str, str] = {}
        try:
            checked.append(preflight(view, preflight_records, bad_records=mine))
            entry["encoded"] = checked[-1]["checked"]
        except DataError as err:  # most of its samples fully masked: the run's preflight stops there too
            stop, entry["encoded"] = stop or str(err), 0
        failed, bad_index = _decode_images(part, scan, picks, mine, progress)
        found.update(failed)
        runs[name] = (longest_bad_run(np.isin(picks, list(bad_index))) if len(picks) else 0, len(picks))
        entry["images_decoded"] = int((scan.lengths[np.unique(picks)] > 0).sum()) if len(picks) else 0
        entry["bad_when_encoded"] = dict(sorted(_count(failed).items()))
        for ref, reason in failed.items():
            entry["examples"].setdefault(reason, ref)
        entry["longest_bad_run"] = runs[name][0]
    report["preflight"] = _merge(checked)
    return found, runs, stop


def _merge(parts: list[dict]) -> dict:
    """The sources' preflight results as one, as `preflight` reports a mix."""
    bad: dict[str, int] = {}
    for part in parts:
        for reason, n in part["bad"].items():
            bad[reason] = bad.get(reason, 0) + n
    return {"checked": sum(p["checked"] for p in parts), "fully_masked": sum(p["fully_masked"] for p in parts),
            "examples": [ref for p in parts for ref in p["examples"]][:5], "bad": dict(sorted(bad.items()))}


def _decode_images(part, scan, picks, preflight_bad: dict[str, str], progress: bool) -> tuple[dict, set]:
    """The preflight's bad records plus every image record of `picks` whose image cannot be decoded (reference ->
    reason), and the indices of all of them, from one pass over the source."""
    from vlmablate.data.errors import DataError
    from vlmablate.data.scan import open_image

    failed = dict(preflight_bad)
    wanted = {int(i) for i in picks}
    bad_index = set()
    bar = tqdm(total=len(wanted), desc=f"decoding {part.source_path.name}", disable=not progress, unit="rec")
    for i, record in enumerate(part.records.iter_records()):
        if i not in wanted:
            continue
        ref = part.record_ref(i, record)
        if ref not in failed and scan.lengths[i] > 0:
            try:
                open_image(record, part.image_root, ref)
            except DataError as err:
                failed[ref] = err.reason
        if ref in failed:
            bad_index.add(i)
        bar.update()
    bar.close()
    return failed, bad_index


def _count(failed: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in failed.values():
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def _add_lengths(report: dict, dataset, cfg: RunConfig) -> None:
    """The modality split, the mean length and the padding efficiency of random batches against the sampler's."""
    from vlmablate.data.sampler import RankBatchSampler, padding_efficiency

    lengths = dataset.lengths
    batch = cfg.train.per_device_train_batch_size
    report["image_records"] = sum(n > 0 for n in lengths)
    report["text_records"] = sum(n < 0 for n in lengths)
    report["mean_length"] = round(float(np.mean(np.abs(lengths))), 1) if lengths else 0.0
    report["padding_efficiency"] = {
        kind: round(padding_efficiency(list(RankBatchSampler(lengths, kind=kind, batch_size=batch,
                                                             seed=cfg.data.seed)), lengths), 4)
        for kind in dict.fromkeys(("random", cfg.stage.sampler))
    }
    report["batch_size"] = batch


def _verdict(dataset, report: dict, found: dict[str, str], runs: dict, stop: str | None, policy) -> tuple[dict, dict]:
    """The run's rule on what was found; where the run would stop under `error`: its first bad record."""
    from vlmablate.data.verdict import judge

    verdict = judge(policy, records=report["records"], scanned=report["bad_by_reason"], encoded=_count(found),
                    in_a_row=runs, examples=sorted(found)[:3]).to_dict()
    if stop is not None and not verdict["stops"]:
        verdict.update(stops=True, why=stop)
    report["bad"], report["bad_fraction"] = verdict["bad"], verdict["bad_fraction"]
    report["bad_found_by_scan"], report["bad_found_when_encoded"] = \
        verdict["found_by_scan"], verdict["found_when_encoded"]
    first = next((part.record_ref(scan.first_bad()) for part, scan in zip(dataset.parts, dataset.scans)
                  if scan.first_bad() is not None), next(iter(found), None))
    stops_at = first if policy.on_bad_sample == "error" and verdict["stops"] else None
    return verdict, {"on_bad_sample": policy.on_bad_sample, "max_bad_fraction": policy.max_bad_fraction,
                     "max_bad_in_a_row": policy.max_bad_in_a_row, "would_train": not verdict["stops"],
                     "stops_at": stops_at}


def format_report(report: dict) -> str:
    lines = []
    for name, s in report["sources"].items():
        lines.append(f"{name}: {s['file']}")
        lines.append(f"  records {s['records']:,}  usable {s['usable']:,}  in the mix {s['in_mix']:,}  "
                     f"encoded as the run's preflight {s['encoded']:,}  images decoded {s['images_decoded']:,}")
        for reason, n in {**s["bad"], **{f"{k} (when encoded)": v for k, v in s["bad_when_encoded"].items()}}.items():
            example = s["examples"].get(reason.removesuffix(" (when encoded)"), "")
            lines.append(f"  bad: {reason:<32} {n:>8,}   e.g. {example}")
    lines.append(f"mix: {report['in_mix']:,} samples ({report['image_records']:,} with an image, "
                 f"{report['text_records']:,} text-only), mean length {report['mean_length']} tokens")
    lines.append(f"bad records: {report['bad']:,} of {report['records']:,} ({report['bad_fraction']:.2%}): "
                 f"{report['bad_found_by_scan']:,} found by the scan, {report['bad_found_when_encoded']:,} when "
                 f"encoded or decoded")
    runs = report["verdict"]["longest_bad_run"]
    lines.append(f"longest run of samples in a row that fail to encode: {max(runs.values(), default=0):,}")
    effs = ", ".join(f"{k} {v:.3f}" for k, v in report["padding_efficiency"].items())
    lines.append(f"padding efficiency at batch {report['batch_size']}: {effs}")
    policy = report["policy"]
    settings = (f"data.on_bad_sample={policy['on_bad_sample']}, data.max_bad_fraction={policy['max_bad_fraction']}, "
                f"data.max_bad_in_a_row={policy['max_bad_in_a_row']}")
    if policy["would_train"]:
        lines.append(f"OK: the run will not stop for its data ({settings})")
    else:
        at = f" at {policy['stops_at']}" if policy["stops_at"] else ""
        lines.append(f"NOT OK: a run would stop{at} ({settings}): {report['verdict']['why']}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from vlmablate.train.distributed import name_deepspeed_accelerator

    name_deepspeed_accelerator(cfg.train.get("deepspeed"))

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    report, ok = check_data(to_run_config(cfg), out_dir)
    print(format_report(report))
    print(f"report: {out_dir / 'data_check.json'}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
