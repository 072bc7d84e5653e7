"""Answer extraction pinned to named VLMEvalKit revisions: crafted replies with their outcome under each
revision, written out by hand, and a differential run against the second implementation in
benchmarks/extraction_differential.py (the benchmark runs the same comparison on 100k replies)."""

from __future__ import annotations

import pytest

from vlmablate.config import EvalConfig
from vlmablate.eval.extract import DEFAULT_EXTRACTION, EXTRACTIONS, extract_choice, infer_choice

from conftest import load_benchmark

OLD, AUG25, JUN26 = "vlmevalkit_aca64dbb", "vlmevalkit_c3371551", "vlmevalkit_a67ace50"
FOUR = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}  # 18 characters: text matching up to 36
YES_NO = {"A": "yes", "B": "no"}
PETS = {"A": "cat", "B": "dog"}  # 6 characters: text matching up to 12
MARKER = "Failed to obtain answer via API."

# (reply, options, outcome under aca64dbb, c3371551, a67ace50): a letter, 'Z' (no option) or None.
CASES = [
    ("A", FOUR, "A", "A", "A"),
    ("A.", FOUR, "A", "A", "A"),
    ("(B)", FOUR, "B", "B", "B"),
    ("[A]", FOUR, "A", "A", "A"),
    ("{D}", FOUR, "D", "D", "D"),
    ("**C**", FOUR, "C", "C", "C"),
    ("answer: B;", FOUR, "B", "B", "B"),
    ("The answer is C", FOUR, "C", "C", "C"),  # C is the last of 4 tokens
    ("B. red", FOUR, "B", "B", "B"),  # the letter decides before any text
    ("a", FOUR, None, None, None),  # letters are case-sensitive
    ("A or B", FOUR, None, None, None),  # two letters, no option text
    ("A or B: blue", FOUR, "B", "B", "B"),  # two letters, so the text decides
    ("Red.", FOUR, "A", "A", "A"),  # text matching is case-insensitive
    ("red or blue", FOUR, None, None, None),  # two option texts
    ("dark red", {"A": "red", "B": "dark red"}, None, None, None),  # both texts are substrings
    ("E", FOUR, None, None, None),  # not an option
    ("C", YES_NO, None, None, None),  # only the present options' letters count
    ("yes", YES_NO, "A", "A", "A"),
    ("Z", FOUR, "Z", "Z", "Z"),
    ("Z: red", FOUR, "Z", "Z", "Z"),  # 'Z' is final: no text matching
    ("Cannot determine the answer. A", FOUR, "Z", "Z", "Z"),  # a refusal phrase
    ("", FOUR, None, None, None),
    # Where the revisions part. A letter outside the last 4 tokens (first occurrence counts):
    ("A dog is sitting on the mat", FOUR, "A", None, None),
    ("I choose B because the image shows it", FOUR, "B", None, None),
    ("B B B B B", FOUR, "B", None, None),
    ("so it is B", FOUR, "B", "B", "B"),  # B is the 4th token from the end
    # The length limit on text matching: 47 characters > 2 x 18.
    ("The car is painted a deep shade of red overall", FOUR, "A", None, None),
    ("it is a cat!", PETS, "A", "A", "A"),  # 12 characters: at the limit
    ("it is a cat!!", PETS, "A", None, None),  # 13: over it
    # "answer is X": case-insensitive, no word boundary, the leftmost match only.
    ("Answer is b", FOUR, None, None, "B"),
    ("the answer is C, not A", FOUR, None, None, "C"),
    ("The answer is dog", FOUR, None, None, "D"),  # d-og: no word boundary
    ("ANSWER IS **A** since the sky looks that way", FOUR, "A", None, "A"),
    ("answer is D", {"A": "x", "B": "y", "C": "z"}, None, None, None),  # D is not an option
    ("answer is E", FOUR, None, None, None),  # only A-D are in the pattern
    ("answer is D, or maybe the answer is B though I'm not sure of it at all", YES_NO, "B", None, None),  # D decides
    # The API-failure marker: no letter, no "answer is"; text matching still runs.
    (f"{MARKER} A", FOUR, None, None, None),
    (f"{MARKER} The answer is B", FOUR, None, None, None),
    (f"{MARKER} Z", FOUR, None, None, None),
    (f"{MARKER} B", {"A": "answer via API", "B": "an entirely different one"}, "A", "A", "A"),  # in the marker
]


IDS = [repr(case[0])[:40] for case in CASES]
CASES = [(reply, options, list(expected)) for reply, options, *expected in CASES]


@pytest.mark.parametrize("reply, options, expected", CASES, ids=IDS)
def test_outcome_under_each_revision(reply, options, expected):
    assert [infer_choice(reply, dict(options), v) for v in (OLD, AUG25, JUN26)] == expected
    # extract_choice is what gets scored: 'Z' and unparsed are both None (wrong).
    assert [extract_choice(reply, options, v) for v in (OLD, AUG25, JUN26)] == \
        [e if e in options else None for e in expected]


@pytest.mark.parametrize("reply, options, expected", CASES, ids=IDS)
def test_second_implementation_gives_the_same_crafted_outcomes(reply, options, expected):
    reference = load_benchmark("extraction_differential").reference_choice
    assert [reference(reply, options, v) for v in (OLD, AUG25, JUN26)] == expected


def test_a_letter_after_the_api_failure_marker_is_never_accepted():
    for version in EXTRACTIONS:
        for letter in "ABCD":
            for reply in (f"{MARKER} {letter}", f"{letter} {MARKER}", f"{MARKER}\nThe answer is {letter}"):
                assert infer_choice(reply, FOUR, version) is None, (version, reply)


def test_differential_agreement_on_generated_replies():
    bench = load_benchmark("extraction_differential")
    report = bench.compare(5_000, seed=7, show=3)
    assert {v: r["disagree"] for v, r in report["versions"].items()} == {v: 0 for v in EXTRACTIONS}, report
    # The generated replies reach the rules' boundaries: the revisions disagree on a real share of them.
    assert report["versions_differ"][f"{OLD} vs {AUG25}"] > 250
    assert report["versions_differ"][f"{AUG25} vs {JUN26}"] > 25
    assert all(set(r["outcomes"]) == {"letter", "Z", "unparsed"} for r in report["versions"].values())


def test_the_comparison_sees_a_changed_rule(monkeypatch):
    """A one-token change of the window (last 5 instead of last 4) is caught by the differential run."""
    from dataclasses import replace

    from vlmablate.eval import extract

    bench = load_benchmark("extraction_differential")
    monkeypatch.setitem(extract.EXTRACTIONS, AUG25, replace(extract.EXTRACTIONS[AUG25], letter_window=5))
    report = bench.compare(2_000, seed=7, show=0)
    assert report["versions"][AUG25]["disagree"] > 0
    assert report["versions"][OLD]["disagree"] == 0


def test_default_and_config_name_the_revision():
    assert DEFAULT_EXTRACTION == JUN26 == EvalConfig().extraction
    assert list(EXTRACTIONS) == [OLD, AUG25, JUN26]
    with pytest.raises(ValueError, match="extraction='vlmevalkit_latest' is not one of vlmevalkit_aca64dbb"):
        infer_choice("A", FOUR, "vlmevalkit_latest")
