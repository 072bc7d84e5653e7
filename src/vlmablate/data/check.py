"""`python -m vlmablate.data.check data=... [model=...]`: validate a data config without training.

What a user runs before spending GPU hours. With the same config groups as training, it opens every
source, scans every record (image files verified too), encodes `data.preflight_records` records per
source spread over the whole file (corrupt pixels, exact lengths), and prints per source the records,
the bad ones by reason with an example each, what goes into the mix, the modality split and length
estimates, and the padding efficiency of random batches against the configured sampler's. It exits 1
when the data would stop a training run (any bad record under `data.on_bad_sample=error`, or more than
`data.max_bad_fraction` under `skip`) and writes `data_check.json` into the output folder.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from vlmablate.config import RunConfig, cache_root, register_configs, to_run_config

register_configs()
log = logging.getLogger(__name__)


def check_data(cfg: RunConfig, out_dir: Path | None = None) -> tuple[dict, bool]:
    """The report and whether the data would let a training run start and finish."""
    from transformers import AutoConfig, AutoProcessor

    from vlmablate.data.errors import DataError
    from vlmablate.data.sampler import RankBatchSampler, padding_efficiency
    from vlmablate.data.scan import CODES
    from vlmablate.data.sources import build_dataset
    from vlmablate.model.load import resolve_checkpoint
    from vlmablate.model.plan import resolve_plan
    from vlmablate.train.runner import image_aspect_of, image_size_of, resolve_model

    plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage)
    checkpoint = resolve_checkpoint(resolve_model(cfg), projector_type=plan.projector_type)
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=cfg.model.trust_remote_code)
    image_tokens = int(getattr(AutoConfig.from_pretrained(checkpoint), "image_seq_length", 0) or 0)
    # Everything is counted: the policy is applied to the counts below, not at the first bad record.
    data = replace(cfg.data, on_bad_sample="skip", verify_images=True, max_bad_fraction=1.0)
    dataset = build_dataset(data, processor=processor, template=cfg.stage.template, max_length=cfg.model.max_length,
                            image_aspect=image_aspect_of(cfg), cache_dir=cache_root(cfg.data.cache_dir),
                            image_size=image_size_of(processor), image_tokens=image_tokens, world=cfg.world,
                            progress=cfg.train.progress)
    report = dataset.report()
    for name, part, scan in zip(dataset.names, dataset.parts, dataset.scans):
        entry = report["sources"][name]
        entry["examples"] = {}
        for code in np.unique(scan.reasons[scan.reasons > 0]):
            i = int(np.flatnonzero(scan.reasons == code)[0])
            entry["examples"][CODES[code]] = part.record_ref(i)
        encode_fail: Counter = Counter()
        good = scan.good
        picked = good[np.linspace(0, len(good) - 1, min(len(good), cfg.data.preflight_records)).astype(int)] \
            if len(good) else good
        for i in picked:
            try:
                part[int(i)]
            except DataError as err:
                encode_fail[err.reason] += 1
                entry["examples"].setdefault(err.reason, part.record_ref(int(i)))
        entry["encoded"] = len(picked)
        entry["bad_when_encoded"] = dict(sorted(encode_fail.items()))
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
    bad_encoded = sum(sum(s["bad_when_encoded"].values()) for s in report["sources"].values())
    if cfg.data.on_bad_sample == "error":
        ok = report["bad"] == 0 and bad_encoded == 0
    else:
        ok = report["bad_fraction"] <= cfg.data.max_bad_fraction
    report["policy"] = {"on_bad_sample": cfg.data.on_bad_sample, "max_bad_fraction": cfg.data.max_bad_fraction,
                        "would_train": ok}
    if out_dir is not None:
        (out_dir / "data_check.json").write_text(json.dumps(report, indent=2))
    return report, ok


def format_report(report: dict) -> str:
    lines = []
    for name, s in report["sources"].items():
        lines.append(f"{name}: {s['file']}")
        lines.append(f"  records {s['records']:,}  usable {s['usable']:,}  in the mix {s['in_mix']:,}  "
                     f"encoded as a check {s['encoded']:,}")
        for reason, n in {**s["bad"], **{f"{k} (when encoded)": v for k, v in s["bad_when_encoded"].items()}}.items():
            example = s["examples"].get(reason.removesuffix(" (when encoded)"), "")
            lines.append(f"  bad: {reason:<32} {n:>8,}   e.g. {example}")
    lines.append(f"mix: {report['in_mix']:,} samples ({report['image_records']:,} with an image, "
                 f"{report['text_records']:,} text-only), mean length {report['mean_length']} tokens")
    lines.append(f"bad records: {report['bad']:,} of {report['records']:,} ({report['bad_fraction']:.2%})")
    effs = ", ".join(f"{k} {v:.3f}" for k, v in report["padding_efficiency"].items())
    lines.append(f"padding efficiency at batch {report['batch_size']}: {effs}")
    policy = report["policy"]
    verdict = "OK: a run would start" if policy["would_train"] else "NOT OK: a run would stop"
    lines.append(f"{verdict} (data.on_bad_sample={policy['on_bad_sample']}, "
                 f"data.max_bad_fraction={policy['max_bad_fraction']})")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    report, ok = check_data(to_run_config(cfg), out_dir)
    print(format_report(report))
    print(f"report: {out_dir / 'data_check.json'}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
