"""Turn a `data` config into one dataset: resolve each source to a LLaVA JSON file, then concatenate."""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import ConcatDataset

from vlmablate.config import DataConfig, SourceConfig, WorldConfig
from vlmablate.data.dataset import DataError, LlavaJsonDataset, load_llava_json
from vlmablate.data.synthetic import write_synthetic_llava
from vlmablate.world.build import ensure_world_data

log = logging.getLogger(__name__)


def resolve_source(source: SourceConfig, *, cache_dir: Path, seed: int, image_size: int,
                   world: WorldConfig | None = None, progress: bool = True) -> tuple[Path, Path]:
    """The (json file, image root) of a source; generated sources are written into the cache once."""
    if source.kind == "llava_json":
        if not source.path or not source.image_root:
            raise DataError(f"data source {source.name!r} needs `path` and `image_root`")
        path = Path(source.path)
        if not path.exists():
            raise DataError(f"data source {source.name!r}: {path} does not exist")
        return path, Path(source.image_root)
    if source.kind in ("tiny_world_caption", "tiny_world_instruct"):
        if world is None:
            raise DataError(f"data source {source.name!r} is a tiny-world source but no world config was given")
        files = ensure_world_data(world, progress=progress)
        key = "caption_json" if source.kind == "tiny_world_caption" else "instruct_json"
        return Path(files[key]), Path(files["image_root"])
    if source.kind in ("synthetic_caption", "synthetic_instruct"):
        folder = cache_dir / f"synthetic-s{seed}-n{source.num_records}-px{image_size}"
        files = write_synthetic_llava(folder, n_caption=source.num_records, n_instruct=source.num_records,
                                      seed=seed, image_size=image_size)
        key = "pretrain_json" if source.kind == "synthetic_caption" else "instruct_json"
        return Path(files[key]), Path(files["image_root"])
    raise DataError(f"data source {source.name!r}: unknown kind {source.kind!r} (llava_json, tiny_world_caption, "
                    "tiny_world_instruct, synthetic_caption, synthetic_instruct)")


def build_dataset(data: DataConfig, *, processor, template: str, max_length: int, image_aspect: str,
                  cache_dir: Path, image_size: int, world: WorldConfig | None = None,
                  progress: bool = True) -> ConcatDataset:
    parts = []
    for source in data.sources:
        path, image_root = resolve_source(source, cache_dir=cache_dir, seed=data.seed, image_size=image_size,
                                          world=world, progress=progress)
        records = load_llava_json(path)
        parts.append(LlavaJsonDataset(records, source_path=path, image_root=image_root, processor=processor,
                                      template=template, max_length=max_length, image_aspect=image_aspect))
        log.info("data source %s: %d records from %s", source.name, len(records), path)
    return ConcatDataset(parts)
