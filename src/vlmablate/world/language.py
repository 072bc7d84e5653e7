"""All the tiny world's text: captions, detailed descriptions, questions with answers, text-only talk.

Every function is a pure function of a scene and an `random.Random`, so the generated files follow
from the seed alone. Captions play the part of LLaVA's stage-1 BLIP captions (short, lower-case, not
every attribute every time); `describe` is the detailed description of stage 2; `question` asks one
question of one of eight categories, the same ones the benchmark reports:

    existence  colour  shape  counting  position  spatial  size  fill  mark

A question item is `{"category", "question", "answer", "options", "sentence"}`: `answer` is the short
canonical answer ("red", "3", "top left", "yes"), `options` the multiple-choice options (the answer
plus plausible wrong ones, already shuffled), and `sentence` the same answer as a full sentence for
instruction data ("The circle is red.").

`sample_scene` guarantees that no two objects share colour and shape, so "the red circle" always
names exactly one object; the questions rely on that.
"""

from __future__ import annotations

import random

from vlmablate.world.scenes import COLOURS, FILLS, GRID, MARKS, SHAPES, SIZES, Obj, Scene, position, quadrant

CATEGORIES = ("existence", "colour", "shape", "counting", "position", "spatial", "size", "fill", "mark")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
YES_NO = ("yes", "no")
MAX_COUNT_OPTION = 5  # scenes hold 1-5 objects, so counting options are drawn from 1..5


# --- small English helpers ---------------------------------------------------------------------------


def a(phrase: str) -> str:
    """`a red circle`, `an orange square`, `an outline circle`."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def join(items: list[str]) -> str:
    """`x`, `x and y`, `x, y and z`."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def count_phrase(n: int, noun: str) -> str:
    """`one circle`, `three circles` (noun given in the singular)."""
    return f"{NUMBER_WORDS[n]} {noun if n == 1 else plural(noun)}"


def sentence_case(text: str) -> str:
    return text[:1].upper() + text[1:]


def colour_shape(o: Obj) -> str:
    return f"{o.colour} {o.shape}"


def full_name(o: Obj) -> str:
    """Every attribute: `large solid red circle`, `small outline blue square`."""
    return f"{o.size} {o.fill} {o.colour} {o.shape}"


def ref(o: Obj) -> str:
    """The definite reference that is always unique in a scene: `the red circle`."""
    return f"the {colour_shape(o)}"


# --- captions (stage 1) ------------------------------------------------------------------------------

# How much of each object a caption names; BLIP-style captions do not list every attribute, which
# leaves size and fill partly to stage 2, as in the scenes' design.
_CAPTION_DETAIL = (
    lambda o: colour_shape(o),
    lambda o: f"{o.size} {o.colour} {o.shape}",
    lambda o: f"{o.fill} {o.colour} {o.shape}",
    full_name,
)
_CAPTION_FRAMES = (
    lambda n, items: f"{items}.",
    lambda n, items: f"{count_phrase(n, 'shape')}: {items}.",
    lambda n, items: f"{items} on a white background.",
    lambda n, items: f"a picture of {items}.",
)


def caption(scene: Scene, rng: random.Random) -> str:
    """A short lower-case caption naming every object's colour and shape, sometimes more."""
    detail = rng.choice(_CAPTION_DETAIL)
    with_place = rng.random() < 0.4
    objects = list(scene.objects)
    if rng.random() < 0.3:  # reading order most of the time, like a person listing what they see
        rng.shuffle(objects)
    items = []
    for o in objects:
        item = a(detail(o))
        if with_place:
            item += f" {rng.choice(('at', 'in'))} the {quadrant(o)}"
        items.append(item)
    return rng.choice(_CAPTION_FRAMES)(len(objects), join(items))


# --- detailed description (stage 2) ----------------------------------------------------------------


def describe(scene: Scene) -> str:
    """Every object with size, fill, colour, shape, its mark where it has one, cell and quarter, after the count."""
    n = len(scene.objects)
    lines = [f"The image shows {count_phrase(n, 'shape')} on a white background."]
    for o in scene.objects:
        dot = " with a dot in the middle" if o.mark == "dotted" else ""
        lines.append(f"{sentence_case(a(full_name(o)))}{dot} is at the {position(o)}, in the {quadrant(o)} quarter.")
    return " ".join(lines)


# --- questions --------------------------------------------------------------------------------------


def cell(o: Obj) -> int:
    """The object's cell in raster order: its patch's place among the 16 image tokens."""
    return o.row * GRID + o.col


def _item(category: str, question: str, answer: str, options: list[str], sentence: str,
          rng: random.Random, about: list[Obj] = ()) -> dict:
    """`about`: the objects the answer is read from; `cells` lists their cells in raster order."""
    assert answer in options and len(set(options)) == len(options), (answer, options)
    options = list(options)
    rng.shuffle(options)  # the correct option's position carries no signal
    return {"category": category, "question": question, "answer": answer, "options": options,
            "sentence": sentence, "cells": sorted(cell(o) for o in about)}


def _choices(answer: str, preferred: list[str], pool: list[str], rng: random.Random, k: int = 4) -> list[str]:
    """The answer plus up to k-1 distractors, taken first from `preferred` (plausible: things in the
    scene) and then from `pool`."""
    options = [answer]
    for candidates in (preferred, pool):
        rest = [c for c in dict.fromkeys(candidates) if c not in options]
        rng.shuffle(rest)
        options += rest[: k - len(options)]
    return options


def _existence(scene: Scene, rng: random.Random) -> dict:
    present = {(o.shape, o.colour) for o in scene.objects}
    if rng.random() < 0.5:
        shape, colour = rng.choice(sorted(present))
        answer = "yes"
    else:
        absent = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in present]
        # Hard negatives share the colour or the shape of something in the picture.
        hard = [(s, c) for s, c in absent if any(s == ps or c == pc for ps, pc in present)]
        shape, colour = rng.choice(hard if hard and rng.random() < 0.7 else absent)
        answer = "no"
    thing = a(f"{colour} {shape}")
    question = rng.choice((f"Is there {thing}?", f"Is there {thing} in the image?",
                           f"Does the image contain {thing}?", f"Can you see {thing}?"))
    sentence = f"Yes, there is {thing}." if answer == "yes" else f"No, there is no {colour} {shape}."
    about = [o for o in scene.objects if (o.shape, o.colour) == (shape, colour)]
    return _item("existence", question, answer, list(YES_NO), sentence, rng, about)


def _reference(scene: Scene, o: Obj, attribute: str, noun: str) -> str:
    """`the {noun}` when no other object shares `attribute`, else qualified by size, fill or place."""
    same = [p for p in scene.objects if getattr(p, attribute) == getattr(o, attribute)]
    if len(same) == 1:
        return f"the {noun}"
    for word in (lambda p: p.size, lambda p: p.fill):
        if sum(word(p) == word(o) for p in same) == 1:
            return f"the {word(o)} {noun}"
    if sum(quadrant(p) == quadrant(o) for p in same) == 1:
        return f"the {noun} at the {quadrant(o)}"
    return f"the {noun} at the {position(o)}"  # cells are distinct, so this is always unique


def _shape_ref(scene: Scene, o: Obj) -> str:
    """`the triangle`, or `the small triangle`, ... when another triangle is there."""
    return _reference(scene, o, "shape", o.shape)


def _colour_ref(scene: Scene, o: Obj) -> str:
    """`the blue object`, or `the small blue object`, ... when another blue object is there."""
    return _reference(scene, o, "colour", f"{o.colour} object")


def _colour(scene: Scene, rng: random.Random) -> dict:
    o = rng.choice(scene.objects)
    target = _shape_ref(scene, o)
    question = rng.choice((f"What colour is {target}?", f"What is the colour of {target}?",
                           f"Which colour does {target} have?"))
    options = _choices(o.colour, [p.colour for p in scene.objects], list(COLOURS), rng)
    return _item("colour", question, o.colour, options, f"{sentence_case(target)} is {o.colour}.", rng, [o])


def _shape(scene: Scene, rng: random.Random) -> dict:
    o = rng.choice(scene.objects)
    target = _colour_ref(scene, o)
    question = rng.choice((f"What shape is {target}?", f"Which shape is {target}?",
                           f"What is the shape of {target}?"))
    options = _choices(o.shape, [p.shape for p in scene.objects], list(SHAPES), rng)
    return _item("shape", question, o.shape, options, f"{sentence_case(target)} is {a(o.shape)}.", rng, [o])


def _counting(scene: Scene, rng: random.Random) -> dict:
    kind = rng.choices(("all", "colour", "shape"), weights=(4, 3, 3))[0]
    if kind == "all":
        counted, noun = scene.objects, "shape"
        question = rng.choice(("How many shapes are there?", "How many shapes are in the image?",
                               "How many objects can you see?"))
    elif kind == "colour":
        colour = rng.choice(scene.objects).colour
        counted, noun = [o for o in scene.objects if o.colour == colour], f"{colour} shape"
        question = f"How many {colour} shapes are there?"
    else:
        shape = rng.choice(scene.objects).shape
        counted, noun = [o for o in scene.objects if o.shape == shape], shape
        question = rng.choice((f"How many {plural(shape)} are there?", f"How many {plural(shape)} can you see?"))
    n = len(counted)
    counts = [str(k) for k in range(1, MAX_COUNT_OPTION + 1)]
    verb = "is" if n == 1 else "are"
    return _item("counting", question, str(n), _choices(str(n), [], counts, rng),
                 f"There {verb} {count_phrase(n, noun)}.", rng, counted)


def _position(scene: Scene, rng: random.Random) -> dict:
    o = rng.choice(scene.objects)
    question = rng.choice((f"Where is {ref(o)}?", f"In which part of the image is {ref(o)}?",
                           f"Which quarter of the image is {ref(o)} in?"))
    return _item("position", question, quadrant(o), list(QUADRANTS),
                 f"{sentence_case(ref(o))} is at the {quadrant(o)}.", rng, [o])


# Relation word -> does it hold for (a, b): a is <relation> b.
RELATIONS = {
    "left of": lambda p, q: p.col < q.col,
    "right of": lambda p, q: p.col > q.col,
    "above": lambda p, q: p.row < q.row,
    "below": lambda p, q: p.row > q.row,
}
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _spatial(scene: Scene, rng: random.Random) -> dict | None:
    """A yes/no relation between two objects, or "which shape is <rel> X" when exactly one is."""
    if len(scene.objects) < 2:
        return None
    unique = [(b, rel) for b in scene.objects for rel in RELATIONS
              if sum(RELATIONS[rel](p, b) for p in scene.objects if p is not b) == 1]
    if unique and rng.random() < 0.3:
        return _spatial_which(scene, *rng.choice(unique), rng)
    return _spatial_yes_no(scene, rng)


def _spatial_yes_no(scene: Scene, rng: random.Random) -> dict:
    p, q = rng.sample(scene.objects, 2)
    # Ask only along an axis where the two differ, so that "no" means "the other way round".
    axes = [axis for axis, differs in ((("left of", "right of"), p.col != q.col),
                                       (("above", "below"), p.row != q.row)) if differs]
    rel = rng.choice(rng.choice(axes))
    holds = RELATIONS[rel](p, q)
    spoken = lambda r: f"to the {r}" if r in ("left of", "right of") else r  # noqa: E731
    question = rng.choice((f"Is {ref(p)} {rel} {ref(q)}?", f"Is {ref(p)} {spoken(rel)} {ref(q)}?"))
    true_rel = rel if holds else _OPPOSITE[rel]
    sentence = f"{'Yes' if holds else 'No'}, {ref(p)} is {spoken(true_rel)} {ref(q)}."
    return _item("spatial", question, "yes" if holds else "no", list(YES_NO), sentence, rng, [p, q])


def _spatial_which(scene: Scene, b: Obj, rel: str, rng: random.Random) -> dict:
    (o,) = [p for p in scene.objects if p is not b and RELATIONS[rel](p, b)]
    answer = colour_shape(o)
    others = [colour_shape(p) for p in scene.objects if p is not o and p is not b]
    present = {(p.shape, p.colour) for p in scene.objects}
    absent = [f"{c} {s}" for s in SHAPES for c in COLOURS if (s, c) not in present]
    question = f"Which shape is {rel} {ref(b)}?"
    sentence = f"{sentence_case(ref(o))} is {rel} {ref(b)}."
    return _item("spatial", question, answer, _choices(answer, others, absent, rng), sentence, rng, [o, b])


def _size(scene: Scene, rng: random.Random) -> dict:
    o = rng.choice(scene.objects)
    question = rng.choice((f"Is {ref(o)} large or small?", f"Is {ref(o)} small or large?",
                           f"What size is {ref(o)}?"))
    return _item("size", question, o.size, list(SIZES), f"{sentence_case(ref(o))} is {o.size}.", rng, [o])


def _fill(scene: Scene, rng: random.Random) -> dict:
    o = rng.choice(scene.objects)
    question = rng.choice((f"Is {ref(o)} solid or outline?", f"Is {ref(o)} drawn solid or as an outline?",
                           f"What fill does {ref(o)} have?"))
    sentence = f"{sentence_case(ref(o))} is " + ("solid." if o.fill == "solid" else "drawn as an outline.")
    return _item("fill", question, o.fill, list(FILLS), sentence, rng, [o])


def _mark(scene: Scene, rng: random.Random) -> dict:
    o = rng.choice(scene.objects)
    question = rng.choice((f"Is {ref(o)} plain or dotted?", f"Is {ref(o)} dotted or plain?",
                           f"Does {ref(o)} have a dot in the middle, or is it plain?"))
    sentence = f"{sentence_case(ref(o))} is " + ("dotted." if o.mark == "dotted" else "plain, without a dot.")
    return _item("mark", question, o.mark, list(MARKS), sentence, rng, [o])


_MAKERS = {
    "existence": _existence, "colour": _colour, "shape": _shape, "counting": _counting,
    "position": _position, "spatial": _spatial, "size": _size, "fill": _fill, "mark": _mark,
}


def question(scene: Scene, category: str, rng: random.Random) -> dict | None:
    """One question of `category` about the scene, or None where the scene cannot carry one
    (a spatial question needs two objects)."""
    if category not in _MAKERS:
        raise ValueError(f"unknown question category {category!r}; expected one of {CATEGORIES}")
    if not scene.objects:
        return None
    return _MAKERS[category](scene, rng)


def questions(scene: Scene, rng: random.Random) -> list[dict]:
    """One question per category that the scene can carry, in CATEGORIES order."""
    items = [question(scene, category, rng) for category in CATEGORIES]
    return [item for item in items if item is not None]


# --- text-only dialogue ---------------------------------------------------------------------------

SIDES = {"triangle": 3, "square": 4, "diamond": 4, "cross": 12}  # the cross is a plus of 12 edges
_SIDE_WORDS = {3: "three", 4: "four", 12: "twelve"}
MIXES = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple"}


def _fact_sides(rng: random.Random) -> tuple[str, str]:
    shape = rng.choice(SHAPES)
    word = rng.choice(("sides", "corners"))
    if shape == "circle":
        return f"How many {word} does a circle have?", f"A circle has no {word}; its edge is one curve."
    n = _SIDE_WORDS[SIDES[shape]]
    return f"How many {word} does {a(shape)} have?", f"{sentence_case(a(shape))} has {n} {word}."


def _fact_which_sides(rng: random.Random) -> tuple[str, str]:
    n = rng.choice(sorted(_SIDE_WORDS))
    shapes, word = [s for s in SHAPES if SIDES.get(s) == n], _SIDE_WORDS[n]
    if len(shapes) == 1:
        return f"Which shape has {word} sides?", f"{sentence_case(a(shapes[0]))} has {word} sides."
    return f"Which shapes have {word} sides?", f"{sentence_case(join([a(s) for s in shapes]))} have {word} sides."


def _fact_corners(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        cornered = join([f"the {s}" for s in SHAPES if s in SIDES])
        return "Which shapes have corners?", f"{sentence_case(cornered)} have corners; the circle has none."
    listed = rng.sample([s for s in SHAPES if s != "circle"], 2) + ["circle"]
    rng.shuffle(listed)
    choices = ", ".join(a(s) for s in listed[:2]) + " or " + a(listed[2])
    return f"Which of these shapes is round: {choices}?", "The circle is round."


def _fact_arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice(("plus", "minus", "times"))
    if op == "plus":
        x = rng.randint(0, 10)
        y = rng.randint(0, 10 - x)
        z = x + y
    elif op == "minus":
        x = rng.randint(0, 10)
        y = rng.randint(0, x)
        z = x - y
    else:
        x = rng.randint(1, 5)
        y = rng.randint(0, 10 // x)
        z = x * y
    answer = rng.choice((f"{sentence_case(NUMBER_WORDS[z])}.", f"{sentence_case(NUMBER_WORDS[x])} {op} "
                                                              f"{NUMBER_WORDS[y]} is {NUMBER_WORDS[z]}."))
    return f"What is {NUMBER_WORDS[x]} {op} {NUMBER_WORDS[y]}?", answer


def _fact_compare(rng: random.Random) -> tuple[str, str]:
    x, y = rng.sample(range(11), 2)
    big, small = max(x, y), min(x, y)
    word = rng.choice(("larger", "smaller"))
    winner, loser = (big, small) if word == "larger" else (small, big)
    return (f"Which is {word}, {NUMBER_WORDS[x]} or {NUMBER_WORDS[y]}?",
            f"{sentence_case(NUMBER_WORDS[winner])} is {word} than {NUMBER_WORDS[loser]}.")


def _fact_next_number(rng: random.Random) -> tuple[str, str]:
    k = rng.randint(0, 9)
    x, y = NUMBER_WORDS[k], NUMBER_WORDS[k + 1]
    if rng.random() < 0.5:
        return f"What number comes after {x}?", f"{sentence_case(y)} comes after {x}."
    return f"What number comes before {y}?", f"{sentence_case(x)} comes before {y}."


def _fact_count_story(rng: random.Random) -> tuple[str, str]:
    (c1, s1), (c2, s2) = rng.sample([(c, s) for c in COLOURS for s in SHAPES], 2)
    x = rng.randint(1, 5)
    y = rng.randint(1, 5)
    story = f"There are {count_phrase(x, f'{c1} {s1}')} and {count_phrase(y, f'{c2} {s2}')}."
    if story.startswith("There are one"):  # agree the verb with the first item, as people do
        story = "There is" + story[len("There are"):]
    return f"{story} How many shapes are there in total?", f"There are {NUMBER_WORDS[x + y]} shapes in total."


def _fact_mix(rng: random.Random) -> tuple[str, str]:
    (x, y), z = rng.choice(sorted(MIXES.items()))
    if rng.random() < 0.5:
        x, y = y, x
    return f"What colour do you get when you mix {x} and {y} paint?", f"Mixing {x} and {y} paint gives {z}."


def _fact_kind(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(list(COLOURS) + list(SHAPES))
    if word in COLOURS:
        return f"Is {word} a colour or a shape?", f"{sentence_case(word)} is a colour."
    return f"Is {a(word)} a colour or a shape?", f"{sentence_case(a(word))} is a shape."


_FACTS = (_fact_sides, _fact_which_sides, _fact_corners, _fact_arithmetic, _fact_compare,
          _fact_next_number, _fact_count_story, _fact_mix, _fact_kind)


def text_only_dialogue(rng: random.Random) -> list[tuple[str, str]]:
    """1-3 (question, answer) turns of true, deterministic facts about shapes, colours and numbers."""
    n_turns = rng.choices((1, 2, 3), weights=(5, 3, 2))[0]
    return [fact(rng) for fact in rng.sample(_FACTS, n_turns)]

