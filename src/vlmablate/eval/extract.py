"""Answer extraction without an LLM judge: VLMEvalKit's "exact matching" (`can_infer`) for MMBench replies.

The rule, as in VLMEvalKit's `vlmeval/utils/matching_util.py`:

1. A reply containing one of VLMEvalKit's refusal phrases is a refusal (VLMEvalKit's 'Z').
2. Letters: replace each of `. ( ) [ ] , : ; ! * # { }` by a space and split on whitespace. If
   exactly one of the *present* options' letters appears as a whole token, that is the answer.
   Letters are case-sensitive ("a" is not A) and nothing checks whether "A" is an article ("A dog"
   picks A; VLMEvalKit only logs that case in verbose mode). When no option letter appears but a
   bare "Z" does, VLMEvalKit returns 'Z' and stops.
3. Text: otherwise (no letter, or several) — unless the lower-cased reply is longer than twice the
   options' total length — if exactly one option's lower-cased text is a substring of the
   lower-cased reply, that option.
4. Anything else is unparsed.

Refusals, 'Z' and unparsed replies all come back as None: under exact matching VLMEvalKit scores
them the same way (wrong). The reply is stripped first, as VLMEvalKit's vanilla path does.
VLMEvalKit has changed this heuristic over time: older revisions have no length limit in step 3,
and revisions from mid-2025 also require the letter to be among the last tokens. We follow the
rule in REFERENCE.md (letter anywhere, length limit on); for LLaVA-style one-letter replies all
revisions agree.
"""

from __future__ import annotations

_STRIPPED_CHARS = ".()[],:;!*#{}"
_TO_SPACES = str.maketrans({ch: " " for ch in _STRIPPED_CHARS})
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)


def extract_choice(reply: str, options: dict[str, str]) -> str | None:
    """The option letter a free-form reply chooses, or None when it cannot be told (counts as wrong)."""
    reply = str(reply).strip()
    if any(phrase in reply for phrase in REFUSALS):
        return None
    tokens = set(reply.translate(_TO_SPACES).split())
    letters = [letter for letter in options if letter in tokens]
    if len(letters) == 1:
        return letters[0]
    if not letters and "Z" in tokens:
        return None
    return _match_text(reply, options)


def _match_text(reply: str, options: dict[str, str]) -> str | None:
    """The one option whose text the reply contains; long replies are not trusted to mean one option."""
    reply = reply.lower()
    if len(reply) > 2 * sum(len(text) for text in options.values()):
        return None
    hits = [letter for letter, text in options.items() if text.lower() in reply]
    return hits[0] if len(hits) == 1 else None
