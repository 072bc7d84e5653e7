"""The tiny world's foundation models: a vision tower and a language model, pretrained once and shipped.

LLaVA starts from CLIP and Vicuna, each trained long before the recipe and with far more compute than
it; LLaVA's experiments vary the data (captions, instructions, benchmarks) over the same two models.
The tiny world does the same. `build_components` pretrains, from seeds of their own (never
`world.seed`):

- the vision tower (`pretrain.pretrain_vision`): a CLIPVisionModel taught each cell's colour and shape;
- the language model (`reader.train_reader`): a LlamaForCausalLM that reads board transcripts (16 cell
  vectors where `<image>` stands, as the projector will hand it 16 patches), answers questions about
  them, writes captions, and knows the text-only dialogues and the chat template;

and writes them as plain HF folders with safetensors weights. `shipped_config()` is the recipe whose
weights ship inside the package (`vlmablate/world/weights/`), with the config, its hash, the probes and
the time taken in `meta.json`; `python -m vlmablate.world.components` rebuilds them, and `--vision-only`
rebuilds the tower alone, keeping the LM (which never sees a pixel) after a change to how scenes are drawn.
`world.components=build` builds the recipe (with the `world.vision` / `world.lm` overrides) into the
cache instead, once per config hash.

Layout of a components folder:
  vision/            CLIPVisionModel + its image processor
  llm/               LlamaForCausalLM + the world's tokenizer (Vicuna v1 chat template, `<image>`)
  board.safetensors  the transcripts' learned place and empty vectors (what a cell looks like to the LM)
  meta.json          versions, config, its hash, probes, seconds
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from vlmablate.config import ConfigError, WorldConfig, cache_root
from vlmablate.train.distributed import name_deepspeed_accelerator
from vlmablate.world import data as world_data
from vlmablate.world import language, pretrain
from vlmablate.world.board import BoardEmbedding
from vlmablate.world.reader import ReaderConfig, probe_set, train_reader, world_tokenizer
from vlmablate.world.reading import Encoder, ReadingConfig, reading_probe

log = logging.getLogger(__name__)

COMPONENTS_VERSION = 2  # bump when how the components are built changes
SHIPPED_DIR = Path(__file__).parent / "weights"
PROBE_SEED = 1  # the final reading probe's boards: a split no training document nor training-time probe uses


@dataclass(frozen=True)
class ComponentsConfig:
    """Everything the two components are built from."""

    vocab_size: int = 768
    vision: pretrain.VisionPretrainConfig = field(default_factory=pretrain.VisionPretrainConfig)
    lm: ReaderConfig = field(default_factory=ReaderConfig)
    probe_per_kind: int = 200  # held-out questions per kind in the final reading probe


def shipped_config() -> ComponentsConfig:
    """The recipe of the shipped weights (docs/tiny_world_reading.md has the runs behind each choice)."""
    lm = ReaderConfig()
    return ComponentsConfig(
        # The tower also names each patch's cell, so an object's patch keeps its place (a projector can then
        # hand it on); 6 epochs keep colour and shape recognition where 4 epochs without it had them.
        vision=pretrain.VisionPretrainConfig(place_loss=1.0, epochs=6),
        lm=ReaderConfig(
            kv_heads=6, steps=2400, eval_every=200, attend_loss=1.0, readout_loss=1.0, readout_tokens="all",
            # MMBench's layout: each option's words learn their letter and look at what the question asks
            # about, the answer looks at the option that holds, and the option tokens read out as letters.
            attend=lm.attend + ("1.1:option>letter", "2.1:option>key", "3.1:answer>option"), letter_readout=1.0,
            # Counting is the LM-side gap: no reading document asks "how many" (captions still say "three
            # shapes: ..."), so only a run that trains the LM learns to answer it (docs/tiny_world.md).
            reading=ReadingConfig(kinds=tuple(k for k in language.CATEGORIES if k != "counting"),
                                  formats=("short", "choice"), curriculum_steps=700)))


def config_hash(cfg: ComponentsConfig) -> str:
    """Stable over runs and machines: the config, this module's version and the scene generator's."""
    settings = {"versions": [COMPONENTS_VERSION, world_data.GENERATOR_VERSION], "config": dataclasses.asdict(cfg)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _replace(obj, overrides: dict, where: str):
    """`obj` with `overrides` (nested dicts for nested dataclasses), every name checked."""
    known = {f.name: f for f in dataclasses.fields(obj)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"{where} has no field(s) {unknown}; known: {sorted(known)}")
    changes = {}
    for name, value in overrides.items():
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            changes[name] = _replace(current, dict(value), f"{where}.{name}")
        elif isinstance(current, tuple):
            value = (value,) if isinstance(value, str) else value
            changes[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            changes[name] = value
    try:
        return dataclasses.replace(obj, **changes)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def components_config(world: WorldConfig) -> ComponentsConfig:
    """The shipped recipe with `world.vision` and `world.lm` applied (`world.lm.vocab_size` sizes the tokenizer)."""
    lm, vision = _plain(world.lm), _plain(world.vision)
    overrides = {"vision": {"image_size": world.image_size, **vision}, "lm": lm}
    if "vocab_size" in lm:
        overrides["vocab_size"] = lm.pop("vocab_size")
    return _replace(shipped_config(), overrides, "world")


def _plain(mapping) -> dict:
    """A config mapping as plain Python (OmegaConf nodes become dicts and lists)."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(mapping) if isinstance(mapping, DictConfig) else dict(mapping)


def ensure_components(world: WorldConfig, *, progress: bool = True) -> Path:
    """The folder of the components `world` runs on: the shipped ones, or a cached build of its recipe."""
    if world.components == "shipped":
        if world.vision or world.lm:
            raise ConfigError("world.vision / world.lm change how the components are built; they need "
                              "world.components=build (the shipped weights are built from the fixed recipe)")
        return shipped_folder()
    if world.components != "build":
        raise ConfigError(f"world.components is 'shipped' or 'build', not {world.components!r}")
    cfg = components_config(world)
    folder = cache_root(world.cache_dir) / "components" / config_hash(cfg)
    if (folder / "meta.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / "meta.json").exists():  # another process built it while we waited
            return folder
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            meta = build_components(cfg, tmp, progress=progress)
            (tmp / "meta.json").write_text(json.dumps({**meta, "built_by_pid": os.getpid()}, indent=2) + "\n")
            os.replace(tmp, folder)
        finally:  # a failed or interrupted build leaves nothing that looks like components
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("tiny world components built in %s", folder)
    return folder


def components_hash(world: WorldConfig) -> str:
    """The config hash of the components `world` runs on (what names a stage-1 projector aligned to them)."""
    if world.components == "shipped":
        return json.loads((shipped_folder() / "meta.json").read_text())["hash"]
    return config_hash(components_config(world))


def shipped_folder() -> Path:
    """The package's own components, checked against the recipe they claim to come from."""
    meta_path = SHIPPED_DIR / "meta.json"
    if not meta_path.exists():
        raise ConfigError(f"the shipped components are missing ({meta_path}); build them with "
                          "`python -m vlmablate.world.components`, or run with world.components=build")
    meta = json.loads(meta_path.read_text())
    if meta["hash"] != config_hash(shipped_config()):
        raise ConfigError(f"the shipped components ({meta_path}, hash {meta['hash']}) were built from another recipe "
                          f"than shipped_config() (hash {config_hash(shipped_config())}); rebuild them with "
                          "`python -m vlmablate.world.components`")
    return SHIPPED_DIR


def build_components(cfg: ComponentsConfig, folder: str | os.PathLike, *, progress: bool = True,
                     echo=None) -> dict:
    """Pretrain both components from `cfg` into `folder`; return (and write) their metadata."""
    folder = Path(folder)
    echo = echo or (lambda row: log.info("%s", row))
    start = time.perf_counter()
    tokenizer = world_tokenizer(cfg.vocab_size)
    echo("pretraining the vision tower")
    vision, processor, vision_metrics = pretrain.pretrain_vision(cfg.vision, world_seed=cfg.vision.seed,
                                                                 progress=progress)
    pretrain.save_vision(vision, processor, folder / "vision")
    echo(f"vision probes: {vision_metrics}")
    echo("pretraining the language model as a reader of boards")
    model, board, lm_metrics = train_reader(cfg.lm, tokenizer, progress=progress, log=echo)
    pretrain.save_language_model(model, tokenizer, folder / "llm")
    save_file(board.state_dict(), str(folder / "board.safetensors"))
    reading = final_reading_probe(model, board, tokenizer, cfg)
    echo(f"reading probe ({cfg.probe_per_kind} held-out questions per kind): {reading}")
    meta = {
        "hash": config_hash(cfg),
        "versions": {"components": COMPONENTS_VERSION, "generator": world_data.GENERATOR_VERSION},
        "config": dataclasses.asdict(cfg),
        "vision": vision_metrics,
        "reading_probe": reading,
        "lm": {"params": lm_metrics["params"], "final_loss": lm_metrics["final_loss"],
               "train_seconds": lm_metrics["train_seconds"], "history": lm_metrics["probe"]},
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def rebuild_vision(cfg: ComponentsConfig, folder: str | os.PathLike, *, progress: bool = True, echo=None) -> dict:
    """Pretrain the vision tower anew into a components folder that holds a language model built from the same LM
    recipe; keep that LM, its board and reading probe, and return (and write) the new metadata.

    The LM never sees a pixel (its documents are scene records and text: `reader.train_reader`), so a change to
    how scenes are drawn changes the tower alone; the metadata names the build the LM comes from.
    """
    folder = Path(folder)
    echo = echo or (lambda row: log.info("%s", row))
    old = json.loads((folder / "meta.json").read_text())
    new_config = dataclasses.asdict(cfg)
    same_lm = {k: v for k, v in new_config.items() if k != "vision"}
    if {k: v for k, v in old["config"].items() if k != "vision"} != json.loads(json.dumps(same_lm)):
        raise ConfigError(f"{folder}: its language model was built from another LM recipe than this one; rebuild "
                          "both components (without --vision-only)")
    start = time.perf_counter()
    echo("pretraining the vision tower (the language model is kept)")
    vision, processor, vision_metrics = pretrain.pretrain_vision(cfg.vision, world_seed=cfg.vision.seed,
                                                                 progress=progress)
    shutil.rmtree(folder / "vision", ignore_errors=True)
    pretrain.save_vision(vision, processor, folder / "vision")
    echo(f"vision probes: {vision_metrics}")
    lm_from = old.get("lm_from") or {"hash": old["hash"], "seconds": old["seconds"]}
    meta = {**old, "hash": config_hash(cfg),
            "versions": {"components": COMPONENTS_VERSION, "generator": world_data.GENERATOR_VERSION},
            "config": new_config, "vision": vision_metrics, "lm_from": lm_from,
            "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def final_reading_probe(model, board: BoardEmbedding, tokenizer, cfg: ComponentsConfig) -> dict:
    """Per kind of question (every kind, the ones no reading document asks included) and per answer format
    of the corpus ("colour", "colour@choice"), greedy exact match on held-out boards (`image`) and on blank
    boards (`blank`)."""
    enc = Encoder(tokenizer)
    items = every_kind_probe_set(enc, cfg, seed=PROBE_SEED, per_kind=cfg.probe_per_kind)
    return {"image": reading_probe(model, board, enc, items), "blank": reading_probe(model, board, enc, items,
                                                                                     blank=True)}


def every_kind_probe_set(enc: Encoder, cfg: ComponentsConfig, *, seed: int, per_kind: int) -> dict:
    """Held-out reading questions of every kind (the ones no reading document asks included), in each answer
    format of the LM's corpus, on boards of random seed `seed`."""
    every_kind = dataclasses.replace(cfg.lm, reading=dataclasses.replace(cfg.lm.reading, kinds=language.CATEGORIES))
    return probe_set(enc, every_kind, seed=seed, n_per_kind=per_kind)


def load_board(folder: str | os.PathLike) -> BoardEmbedding:
    """The learned board parts of a components folder."""
    state = load_file(str(Path(folder) / "board.safetensors"))
    board = BoardEmbedding(state["place"].shape[1], state["place_ids"])
    board.load_state_dict(state)
    return board


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Pretrain the tiny world's vision tower and language model.")
    parser.add_argument("--out", default=str(SHIPPED_DIR), help=f"where to write them (default: {SHIPPED_DIR})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--vision-only", action="store_true",
                        help="pretrain the vision tower only and keep the language model already in --out (it "
                             "never sees a pixel: after a change to how scenes are drawn, the tower is all that "
                             "changes; seconds instead of an hour)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                        help="change one field of the recipe: vision.F, lm.F, lm.reading.F or a top-level field "
                             "(vocab_size, probe_per_kind); a build with changes is not the shipped recipe, and "
                             "its hash says so")
    args = parser.parse_args(argv)
    name_deepspeed_accelerator()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides: dict = {}
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit("--set wants FIELD=VALUE (vision.F, lm.F, lm.reading.F or a top-level field), "
                             f"got {item!r}")
        *parents, leaf = key.split(".")
        where = overrides
        for p in parents:
            where = where.setdefault(p, {})
        where[leaf] = parse_value(value)
    cfg = _replace(shipped_config(), overrides, "--set")
    out = Path(args.out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if args.vision_only:
            if not (out / "meta.json").exists():
                raise SystemExit(f"--vision-only keeps the language model in {out}, and there is none there")
            shutil.copytree(out, tmp)
            meta = rebuild_vision(cfg, tmp, progress=False, echo=lambda row: print(row, flush=True))
        else:
            meta = build_components(cfg, tmp, progress=False, echo=lambda row: print(row, flush=True))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"components {meta['hash']} written to {out} in {meta['seconds']:.0f} s")
    return meta


def parse_value(text: str):
    """A `--set` value: a Python literal where it is one (`3`, `1e-3`, `(3, 5)`), a comma list as a tuple of
    strings, else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return tuple(text.split(",")) if "," in text else text


if __name__ == "__main__":
    main(sys.argv[1:])
