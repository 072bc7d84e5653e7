"""A small generated LLaVA-format data set: coloured shapes on white, captions and questions.

`write_synthetic_llava` draws 1-3 shapes (circle / square / triangle, each kind at most once, in
red / green / blue / yellow, left to right) per image and writes two LLaVA JSON files beside the
images: a caption set in the pretrain layout (stage 1) and an instruction set (stage 2) with
single-turn and multi-turn questions about the image and about 20% text-only questions. Everything
follows from the seed, so the same arguments give byte-identical files; a finished folder with the
same arguments is reused.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vlmablate.data.dataset import llava_turns

COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
CAPTION_PROMPTS = ("Describe the image.", "What is in the image?", "Tell me about the picture.")
SIDES = {"triangle": 3, "square": 4}
MIXES = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("red", "blue"): "purple"}
_FORMAT_VERSION = 1  # bump when the generated content changes, so old folders are regenerated


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str


def write_synthetic_llava(
    folder: str | os.PathLike, *, n_caption: int = 64, n_instruct: int = 64, seed: int = 0, image_size: int = 32
) -> dict:
    """Write (or reuse) the data set under `folder`; return the image root and the two JSON paths.

    Image paths in the records are relative to `folder` (`images/cap_00000.png`), so `folder` is
    the image root.
    """
    folder = Path(folder)
    paths = {
        "image_root": str(folder),
        "pretrain_json": str(folder / "pretrain.json"),
        "instruct_json": str(folder / "instruct.json"),
    }
    meta = {"version": _FORMAT_VERSION, "n_caption": n_caption, "n_instruct": n_instruct,
            "seed": seed, "image_size": image_size}
    if _is_complete(folder, meta, paths):
        return paths
    (folder / "images").mkdir(parents=True, exist_ok=True)
    # Separate streams, so the caption set does not change when n_instruct does.
    pretrain = _caption_records(folder, n_caption, random.Random(2 * seed), image_size)
    instruct = _instruct_records(folder, n_instruct, random.Random(2 * seed + 1), image_size)
    _write_atomic(Path(paths["pretrain_json"]), json.dumps(pretrain, indent=1).encode())
    _write_atomic(Path(paths["instruct_json"]), json.dumps(instruct, indent=1).encode())
    # meta.json last: its presence with these values means every other file is complete.
    _write_atomic(folder / "meta.json", json.dumps(meta, indent=1).encode())
    return paths


def _is_complete(folder: Path, meta: dict, paths: dict) -> bool:
    meta_path = folder / "meta.json"
    if not (meta_path.is_file() and Path(paths["pretrain_json"]).is_file() and Path(paths["instruct_json"]).is_file()):
        return False
    try:
        return json.loads(meta_path.read_text()) == meta
    except (OSError, json.JSONDecodeError):
        return False


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- scenes and images -----------------------------------------------------------------------------


def random_scene(rng: random.Random) -> list[Shape]:
    """1-3 shapes, each kind at most once (so "the circle" is always unambiguous), left to right."""
    kinds = rng.sample(SHAPES, rng.randint(1, 3))
    return [Shape(kind, rng.choice(sorted(COLOURS))) for kind in kinds]


def draw_scene(scene: list[Shape], size: int) -> Image.Image:
    """The shapes in equal slots from left to right on a white canvas."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    slot = size / len(scene)
    side = 0.7 * min(slot, size)
    for k, shape in enumerate(scene):
        cx, cy = slot * (k + 0.5), size / 2
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        colour = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse(box, fill=colour)
        elif shape.kind == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), (cx, box[1])], fill=colour)
    return image


def caption(scene: list[Shape]) -> str:
    """LAION-style lower-case caption, e.g. 'a red circle, a blue square and a green triangle.'"""
    parts = [f"a {s.colour} {s.kind}" for s in scene]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def _save_image(folder: Path, name: str, scene: list[Shape], size: int) -> str:
    relative = f"images/{name}.png"
    tmp = folder / "images" / f".{name}.tmp{os.getpid()}.png"
    draw_scene(scene, size).save(tmp, format="PNG")
    os.replace(tmp, folder / relative)
    return relative


# --- records ---------------------------------------------------------------------------------------


def _caption_records(folder: Path, n: int, rng: random.Random, size: int) -> list[dict]:
    records = []
    for k in range(n):
        scene = random_scene(rng)
        prompt = rng.choice(CAPTION_PROMPTS)
        records.append({
            "id": f"cap-{k:05d}",
            "image": _save_image(folder, f"cap_{k:05d}", scene, size),
            "conversations": [
                {"from": "human", "value": "<image>\n" + prompt},
                {"from": "gpt", "value": caption(scene)},
            ],
        })
    return records


def _instruct_records(folder: Path, n: int, rng: random.Random, size: int) -> list[dict]:
    """Cycle of five: single-turn, multi-turn, single-turn, multi-turn, text-only (20%)."""
    records = []
    for k in range(n):
        record_id = f"ins-{k:05d}"
        if k % 5 == 4:
            question, answer = _text_question(rng)
            records.append({"id": record_id, "conversations": llava_turns([(question, answer)])})
            continue
        scene = random_scene(rng)
        pairs = _scene_questions(scene, rng)
        n_turns = 1 if k % 5 in (0, 2) else rng.randint(2, 3)
        records.append({
            "id": record_id,
            "image": _save_image(folder, f"ins_{k:05d}", scene, size),
            "conversations": llava_turns(rng.sample(pairs, n_turns), image=True),
        })
    return records


def _scene_questions(scene: list[Shape], rng: random.Random) -> list[tuple[str, str]]:
    """At least three distinct questions with their answers: count, colours, presence, shape by colour."""
    count = NUMBERS[len(scene)].capitalize()
    pairs = [("How many shapes are in the image?", f"{count}.")]
    pairs += [(f"What colour is the {s.kind}?", f"{s.colour.capitalize()}.") for s in scene]
    asked = rng.choice(SHAPES)
    present = any(s.kind == asked for s in scene)
    pairs.append((f"Is there a {asked} in the image?", "Yes." if present else "No."))
    colours = [s.colour for s in scene]
    pairs += [(f"Which shape is {s.colour}?", f"The {s.kind}.") for s in scene if colours.count(s.colour) == 1]
    return pairs


def _text_question(rng: random.Random) -> tuple[str, str]:
    """A deterministic text-only question: mixing colours, sides of a shape, or a small sum."""
    kind = rng.choice(("mix", "sides", "sum"))
    if kind == "mix":
        (a, b), result = rng.choice(sorted(MIXES.items()))
        return f"What colour do you get when you mix {a} and {b}?", f"{result.capitalize()}."
    if kind == "sides":
        shape = rng.choice(sorted(SIDES))
        return f"How many sides does a {shape} have?", f"{NUMBERS[SIDES[shape]].capitalize()}."
    a, b = rng.randint(0, 5), rng.randint(0, 5)
    return f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", f"{NUMBERS[a + b].capitalize()}."
