"""Differential test of answer extraction: `vlmablate.eval.extract` against a second implementation.

The second implementation below is written from the documented rule (REFERENCE.md, README:
Evaluation, and Python's documentation of `str.split`, `str.isspace` and `re.IGNORECASE`), not from
the first: it scans characters instead of translating and splitting, finds "answer is X" with a hand
written matcher instead of a regular expression, and measures lengths character by character. Both
are run on generated replies built to sit on every boundary of the rule (letters in and out of the
last four tokens, separators, Unicode whitespace, the four non-ASCII letters that `re.IGNORECASE`
folds onto ASCII, the API-failure marker, refusals, replies at exactly twice the options' length,
replies that pandas reads back as a missing value),
for every `eval.extraction` revision. Any disagreement is printed.

    python benchmarks/extraction_differential.py --replies 100000 --seed 0
"""

from __future__ import annotations

import argparse
import random
import string
import sys
import time
from collections import Counter

from vlmablate.eval.extract import EXTRACTIONS, infer_choice

# ----------------------------------------------------------------------------- the second implementation

MARKER = "Failed to obtain answer via API"
REFUSAL_PHRASES = ["Sorry, I can't help with images of people yet.", "I can't process this file.",
                   "I'm sorry, but without the image provided", "Cannot determine the answer"]
SEPARATORS = set(".()[],:;!*#{}")
# re.IGNORECASE with str patterns: ASCII letters match either case, and four non-ASCII letters match
# ASCII ones (Python's `re` documentation): dotted and dotless i, long s, and the Kelvin sign.
FOLDS = {"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"}
VERSIONS = {  # (letter among the last N tokens or anywhere, length limit on text matching, "answer is")
    "vlmevalkit_aca64dbb": (None, False, False),
    "vlmevalkit_c3371551": (4, True, False),
    "vlmevalkit_a67ace50": (4, True, True),
}


def words(reply: str) -> list[str]:
    """Whitespace (str.isspace) and the 13 separator characters end a word; empty words vanish."""
    out, current = [], ""
    for ch in reply:
        if ch.isspace() or ch in SEPARATORS:
            if current:
                out.append(current)
            current = ""
        else:
            current += ch
    if current:
        out.append(current)
    return out


def _fold(ch: str) -> str:
    if ch in FOLDS:
        return FOLDS[ch]
    return ch.lower() if ch.isascii() else ch


def _literal_at(text: str, i: int, word: str) -> int | None:
    """End of `word` matched case-insensitively at i, or None."""
    if i + len(word) > len(text):
        return None
    for k, want in enumerate(word):
        if _fold(text[i + k]) != want:
            return None
    return i + len(word)


def _spaces_at(text: str, i: int) -> int | None:
    """End of one or more whitespace characters at i, or None."""
    j = i
    while j < len(text) and text[j].isspace():
        j += 1
    return j if j > i else None


def answer_is_letter(reply: str) -> str | None:
    """The letter of the leftmost "answer <ws> is <ws> *... X" (X in a-d, either case), upper-cased."""
    for start in range(len(reply)):
        j = _literal_at(reply, start, "answer")
        j = None if j is None else _spaces_at(reply, j)
        j = None if j is None else _literal_at(reply, j, "is")
        j = None if j is None else _spaces_at(reply, j)
        if j is None:
            continue
        while j < len(reply) and reply[j] == "*":
            j += 1
        if j < len(reply) and _fold(reply[j]) in "abcd" and reply[j].isascii():
            return reply[j].upper()
        # The stars could give some back, but a star is not a letter: nothing else can match here.
    return None


def pandas_missing() -> set[str]:
    """The cells pandas' readers take for a missing value by default (read_csv's and read_excel's `na_values`),
    asked of the installed pandas: every revision reads its predictions back through one and scores
    `str(value)`, so such a reply is scored as the text "nan"."""
    from pandas._libs.parsers import STR_NA_VALUES

    return set(STR_NA_VALUES)


MISSING = pandas_missing()


def reference_choice(reply: str, options: dict[str, str], version: str) -> str | None:
    """A letter, 'Z' or None, as the documented rule of `version` says."""
    window, length_limit, answer_is = VERSIONS[version]
    if reply in MISSING:  # exact cell text only: case and surrounding spaces keep it a string
        reply = str(float("nan"))
    if MARKER not in reply:
        if any(reply.find(p) >= 0 for p in REFUSAL_PHRASES):
            return "Z"
        toks = words(reply)
        seen = {letter: toks.index(letter) for letter in options if letter in toks}
        if len(seen) == 1:
            (letter, first), = seen.items()
            last_ones = len(toks) - first  # 1 when it is the last token
            if window is None or last_ones <= window:
                return letter
        elif not seen and toks.count("Z") > 0:
            return "Z"
        if answer_is:
            letter = answer_is_letter(reply)
            if letter is not None and letter in options:
                return letter
    low = "".join(ch.lower() for ch in reply)
    total = 0
    for text in options.values():
        total += len(text)
    if length_limit and len(low) > total * 2:
        return None
    found = [letter for letter in sorted(options) if low.find(options[letter].lower()) != -1]
    return found[0] if len(found) == 1 else None


# ----------------------------------------------------------------------------- generated replies

TEXTS = ["an", "red", "blue", "dark red", "a cat", "dog", "cat", "yes", "no", "A", "b", "the left one", "2", "12",
         "U.S.", "İstanbul", "straße", "Answer is B", "none of these", "(C)", "a", "is", "Red", "kelvin", "sky", "ſun"]
LETTER_FORMS = ["{L}", "({L})", "[{L}]", "{{{L}}}", "**{L}**", "{L}.", "{L}:", "{L},", "{L})", "#{L}", "{l}", "'{L}'",
                "{L}-", "Option {L}", "{L}!", "<{L}>", "\"{L}\""]
FILLERS = ["the", "answer", "is", "I", "think", "it", "a", "an", "of", "option", "correct", "image", "shows", "so",
           "Answer:", "ANSWER", "Is", "probably", "not", "sure", "both", "and", "or", "Z", "z", "E", "F", "AB",
           "anſwer", "İs", "ıs", "Kelvin", "**", "*", "The answer is", "answer is", "answer  is", "correct answer is",
           "The correct answer is **", "answer\tis", "answer\nis", "answer\xa0is", "answeris", "answer is:",
           "Failed to obtain answer", MARKER, *REFUSAL_PHRASES, "Cannot determine", "I can't process this"]
GAPS = [" ", " ", " ", "", "\n", "\t", "  ", "\xa0", "\u2003", "\x1c", "\x85", ". ", ", ", "/", "-", ":", "; ", "*",
        "(", ")", "**"]
EXTRA = ["İ", "ı", "ſ", "\u212a", "é", "Σ", "ǅ", "ﬁ"]


def random_options(rng: random.Random) -> dict[str, str]:
    n = rng.choice([2, 2, 3, 4, 4, 4, 5])
    texts = rng.sample(TEXTS, n)
    return {string.ascii_uppercase[i]: text for i, text in enumerate(texts)}


def _piece(rng: random.Random, options: dict[str, str]) -> str:
    kind = rng.random()
    if kind < 0.35:
        letter = rng.choice(list(options) + ["A", "B", "C", "D", "E", "Z"])
        return rng.choice(LETTER_FORMS).format(L=letter, l=letter.lower())
    if kind < 0.55:
        text = rng.choice(list(options.values()) + TEXTS[:6])
        return rng.choice([text, text.upper(), text.title(), text.lower()])
    if kind < 0.95:
        return rng.choice(FILLERS)
    return rng.choice(EXTRA)


def random_reply(rng: random.Random, options: dict[str, str]) -> str:
    if rng.random() < 0.03:  # a reply a spreadsheet reader takes for a missing value, or nearly
        spelling = rng.choice(sorted(MISSING))
        return rng.choice([spelling, spelling, spelling.lower(), spelling.upper(), f" {spelling}", f"{spelling}."])
    n = rng.choice([1, 1, 1, 2, 2, 3, 4, 5, 6, 8, 12])
    reply = "".join(_piece(rng, options) + rng.choice(GAPS) for _ in range(n))
    if rng.random() < 0.5:
        reply = reply.strip()
    if rng.random() < 0.15:  # sit on the text-length boundary: exactly 2x the options' length, or one more
        limit = 2 * sum(len(t) for t in options.values())
        reply = (reply + " " * limit)[:limit + rng.choice([-1, 0, 0, 1])]
    return reply


def generate(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        options = random_options(rng)
        yield random_reply(rng, options), options


# ----------------------------------------------------------------------------- the comparison


def compare(n: int, seed: int, *, show: int = 10) -> dict:
    """Run both implementations over n generated replies for every revision; count outcomes and disagreements."""
    report = {"replies": n, "seed": seed, "versions": {}}
    outcomes = {v: Counter() for v in EXTRACTIONS}
    disagreements = {v: [] for v in EXTRACTIONS}
    between_versions = Counter()
    for reply, options in generate(n, seed):
        ours = {}
        for version in EXTRACTIONS:
            got, want = infer_choice(reply, options, version), reference_choice(reply, options, version)
            ours[version] = got
            outcomes[version]["letter" if got in options else "Z" if got == "Z" else "unparsed"] += 1
            if got != want:
                disagreements[version].append((reply, options, got, want))
        names = list(EXTRACTIONS)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                between_versions[f"{a} vs {b}"] += ours[a] != ours[b]
    for version in EXTRACTIONS:
        report["versions"][version] = {"agree": n - len(disagreements[version]),
                                       "disagree": len(disagreements[version]),
                                       "outcomes": dict(outcomes[version]),
                                       "examples": disagreements[version][:show]}
    report["versions_differ"] = dict(between_versions)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report = compare(args.replies, args.seed)
    print(f"{args.replies:,} generated replies (seed {args.seed}), {time.perf_counter() - start:.1f} s")
    for version, r in report["versions"].items():
        print(f"  {version}: agree {r['agree']:,} / {args.replies:,}, disagree {r['disagree']}; "
              f"outcomes {r['outcomes']}")
        for reply, options, got, want in r["examples"]:
            print(f"    reply={reply!r} options={options} ours={got!r} reference={want!r}")
    for pair, count in report["versions_differ"].items():
        print(f"  {pair}: differ on {count:,} replies ({count / args.replies:.1%})")
    return 0 if all(r["disagree"] == 0 for r in report["versions"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
