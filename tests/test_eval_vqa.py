"""VQA accuracy: the EvalAI normalisation table, hand-computed leave-one-out scores, TextVQA items and prompts."""

from __future__ import annotations

import json

import pytest

from vlmablate.eval.vqa import VqaItem, normalize_answer, read_textvqa_json, vqa_metrics, vqa_prompt, vqa_score


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),  # number words become digits
    ("ten", "10"),
    ("none", "0"),  # the official number map has none -> 0
    ("the cat.", "cat"),  # final period dropped, article dropped
    ("A Dog", "dog"),
    ("an apple", "apple"),
    ("a", ""),
    ("dont", "don't"),  # contraction restored
    ("isnt it", "isn't it"),
    ("3.5", "3.5"),  # a period before a digit stays
    ("5.", "5"),
    ("e.g.", "eg"),
    ("yes!", "yes"),  # '!' touches no space: replaced by a space, then collapsed
    ("what?", "what"),  # '?' is deleted up front
    ("1,000", "1000"),  # ',' is deleted up front
    ("hello-world", "hello world"),  # '-' touches no space: becomes a space
    ("hello - world", "hello world"),  # '-' touches a space: deleted
    ("(red)", "red"),
    ("red (dark)", "red dark"),  # ' (' deletes '('; ')' touches no space, so it becomes a space
    ("  Stop\tSign\n", "stop sign"),
    ("man's hat", "man 's hat"),  # possessive split off, as the EvalAI processor does
    ("NO", "no"),
    ("." * 40, "." * 8),  # the official period regex removes at most 32 (re.UNICODE passed as count)
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_score_leave_one_out_by_hand():
    others = ["no"] * 10
    assert vqa_score("yes", ["yes"] * 10) == 1.0
    assert vqa_score("Yes.", ["yes"] * 10) == 1.0  # both sides normalised
    # 2 of 10 match. Leaving out a matching answer leaves 1 match among 9 -> 1/3 (2 such subsets);
    # leaving out another leaves 2 -> 2/3 (8 subsets). Mean: (2 * 1/3 + 8 * 2/3) / 10 = 18/30 = 0.6.
    assert vqa_score("yes", ["yes"] * 2 + others[:8]) == pytest.approx(0.6)
    # 1 of 10: (1 * 0 + 9 * 1/3) / 10 = 0.3.
    assert vqa_score("yes", ["yes"] + others[:9]) == pytest.approx(0.3)
    # 3 of 10: (3 * 2/3 + 7 * 1) / 10 = 0.9.
    assert vqa_score("yes", ["yes"] * 3 + others[:7]) == pytest.approx(0.9)
    # 4 of 10: every subset keeps >= 3 matches -> 1.0.
    assert vqa_score("two", ["2"] * 4 + others[:6]) == 1.0
    assert vqa_score("maybe", others) == 0.0
    with pytest.raises(ValueError):
        vqa_score("yes", [])


def _write_json(tmp_path, data):
    path = tmp_path / "textvqa.json"
    path.write_text(json.dumps({"dataset_name": "textvqa", "data": data}), encoding="utf-8")
    return path


def test_read_textvqa_json(tmp_path):
    path = _write_json(tmp_path, [
        {"question_id": 7, "question": "what brand?", "answers": ["nikon"] * 10, "image_id": "abc",
         "ocr_tokens": ["NIKON", "D40"]},
        {"question_id": 8, "question": "what year?", "image_id": "def", "image": "sub/def.png"},
    ])
    items = read_textvqa_json(path, image_root=tmp_path / "imgs")
    assert items == [
        VqaItem(7, "what brand?", ["nikon"] * 10, str(tmp_path / "imgs" / "abc.jpg"), "abc", ["NIKON", "D40"]),
        VqaItem(8, "what year?", [], str(tmp_path / "imgs" / "sub" / "def.png"), "def", []),
    ]
    assert read_textvqa_json(path)[0].image == "abc.jpg"


@pytest.mark.parametrize("data, message", [
    ([{"question": "q", "answers": []}], r"item 0: question_id must be an integer"),
    ([{"question_id": 1, "question": ""}], r"item 0 \(question_id 1\): question must be"),
    ([{"question_id": 1, "question": "q", "answers": "yes"}], r"answers must be a list of strings"),
    ([{"question_id": 1, "question": "q"}, {"question_id": 1, "question": "r"}], r"item 1: duplicate question_id 1"),
])
def test_read_textvqa_json_errors_name_file_and_item(tmp_path, data, message):
    path = _write_json(tmp_path, data)
    with pytest.raises(ValueError, match=message) as err:
        read_textvqa_json(path)
    assert str(path) in str(err.value)


def test_vqa_prompt_records_whether_ocr_was_given():
    item = VqaItem(1, "what is written?", [], None, None, ["STOP", "sign"])
    assert vqa_prompt(item, use_ocr=True) == (
        "what is written?\nReference OCR token: STOP, sign\nAnswer the question using a single word or phrase.", True)
    assert vqa_prompt(item, use_ocr=False) == (
        "what is written?\nAnswer the question using a single word or phrase.", False)
    no_tokens = VqaItem(2, "what is written?", [], None, None, [])
    assert vqa_prompt(no_tokens, use_ocr=True)[1] is False


def test_vqa_metrics():
    m = vqa_metrics([1.0, 0.6, 0.3, 0.0], n_boot=300, seed=0)
    assert m["vqa_acc"] == pytest.approx(0.475) and m["n"] == 4
    assert m["ci"][0] <= 0.475 <= m["ci"][1]
    assert vqa_metrics([1.0] * 5)["ci"] == [1.0, 1.0]
    assert vqa_metrics([]) == {"vqa_acc": None, "ci": [None, None], "n": 0}
