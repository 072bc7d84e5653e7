"""The tiny world's data files, written in the public formats the real recipe reads.

`write_world_data(folder, seed=..., sizes=...)` writes, all from the seed:

    images/train/NNNNNN.png   training images (stage 1 and stage 2)
    images/vqa/NNNNNN.png     held-out images of the open-ended benchmark
    pretrain.json             stage-1 caption pairs, LLaVA pretrain layout
    instruct.json             stage-2 conversations, LLaVA instruct layout: questions answered in a
                              word or a sentence, LLaVA-1.5's short-answer and option-letter formats,
                              multi-turn, detailed descriptions, ~15% text-only (INSTRUCT_KINDS)
    mmbench_dev.tsv           MMBench dev schema with circular copies, images inline as base64
    textvqa_val.json          TextVQA layout with 10 "human" answers per question (plus, per item,
                              `category` and `canonical_answer` for per-category reports)
    scenes.jsonl              the scene behind every image, benchmark ones included
    meta.json                 version, seed, sizes and counts; written last

Images: training scene i is `scene_rng(seed, "train", i)`. Pretrain record i uses training scene i;
the image-bearing instruct records use the next scenes (n_caption, n_caption + 1, ...), so the two
stages see disjoint images, as LLaVA's do (LAION/CC/SBU for stage 1, COCO and friends for stage 2).
That costs about 0.85 × n_instruct extra images and keeps stage 2 from being a re-read of stage 1.

Held out: benchmark and VQA scenes come from their own splits, and a drawn scene whose `key` (its
objects without jitter) equals a training scene's, or an earlier benchmark scene's, is rejected
and the next index drawn. Few single-object scenes survive that (there are only 1,920 of them and
the training set covers most), so the benchmarks lean to scenes of two or more objects.

The folder appears atomically: it is built in a temporary sibling and renamed into place, so a
killed run leaves no half world; a folder whose meta.json has the same version, seed and sizes is
reused as it is.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from vlmablate.data.dataset import llava_turns
from vlmablate.world import language
from vlmablate.world.scenes import Scene, render, sample_scene, scene_rng

GENERATOR_VERSION = 3  # bump when anything that changes the generated files changes

MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category",
                   "image", "split")
MMBENCH_CATEGORY = {
    "existence": "existence", "colour": "attribute_recognition", "shape": "shape_recognition",
    "counting": "object_counting", "position": "object_localization", "spatial": "spatial_relationship",
    "size": "size_recognition", "fill": "fill_recognition", "mark": "mark_recognition",
}
MMBENCH_L2 = {
    "existence": "CP", "attribute_recognition": "FP-S", "shape_recognition": "FP-S",
    "object_localization": "FP-S", "size_recognition": "FP-S", "fill_recognition": "FP-S",
    "spatial_relationship": "FP-C", "object_counting": "FP-C", "mark_recognition": "FP-S",
}
HINTS = {  # MMBench gives a hint line for some questions; these point at the attribute asked about
    "existence": "Look at every shape in the picture.", "colour": "Look at the colours.",
    "shape": "Look at the outlines of the shapes.", "counting": "Count each shape once.",
    "position": "The picture is divided into four quarters.",
    "spatial": "Compare where the shapes are.", "size": "Shapes come in two sizes.",
    "fill": "A shape is either filled in or drawn as an outline.",
    "mark": "Some shapes have a small dot in the middle.",
}
HINT_RATE = 0.1
COPY_STRIDE = 1_000_000  # MMBench's circular copy k of question q has index q + k * COPY_STRIDE
LETTERS = "ABCD"

CAPTION_PROMPTS = (  # a few of LLaVA's stage-1 brief-description instructions
    "Describe the image briefly.", "Describe the image concisely.",
    "Provide a brief description of the given image.", "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
)
DETAIL_PROMPTS = (
    "Describe the image in detail.", "Describe every shape in the image.",
    "What is in this image? Describe each shape with its size, fill, colour and place.",
)
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."  # LLaVA-1.5's VQA format prompt
CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."  # and its MMBench one

# Instruct record kinds and their shares: plain questions, LLaVA-1.5's two format prompts (short
# answer, option letter) so the benchmarks' prompts are not new to the model, multi-turn, detailed
# descriptions and text-only dialogue (~15%, as the brief's mix asks).
INSTRUCT_KINDS = {"single": 0.30, "short": 0.15, "choice": 0.15, "multi": 0.15, "detail": 0.10, "text": 0.15}


@dataclass(frozen=True)
class WorldSizes:
    n_caption: int = 12000  # stage-1 pairs
    n_instruct: int = 5000  # stage-2 conversations
    n_bench: int = 300  # benchmark questions (before circular copies)
    n_vqa: int = 200  # open-ended questions
    image_size: int = 64

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"WorldSizes.{name} must be a non-negative int, got {value!r}")
        if self.image_size < 1:
            raise ValueError(f"WorldSizes.image_size must be positive, got {self.image_size}")


def question_weights(weights: dict | None) -> dict[str, float]:
    """Every question category's weight in stage 2's questions (1 unless given), checked."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(language.CATEGORIES))
    if unknown:
        raise ValueError(f"question weights name unknown categories {unknown}; expected some of {language.CATEGORIES}")
    bad = {k: v for k, v in weights.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0}
    if bad:
        raise ValueError(f"question weights must be positive numbers, got {bad}")
    return {c: float(weights.get(c, 1.0)) for c in language.CATEGORIES}


def write_world_data(folder, *, seed: int, sizes: WorldSizes = WorldSizes(), progress: bool = True,
                     weights: dict | None = None) -> dict:
    """Write (or reuse) the world's data under `folder`; return the file paths and the meta data.

    `weights`: how often stage 2 asks each question category, relative to the others (default 1 each):
    `{"mark": 3}` asks about the mark three times as often as about colour. The benchmarks never change.
    """
    folder = Path(folder)
    weights = question_weights(weights)
    meta = _cached_meta(folder, seed, sizes, weights)
    if meta is None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the published world should read like any folder
        try:
            meta = _generate(tmp, seed, sizes, progress, weights)
            # Another process may have published the same world meanwhile: keep theirs, untouched.
            if _cached_meta(folder, seed, sizes, weights) is None:
                _publish(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # still here only if unused or failed
    return {
        "image_root": str(folder),
        "caption_json": str(folder / "pretrain.json"),
        "instruct_json": str(folder / "instruct.json"),
        "bench_tsv": str(folder / "mmbench_dev.tsv"),
        "vqa_json": str(folder / "textvqa_val.json"),
        "meta": meta,
    }


def _cached_meta(folder: Path, seed: int, sizes: WorldSizes, weights: dict[str, float]) -> dict | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = (meta.get("generator_version") == GENERATOR_VERSION and meta.get("seed") == seed
            and meta.get("sizes") == asdict(sizes)
            and meta.get("question_weights", question_weights(None)) == weights)
    return meta if same else None


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the finished world into place, moving an older world (never anything else) aside."""
    if folder.exists():
        if any(folder.iterdir()) and not (folder / "meta.json").is_file():
            raise FileExistsError(f"{folder} exists and is not a tiny-world folder; refusing to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.replace(folder, old / "world")
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def _generate(root: Path, seed: int, sizes: WorldSizes, progress: bool, weights: dict[str, float]) -> dict:
    """Write every file into `root`; meta.json last, so its presence means the rest is complete."""
    for sub in ("images/train", "images/vqa"):
        (root / sub).mkdir(parents=True)
    total = sizes.n_caption + sizes.n_instruct + sizes.n_bench + sizes.n_vqa
    with tqdm(total=total, desc="tiny world", unit="item", disable=not progress) as bar, \
            open(root / "scenes.jsonl", "w", encoding="utf-8") as scene_log:
        world = _World(root, seed, sizes, scene_log, bar, weights)
        counts = {
            "pretrain": world.write_pretrain(),
            "instruct": world.write_instruct(),
            "bench": world.write_bench(),
            "vqa": world.write_vqa(),
        }
    meta = {"generator_version": GENERATOR_VERSION, "seed": seed, "sizes": asdict(sizes), "question_weights": weights,
            "image_sharing": "disjoint: pretrain uses train scenes [0, n_caption), instruct the next ones",
            "n_text_only": counts["instruct"]["kinds"].get("text", 0), "counts": counts}
    (root / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def _rng(seed: int, purpose: str, index: int) -> random.Random:
    """Text randomness of one record, independent of the scene's own draws and of other records."""
    return random.Random(f"tiny-world-text/{seed}/{purpose}/{index}")


def _png_bytes(scene: Scene, image_size: int) -> bytes:
    buffer = io.BytesIO()
    render(scene, image_size).save(buffer, format="PNG")
    return buffer.getvalue()


class _JsonList:
    """A JSON list written one record per line as records come, so 100k records need no big string."""

    def __init__(self, path: Path):
        self.file = open(path, "w", encoding="utf-8")
        self.n = 0

    def __enter__(self) -> "_JsonList":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, record: dict) -> None:
        self.file.write(("[\n" if self.n == 0 else ",\n") + json.dumps(record, ensure_ascii=False))
        self.n += 1

    def close(self) -> None:
        self.file.write("[\n]\n" if self.n == 0 else "\n]\n")
        self.file.close()


class _CategoryBalance:
    """Asks next the category asked least so far for its weight that the scene can carry, so every
    category gets its share even though single-object scenes cannot carry a spatial question."""

    def __init__(self, weights: dict[str, float]):
        self.asked = Counter()
        self.weights = weights

    def question(self, scene: Scene, rng: random.Random, exclude: frozenset[str] = frozenset()) -> dict | None:
        order = sorted(language.CATEGORIES, key=lambda c: ((self.asked[c] + 1) / self.weights[c],
                                                           language.CATEGORIES.index(c)))
        for category in order:
            item = None if category in exclude else language.question(scene, category, rng)
            if item is not None:
                self.asked[category] += 1
                return item
        return None


class _World:
    """The generation state shared by the files: output folder, training scene keys, scene log."""

    def __init__(self, root: Path, seed: int, sizes: WorldSizes, scene_log, bar, weights: dict[str, float]):
        self.root, self.seed, self.sizes, self.weights = root, seed, sizes, weights
        self.scene_log, self.bar = scene_log, bar
        self.train_keys: set[tuple] = set()
        self.n_train_images = 0

    def _log_scene(self, image: str, split: str, scene: Scene) -> None:
        self.scene_log.write(json.dumps({"image": image, "split": split, "scene": scene.to_dict()}) + "\n")

    def _train_image(self) -> tuple[str, Scene]:
        """Draw the next training scene, save its PNG, remember its key; return (relative path, scene)."""
        index = self.n_train_images
        scene = sample_scene(scene_rng(self.seed, "train", index))
        relative = f"images/train/{index:06d}.png"
        (self.root / relative).write_bytes(_png_bytes(scene, self.sizes.image_size))
        self._log_scene(relative, "train", scene)
        self.train_keys.add(scene.key)
        self.n_train_images += 1
        return relative, scene

    # --- stage 1 ---------------------------------------------------------------------------------

    def write_pretrain(self) -> dict:
        with _JsonList(self.root / "pretrain.json") as out:
            for i in range(self.sizes.n_caption):
                image, scene = self._train_image()
                rng = _rng(self.seed, "caption", i)
                prompt = rng.choice(CAPTION_PROMPTS)
                out.add({"id": f"cap-{i:06d}", "image": image, "conversations": [
                    {"from": "human", "value": "<image>\n" + prompt},
                    {"from": "gpt", "value": language.caption(scene, rng)},
                ]})
                self.bar.update()
        return {"records": out.n, "images": self.n_train_images}

    # --- stage 2 ---------------------------------------------------------------------------------

    def write_instruct(self) -> dict:
        balance = _CategoryBalance(self.weights)
        kinds, categories = Counter(), Counter()
        first_image = self.n_train_images
        with _JsonList(self.root / "instruct.json") as out:
            for j in range(self.sizes.n_instruct):
                rng = _rng(self.seed, "instruct", j)
                kind = rng.choices(list(INSTRUCT_KINDS), weights=list(INSTRUCT_KINDS.values()))[0]
                record, asked = self._instruct_record(kind, rng, balance)
                out.add({"id": f"inst-{j:06d}", **record})
                kinds[kind] += 1
                categories.update(asked)
                self.bar.update()
        return {"records": out.n, "images": self.n_train_images - first_image, "kinds": dict(sorted(kinds.items())),
                "multi_turn": kinds["multi"], "questions_per_category": _ordered(categories)}

    def _instruct_record(self, kind: str, rng: random.Random, balance: _CategoryBalance) -> tuple[dict, list[str]]:
        """One record of `kind` (without its id) and the categories of the questions it asks."""
        if kind == "text":
            return {"conversations": llava_turns(language.text_only_dialogue(rng))}, []
        image, scene = self._train_image()
        if kind == "detail":
            return {"image": image, "conversations": llava_turns(
                [(rng.choice(DETAIL_PROMPTS), language.describe(scene))], image=True)}, []
        if kind == "multi":
            items = []
            for _ in range(rng.randint(2, 4)):
                item = balance.question(scene, rng, exclude=frozenset(it["category"] for it in items))
                if item is not None:
                    items.append(item)
            pairs = [(it["question"], _spoken_answer(it, rng)) for it in items]
        else:
            item = balance.question(scene, rng)
            items = [item]
            pairs = [_single_turn(kind, item, rng)]
        return {"image": image, "conversations": llava_turns(pairs, image=True)}, [it["category"] for it in items]

    # --- benchmarks ------------------------------------------------------------------------------

    def _held_out(self, split: str, count: int) -> tuple[list, int]:
        """`count` (index, scene, question, rng) drawn from `split` with categories in turn, skipping
        scenes whose key is a training scene's or already drawn; returns them and the number rejected."""
        drawn, seen, index, rejected = [], set(), 0, 0
        while len(drawn) < count:
            scene = sample_scene(scene_rng(self.seed, split, index))
            category = language.CATEGORIES[len(drawn) % len(language.CATEGORIES)]
            rng = _rng(self.seed, f"{split}-question", index)
            item = None if scene.key in self.train_keys or scene.key in seen else \
                language.question(scene, category, rng)
            if item is None:
                rejected += 1
            else:
                seen.add(scene.key)
                drawn.append((index, scene, item, rng))
            index += 1
        return drawn, rejected

    def write_bench(self) -> dict:
        drawn, rejected = self._held_out("bench", self.sizes.n_bench)
        mains, copies, hints = [], [], 0
        for q, (_, scene, item, rng) in enumerate(drawn):
            image = base64.b64encode(_png_bytes(scene, self.sizes.image_size)).decode("ascii")
            hint = HINTS[item["category"]] if rng.random() < HINT_RATE else ""
            hints += bool(hint)
            rows = _circular_rows(q, item, hint, image)
            mains.append(rows[0])
            copies.extend(rows[1:])
            self._log_scene(f"mmbench_dev.tsv#{q}", "bench", scene)
            self.bar.update()
        # MMBench's own files list the main questions first and the copies after them.
        copies.sort(key=lambda row: row["index"] // COPY_STRIDE)
        with open(self.root / "mmbench_dev.tsv", "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MMBENCH_COLUMNS, delimiter="\t", lineterminator="\n")
            writer.writeheader()
            writer.writerows(mains + copies)
        return {"questions": len(drawn), "rows": len(mains) + len(copies), "hints": hints,
                "rejected_draws": rejected,
                "per_category": _ordered(Counter(it["category"] for _, _, it, _ in drawn))}

    def write_vqa(self) -> dict:
        drawn, rejected = self._held_out("vqa", self.sizes.n_vqa)
        data = []
        for v, (_, scene, item, rng) in enumerate(drawn):
            relative = f"images/vqa/{v:06d}.png"
            (self.root / relative).write_bytes(_png_bytes(scene, self.sizes.image_size))
            self._log_scene(relative, "vqa", scene)
            data.append({"question_id": v, "image_id": f"{v:06d}", "image": relative,
                         "question": item["question"], "answers": _human_answers(item, rng),
                         "ocr_tokens": [], "category": item["category"],
                         "canonical_answer": item["answer"]})
            self.bar.update()
        doc = {"dataset_type": "val", "dataset_name": "tiny_world_vqa", "data": data}
        (self.root / "textvqa_val.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        return {"questions": len(data), "rejected_draws": rejected,
                "per_category": _ordered(Counter(it["category"] for _, _, it, _ in drawn))}


def _ordered(counts: Counter) -> dict:
    return {c: counts.get(c, 0) for c in language.CATEGORIES}


# --- conversation pieces --------------------------------------------------------------------------


def _spoken_answer(item: dict, rng: random.Random) -> str:
    """`Red.` or `The circle is red.`: LLaVA's instruct answers mix both."""
    return item["sentence"] if rng.random() < 0.6 else language.sentence_case(item["answer"]) + "."


def _options_block(options: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))


def _single_turn(kind: str, item: dict, rng: random.Random) -> tuple[str, str]:
    if kind == "short":
        return f"{item['question']}\n{SHORT_ANSWER_PROMPT}", item["answer"]
    if kind == "choice":
        hint = HINTS[item["category"]] + "\n" if rng.random() < HINT_RATE else ""
        letter = LETTERS[item["options"].index(item["answer"])]
        return f"{hint}{item['question']}\n{_options_block(item['options'])}\n{CHOICE_PROMPT}", letter
    return item["question"], _spoken_answer(item, rng)


# --- MMBench rows ---------------------------------------------------------------------------------


def _circular_rows(q: int, item: dict, hint: str, image: str) -> list[dict]:
    """The main row of question q and its circular copies: copy k has the options rotated left by k
    and, as MMBench allows, the index of the main row (≤ 64 characters) in place of the image."""
    options, n = item["options"], len(item["options"])
    category = MMBENCH_CATEGORY[item["category"]]
    rows = []
    for k in range(n):
        rotated = options[k:] + options[:k]
        row = {"index": q + k * COPY_STRIDE, "question": item["question"], "hint": hint,
               "answer": LETTERS[rotated.index(item["answer"])], "category": category,
               "l2-category": MMBENCH_L2[category], "image": image if k == 0 else str(q), "split": "dev"}
        row.update({LETTERS[i]: rotated[i] if i < n else "" for i in range(len(LETTERS))})
        rows.append(row)
    return rows


# --- TextVQA answers ------------------------------------------------------------------------------


def _equivalents(answer: str) -> list[str]:
    """Spellings a VQA normaliser maps back to `answer`: case, a trailing period, number words,
    a leading article."""
    forms = [answer.capitalize(), answer + "."]
    if answer.isdigit() and int(answer) < len(language.NUMBER_WORDS):
        forms.append(language.NUMBER_WORDS[int(answer)])
    elif answer not in ("yes", "no"):
        forms.append("the " + answer)
    return [f for f in forms if f != answer]


def _human_answers(item: dict, rng: random.Random) -> list[str]:
    """Ten annotator answers: mostly the canonical one, up to two equivalent spellings, and for
    about 40% of questions one to three annotators who disagree (never enough to outvote it)."""
    answer = item["answer"]
    wrong = [o for o in item["options"] if o != answer]
    n_disagree = rng.randint(1, 3) if wrong and rng.random() < 0.4 else 0
    n_variant = rng.randint(0, 2)
    answers = [rng.choice(wrong) for _ in range(n_disagree)]
    answers += [rng.choice(_equivalents(answer)) for _ in range(n_variant)]
    answers += [answer] * (10 - len(answers))  # at least five: the canonical answer is the clear majority
    rng.shuffle(answers)
    return answers
