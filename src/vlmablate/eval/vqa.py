"""VQA accuracy (TextVQA, VQAv2): answer normalisation, the leave-one-out score, TextVQA items and prompts.

Normalisation is the EvalAI answer processor that LLaVA-1.5's TextVQA evaluator
(`llava/eval/m4c_evaluator.py`, from MMF) applies to the prediction and to every human answer alike:

1. lower-case; delete `,` and `?`; split a possessive `'s` off (`man's` -> `man 's`); strip;
2. newlines and tabs become spaces; strip;
3. punctuation `; / [ ] " { } ( ) = + \\ _ - > < @ \\` , ? !`: each character is deleted when the text
   (as it was before this step) has it next to a space, else replaced by a space. The official
   rule also deletes when the text has a digit-comma-digit; step 1 has already removed every comma,
   so that condition can never hold here and is not checked;
4. periods not followed by a digit are deleted (`3.5` stays, `5.` -> `5`). The official regex means
   "not between digits" but its look-behind is written as a look-ahead, so only the next character
   counts; and it passes `re.UNICODE` where `re.sub` expects a count, so at most 32 periods go.
   Both quirks are kept: the published numbers were computed with them;
5. words: number words none/zero..ten become digits, articles a/an/the are dropped, contractions
   missing their apostrophe are restored (`dont` -> `don't`), words joined by single spaces.

The official VQAv2 script (`vqaEval.py`) differs in two ways that we do not copy: it has no step 1,
and it skips steps 3-5 for a question whose ten human answers are all identical (so there "Yes" does
not match ten "yes"). For TextVQA, LLaVA-1.5's evaluator is the reference, and it is the above.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from vlmablate.eval.metrics import bootstrap_ci

MATCHES_FOR_FULL_CREDIT = 3
OCR_PREFIX = "Reference OCR token: "
VQA_INSTRUCTION = "Answer the question using a single word or phrase."

_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!"]
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIODS_REMOVED = int(re.UNICODE)  # 32: the official code's accidental `count` argument
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# The official contractions table, entry for entry (`word=restored`), quirks included: "somebody'd"
# maps to "somebodyd", and the capitalised keys (Id've, Im, ...) can never match lower-cased text.
_CONTRACTIONS = dict(pair.split("=", 1) for pair in """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
    howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
    itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
    mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
    neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
    'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
    shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
    somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
    someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
    someones=someone's somethingd=something'd somethingd've=something'd've
    something'dve=something'd've somethingll=something'll thats=that's thered=there'd
    thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
    theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
    wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
    whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
    whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
    whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
    wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
    yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
    you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())


def normalize_answer(text: str) -> str:
    """The EvalAI/VQA normalisation of one answer (steps 1-5 of the module docstring)."""
    text = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    return _normalize_words(text)


def _strip_punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        # The test looks at the text as it came in, not as earlier replacements left it.
        out = out.replace(p, "" if (p + " " in text or " " + p in text) else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_REMOVED)


def _normalize_words(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_score(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one prediction: the mean, over leaving out each human answer in turn, of
    min(1, matches among the others / 3), everything normalised first."""
    if not answers:
        raise ValueError("vqa_score needs at least one human answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    matches = sum(gt == pred for gt in gts)
    # Leaving out a matching answer leaves matches - 1 among the others; leaving out any other, matches.
    per_subset = [min(1.0, (matches - (gt == pred)) / MATCHES_FOR_FULL_CREDIT) for gt in gts]
    return sum(per_subset) / len(per_subset)


@dataclass
class VqaItem:
    """One TextVQA-style question; `image` is a path (joined to the image root when one is given)."""

    question_id: int
    question: str
    answers: list[str]
    image: str | None
    image_id: str | None
    ocr_tokens: list[str] = field(default_factory=list)


def read_textvqa_json(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None) -> list[VqaItem]:
    """Read the TextVQA layout `{"data": [{question_id, question, answers, image_id, ocr_tokens?, image?}]}`.

    `answers` may be absent (the test split: an empty list). The image is the item's `image`, else
    `{image_id}.jpg` (TextVQA's file naming), joined to `image_root` when given.
    """
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the VQA file: {err}") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise ValueError(f"{path}: expected an object with a 'data' list (the TextVQA layout)")
    items, seen = [], set()
    for i, raw in enumerate(payload["data"]):
        item = _parse_item(raw, f"{path} item {i}", image_root)
        if item.question_id in seen:
            raise ValueError(f"{path} item {i}: duplicate question_id {item.question_id}")
        seen.add(item.question_id)
        items.append(item)
    return items


def _parse_item(raw, where: str, image_root) -> VqaItem:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
    qid = raw.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, int):
        raise ValueError(f"{where}: question_id must be an integer, got {qid!r}")
    where = f"{where} (question_id {qid})"
    if not isinstance(raw.get("question"), str) or not raw["question"].strip():
        raise ValueError(f"{where}: question must be a non-empty string")
    answers = _string_list(raw.get("answers", []), "answers", where)
    ocr_tokens = _string_list(raw.get("ocr_tokens", []), "ocr_tokens", where)
    image_id = None if raw.get("image_id") is None else str(raw["image_id"])
    image = raw.get("image")
    if image is not None and not isinstance(image, str):
        raise ValueError(f"{where}: image must be a path string, got {image!r}")
    if image is None and image_id is not None:
        image = f"{image_id}.jpg"
    if image is not None and image_root is not None:
        image = str(Path(image_root) / image)
    return VqaItem(question_id=qid, question=raw["question"], answers=answers, image=image,
                   image_id=image_id, ocr_tokens=ocr_tokens)


def _string_list(value, name: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ValueError(f"{where}: {name} must be a list of strings")
    return list(value)


def vqa_prompt(item: VqaItem, *, use_ocr: bool) -> tuple[str, bool]:
    """LLaVA-1.5's TextVQA prompt (without `<image>`) and whether OCR tokens were given in it."""
    ocr_given = use_ocr and bool(item.ocr_tokens)
    lines = [item.question]
    if ocr_given:
        lines.append(OCR_PREFIX + ", ".join(item.ocr_tokens))
    lines.append(VQA_INSTRUCTION)
    return "\n".join(lines), ocr_given


def vqa_metrics(scores: list[float], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean VQA accuracy over questions with a 95% bootstrap interval."""
    return {
        "vqa_acc": sum(scores) / len(scores) if scores else None,
        "ci": bootstrap_ci(scores, n_boot=n_boot, seed=seed),
        "n": len(scores),
    }
