"""A LLaVA JSON of mix665k's size: peak memory and time to the first batch, against `json.load`.

Builds a 665k-record LLaVA JSON (synthetic conversations, 90% with one of a few shared dummy images,
10% text-only, 1-4 turn pairs), then runs each phase in a child process of its own so that each
peak RSS is that phase's alone:

  baseline   json.load of the whole file, as LLaVA's LazySupervisedDataset starts
  cold       vlmablate's first open: Arrow conversion, scan (bad records + lengths), mix, first batch
  warm       the same with the conversion and scan cached: what every later run pays
  warm 1/10  the warm path on a file of a tenth of the records, to show memory is flat in the record count

    python benchmarks/data_scale.py [--records 665000] [--batches 20] [--workers 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ("What is in the image?", "Describe the scene.", "What colour is the car?", "How many people are there?",
           "Where was this photo taken?", "What is the man holding?")
WORDS = "the a red blue car man woman dog street table window tree sky water building light small large".split()


def write_json(path: Path, n: int, images: int, seed: int = 0) -> None:
    """Stream n records into a JSON list (never all in memory)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        f.write("[\n")
        for i in range(n):
            pairs = rng.randint(1, 4)
            turns = []
            for k in range(pairs):
                question = rng.choice(PROMPTS)
                answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) + "."
                turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            record = {"id": f"{i:07d}", "conversations": turns}
            if rng.random() < 0.9:
                record["image"] = f"coco/train2017/{rng.randrange(images):012d}.jpg"
                turns[0]["value"] = "<image>\n" + turns[0]["value"]
            f.write(json.dumps(record) + (",\n" if i < n - 1 else "\n"))
        f.write("]\n")


def write_images(root: Path, images: int) -> None:
    from PIL import Image

    folder = root / "coco" / "train2017"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(images):
        Image.new("RGB", (48, 32), (k * 40 % 255, 90, 160)).save(folder / f"{k:012d}.jpg")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def phase_baseline(path: Path) -> dict:
    start = time.perf_counter()
    records = json.loads(path.read_text())
    return {"records": len(records), "seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak_mb())}


def phase_vlmablate(path: Path, root: Path, cache: Path, model: Path, batches: int, workers: int,
                    count: int | None) -> dict:
    import torch
    from transformers import AutoProcessor

    from vlmablate.config import DataConfig, SourceConfig
    from vlmablate.data.collator import LlavaCollator
    from vlmablate.data.sampler import RankBatchSampler
    from vlmablate.data.sources import build_dataset

    start = time.perf_counter()
    processor = AutoProcessor.from_pretrained(model)
    name = f"mix#{count}" if count else "mix"
    data = DataConfig(name="bench", sources=[SourceConfig(name=name, kind="llava_json", path=str(path),
                                                          image_root=str(root))])
    dataset = build_dataset(data, processor=processor, template="chat", max_length=2048, image_aspect="pad",
                            cache_dir=cache, image_size=32, image_tokens=16, progress=False)
    opened = time.perf_counter() - start
    sampler = RankBatchSampler(dataset.lengths, kind="modality_length", batch_size=16, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         collate_fn=LlavaCollator(processor.tokenizer.pad_token_id))
    it = iter(loader)
    first = next(it)
    to_first = time.perf_counter() - start
    seen = first["input_ids"].shape[0]
    for _ in range(batches - 1):
        seen += next(it)["input_ids"].shape[0]
    total = time.perf_counter() - start
    del it, loader  # shuts the workers down, so their peak is on record
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"records": len(dataset), "open_seconds": round(opened, 2), "first_batch_seconds": round(to_first, 2),
            f"{batches}_batches_seconds": round(total, 2), "samples": seen, "peak_rss_mb": round(peak_mb()),
            "worker_peak_rss_mb": round(workers_peak)}


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=665_000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    parser.add_argument("--phase", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:  # inside a child process
        kind, *rest = args.phase
        if kind == "baseline":
            result = phase_baseline(Path(rest[0]))
        else:
            path, root, cache, model, batches, workers, count = rest
            result = phase_vlmablate(Path(path), Path(root), Path(cache), Path(model), int(batches), int(workers),
                                     int(count) or None)
        print(json.dumps(result))
        return

    from vlmablate.model.tiny import TinySpec, save_tiny_checkpoint

    work = args.keep or Path(tempfile.mkdtemp(prefix="vlmablate-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    path, root, cache = work / "mix.json", work / "images", work / "cache"
    small = work / "mix_tenth.json"
    start = time.perf_counter()
    write_json(path, args.records, args.images)
    write_json(small, args.records // 10, args.images)
    write_images(root, args.images)
    model = save_tiny_checkpoint(work / "model", TinySpec())
    size_mb = path.stat().st_size / 2**20
    print(f"wrote {args.records:,} records ({size_mb:.0f} MB) in {time.perf_counter() - start:.0f} s")
    rest = [str(root), str(cache), str(model), str(args.batches), str(args.workers), "0"]
    rows = {"baseline (json.load)": child(["baseline", str(path)]),
            "cold (convert + scan + first batch)": child(["vlmablate", str(path), *rest]),
            "warm (cached)": child(["vlmablate", str(path), *rest])}
    child(["vlmablate", str(small), *rest])  # builds the small file's cache
    rows["warm, a file of 1/10 the records"] = child(["vlmablate", str(small), *rest])
    for name, row in rows.items():
        print(f"{name:<38} {json.dumps(row)}")
    base, warm = rows["baseline (json.load)"], rows["warm (cached)"]
    tenth = rows["warm, a file of 1/10 the records"]
    print(f"peak RSS warm / json.load: {warm['peak_rss_mb'] / base['peak_rss_mb']:.3f} "
          f"({warm['peak_rss_mb']:.0f} MB vs {base['peak_rss_mb']:.0f} MB)")
    print(f"peak RSS warm, all records / a tenth: {warm['peak_rss_mb'] / tenth['peak_rss_mb']:.3f}")
    print(f"time to first batch warm / json.load alone: {warm['first_batch_seconds'] / base['seconds']:.3f}")


if __name__ == "__main__":
    main()
