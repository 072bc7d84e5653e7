"""Answer extraction without an LLM judge: VLMEvalKit's exact matching (`can_infer`), pinned to a named revision.

VLMEvalKit has changed its heuristic over time, and the revisions disagree on free-form replies, so
`eval.extraction` names the revision whose rule is followed (docs/evaluation.md). What every revision
does, in order, for a reply and the question's *present* options:

1. A reply containing "Failed to obtain answer via API" skips every letter rule (steps 2-4).
2. A reply containing one of the refusal phrases below is VLMEvalKit's 'Z' (no option), final.
3. Letters: each of `. ( ) [ ] , : ; ! * # { }` becomes a space and the reply is split on whitespace.
   If exactly one option letter appears as a whole token (case-sensitive: "a" is not A), that letter
   is the answer -- from c3371551 on only when its first occurrence is among the last 4 tokens.
   If no option letter appears but a bare "Z" token does, the result is 'Z', final.
4. From a67ace50 on: the first match of `answer\\s+is\\s+\\**([ABCD])`, case-insensitive and without a
   word boundary ("The answer is dog" picks D), gives its letter if that letter is an option.
   (VLMEvalKit's pattern also allows "correct " before and stars after; neither changes the match.)
5. Text: if exactly one option's lower-cased text is a substring of the lower-cased reply, that
   option -- from c3371551 on only when the lower-cased reply is at most twice as long as the
   options' texts together.
6. Anything else is unparsed.

Before any of this, the reply goes through VLMEvalKit's prediction file: it is written to an xlsx and read
back with pandas, whose `read_excel` (and `read_csv`) turn a cell that is exactly one of pandas' default NaN
spellings (`PANDAS_NA`: "", "None", "N/A", "NA", "nan", "null", ...; case and surrounding whitespace count,
so "none" and " None" are text) into NaN, and every revision's MCQ evaluation then takes `str(prediction)`:
the reply becomes the text "nan". It is then extracted as above: no letter token, so unparsed unless exactly
one option's text is inside "nan" (an option "an" is chosen; "no" is not inside it).

VLMEvalKit also rejects a lone letter "A" in a reply of more than 3 tokens as a possible article, but
only when its VERBOSE environment variable is set; by default it does not, and neither do we.
Under exact matching VLMEvalKit scores 'Z' and unparsed replies alike (wrong): `extract_choice`
returns None for both, `infer_choice` keeps them apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

API_FAILURE = "Failed to obtain answer via API"
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
NO_OPTION = "Z"
# pandas' default NaN spellings (`pandas._libs.parsers.STR_NA_VALUES`, pandas >= 2.0; checked against 3.1),
# matched exactly; a NaN prediction reaches VLMEvalKit's `can_infer` as str(nan).
PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                       "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
PANDAS_NA_TEXT = "nan"
_TO_SPACES = str.maketrans(dict.fromkeys(".()[],:;!*#{}", " "))
_ANSWER_IS = re.compile(r"answer\s+is\s+\**([ABCD])", re.IGNORECASE)


@dataclass(frozen=True)
class Extraction:
    """One VLMEvalKit revision's exact-matching rule: the three switches its history flipped."""

    name: str
    letter_window: int | None  # the one letter must be among the last N tokens; None: anywhere
    text_length_limit: bool  # text matching only for replies at most twice the options' total length
    answer_is: bool  # the "answer is X" pattern when the letter rule finds nothing
    describes: str


EXTRACTIONS = {e.name: e for e in (
    Extraction("vlmevalkit_aca64dbb", None, False, False,
               "VLMEvalKit up to commit aca64dbb: the one option letter anywhere; text matching at any length"),
    Extraction("vlmevalkit_c3371551", 4, True, False,
               "VLMEvalKit from commit c3371551 (Aug 2025): the one option letter among the last 4 tokens; "
               "text matching only for replies at most twice the options' total length"),
    Extraction("vlmevalkit_a67ace50", 4, True, True,
               "VLMEvalKit from commit a67ace50 (Jun 2026): as c3371551, plus 'answer is X' (case-insensitive)"),
)}
# VLMEvalKit's current rule: what a user running its exact matching today gets.
DEFAULT_EXTRACTION = "vlmevalkit_a67ace50"


def extraction_rule(name: str) -> Extraction:
    if name not in EXTRACTIONS:
        raise ValueError(f"extraction={name!r} is not one of {', '.join(EXTRACTIONS)}")
    return EXTRACTIONS[name]


def infer_choice(reply: str, options: dict[str, str], extraction: str = DEFAULT_EXTRACTION) -> str | None:
    """VLMEvalKit's outcome for a reply: an option letter, 'Z' (a refusal, or no option), or None (unparsed)."""
    rule = extraction_rule(extraction)
    reply = str(reply)
    # The prediction file's round trip through pandas (see the module docstring).
    reply = PANDAS_NA_TEXT if reply in PANDAS_NA else reply
    choice = None if API_FAILURE in reply else _by_letter(reply, options, rule)
    return choice or _by_text(reply, options, rule)


def extract_choice(reply: str, options: dict[str, str], extraction: str = DEFAULT_EXTRACTION) -> str | None:
    """The option letter a reply chooses, or None when it chooses none (refusal, 'Z', unparsed: all wrong)."""
    choice = infer_choice(reply, options, extraction)
    return choice if choice in options else None


def _by_letter(reply: str, options: dict[str, str], rule: Extraction) -> str | None:
    if any(phrase in reply for phrase in REFUSALS):
        return NO_OPTION
    tokens = reply.translate(_TO_SPACES).split()
    present = [letter for letter in options if letter in tokens]
    if len(present) == 1:
        letter = present[0]
        if rule.letter_window is None or tokens.index(letter) >= len(tokens) - rule.letter_window:
            return letter
    elif not present and NO_OPTION in tokens:
        return NO_OPTION
    if rule.answer_is:
        match = _ANSWER_IS.search(reply)
        if match and match.group(1).upper() in options:
            return match.group(1).upper()
    return None


def _by_text(reply: str, options: dict[str, str], rule: Extraction) -> str | None:
    """The one option whose text the reply contains; long replies are not trusted to mean one option."""
    reply = reply.lower()
    if rule.text_length_limit and len(reply) > 2 * sum(len(text) for text in options.values()):
        return None
    hits = [letter for letter, text in options.items() if text.lower() in reply]
    return hits[0] if len(hits) == 1 else None
