"""MMBench evaluation: TSV reading and circular copies, splits, image cells, prompts, the test split's
submission file, CircularEval metrics (answer extraction: test_eval_extraction.py).

Every expectation is written out by hand: the rotations MMBench makes, the error texts naming file,
row and index, the submission table, and the accuracies of small crafted result sets.
"""

from __future__ import annotations

import base64
import csv
import io
import logging

import pytest
from PIL import Image

from vlmablate.eval.metrics import Record, bootstrap_ci, circular_metrics, paired_difference
from vlmablate.eval.mmbench import Copy, Question, decode_image, prompt_text, read_mmbench_tsv
from vlmablate.eval.submission import write_submission


def _png_b64(color, mode="RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, (4, 4), color).save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    assert len(text) > 64  # otherwise the reader would take it for a row reference
    return text


IMG = {0: _png_b64((255, 0, 0)), 1: _png_b64((0, 255, 0)), 2: _png_b64((0, 0, 255))}
HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image",
          "split", "source"]
Q0 = "What color is the car?"
Q1 = 'Is it "raining"?\nAnswer honestly.'  # quoted in the file: it holds a newline
Q2 = "Which animal is shown?"
MAINS = [
    [0, Q0, "Look closely.", "red", "blue", "green", "yellow", "B", "color", "attribute_reasoning", IMG[0], "dev", "s"],
    [1, Q1, "none", "yes", "no", "nan", "", "A", "weather", "coarse_perception", IMG[1], "dev", "s"],
    [2, Q2, "", "cat", "dog", "bird", "None", "C", "animal", "coarse_perception", IMG[2], "dev", "s"],
    # Its image is a short reference: the index of the row that holds it.
    [3, "Is it day?", "NaN", "day", "night", "", "", "A", "time", "coarse_perception", "2", "dev", "s"],
]
# Copies as MMBench stores them: options shifted left by k, answer remapped, image by reference.
COPIES = [
    [2000000, Q0, "Look closely.", "green", "yellow", "red", "blue", "D", "color", "attribute_reasoning", "0", "dev",
     "s"],
    [1000000, Q0, "Look closely.", "blue", "green", "yellow", "red", "A", "color", "attribute_reasoning", "0", "dev",
     "s"],
    [3000000, Q0, "Look closely.", "yellow", "red", "blue", "green", "C", "color", "attribute_reasoning", "0", "dev",
     "s"],
    [1000001, Q1, "none", "no", "yes", "nan", "", "B", "weather", "coarse_perception", "1", "dev", "s"],
    [1000002, Q2, "", "dog", "bird", "cat", "", "B", "animal", "coarse_perception", "2", "dev", "s"],
    [2000002, Q2, "", "bird", "cat", "dog", "", "A", "animal", "coarse_perception", "2", "dev", "s"],
]
OPT0 = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
OPT1 = {"A": "yes", "B": "no"}
OPT2 = {"A": "cat", "B": "dog", "C": "bird"}
OPT3 = {"A": "day", "B": "night"}


def _write(path, header, rows):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _question(q, text, hint, category, l2, image, copies, split="dev"):
    return Question(q=q, question=text, hint=hint, category=category, l2_category=l2, split=split,
                    image_b64=image, copies=copies)


EXPECTED_WITH_COPIES = [
    _question(0, Q0, "Look closely.", "color", "attribute_reasoning", IMG[0], [
        Copy(0, 0, OPT0, "B"),
        Copy(1000000, 1, {"A": "blue", "B": "green", "C": "yellow", "D": "red"}, "A"),
        Copy(2000000, 2, {"A": "green", "B": "yellow", "C": "red", "D": "blue"}, "D"),
        Copy(3000000, 3, {"A": "yellow", "B": "red", "C": "blue", "D": "green"}, "C"),
    ]),
    _question(1, Q1, None, "weather", "coarse_perception", IMG[1], [
        Copy(1, 0, OPT1, "A"),
        Copy(1000001, 1, {"A": "no", "B": "yes"}, "B"),
    ]),
    _question(2, Q2, None, "animal", "coarse_perception", IMG[2], [
        Copy(2, 0, OPT2, "C"),
        Copy(1000002, 1, {"A": "dog", "B": "bird", "C": "cat"}, "B"),
        Copy(2000002, 2, {"A": "bird", "B": "cat", "C": "dog"}, "A"),
    ]),
    _question(3, "Is it day?", None, "time", "coarse_perception", IMG[2], [Copy(3, 0, OPT3, "A")]),
]


@pytest.fixture
def dev_tsv(tmp_path):
    return _write(tmp_path / "dev.tsv", HEADER, MAINS + COPIES)


# ----------------------------------------------------------------------------- reading


def test_auto_groups_the_files_copies_under_their_question(dev_tsv):
    assert read_mmbench_tsv(dev_tsv) == EXPECTED_WITH_COPIES


def test_expand_keeps_the_copies_a_file_already_has(dev_tsv):
    # Question 3 has no copies in this file; since the file has copies, it is used as it is.
    assert read_mmbench_tsv(dev_tsv, circular="expand") == EXPECTED_WITH_COPIES


def test_off_keeps_copy_zero_only(dev_tsv):
    questions = read_mmbench_tsv(dev_tsv, circular="off")
    assert [[c.index for c in q.copies] for q in questions] == [[0], [1], [2], [3]]
    assert [q.copies[0] for q in questions] == [q.copies[0] for q in EXPECTED_WITH_COPIES]


def test_expand_generates_mmbench_rotations_for_a_vanilla_file(tmp_path):
    # Second spelling of the header (the HF copy's `L2-category`), and no split column.
    header = [("L2-category" if h == "l2-category" else h) for h in HEADER if h != "split"]
    rows = [[cell for h, cell in zip(HEADER, row) if h != "split"] for row in MAINS]
    path = _write(tmp_path / "vanilla.tsv", header, rows)

    auto = read_mmbench_tsv(path)
    assert [len(q.copies) for q in auto] == [1, 1, 1, 1]
    assert auto[0].l2_category == "attribute_reasoning" and auto[0].split is None

    expanded = read_mmbench_tsv(path, circular="expand")
    by_q = {q.q: q.copies for q in expanded}
    assert by_q[0] == [
        Copy(0, 0, OPT0, "B"),
        Copy(1000000, 1, {"A": "blue", "B": "green", "C": "yellow", "D": "red"}, "A"),  # blue moved to A
        Copy(2000000, 2, {"A": "green", "B": "yellow", "C": "red", "D": "blue"}, "D"),
        Copy(3000000, 3, {"A": "yellow", "B": "red", "C": "blue", "D": "green"}, "C"),
    ]
    assert by_q[1] == [Copy(1, 0, OPT1, "A"), Copy(1000001, 1, {"A": "no", "B": "yes"}, "B")]
    assert by_q[2] == [
        Copy(2, 0, OPT2, "C"),
        Copy(1000002, 1, {"A": "dog", "B": "bird", "C": "cat"}, "B"),
        Copy(2000002, 2, {"A": "bird", "B": "cat", "C": "dog"}, "A"),
    ]
    assert by_q[3] == [Copy(3, 0, OPT3, "A"), Copy(1000003, 1, {"A": "night", "B": "day"}, "B")]
    # The generated copies are exactly the ones MMBench ships for questions 0-2.
    assert [q.copies for q in expanded[:3]] == [q.copies for q in EXPECTED_WITH_COPIES[:3]]


TEST_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "category", "l2_category", "image"]
TEST_ROWS = [[0, Q0, "", "red", "blue", "green", "yellow", "color", "attribute_reasoning", IMG[0]],
             [1, "Is it day?", "", "day", "night", "", "", "time", "coarse_perception", IMG[1]]]


def test_test_split_without_answer_column(tmp_path):
    questions = read_mmbench_tsv(_write(tmp_path / "test.tsv", TEST_HEADER, TEST_ROWS), circular="expand",
                                 split="test")
    assert questions[1].copies == [Copy(1, 0, OPT3, None), Copy(1000001, 1, {"A": "night", "B": "day"}, None)]
    assert all(c.answer is None for q in questions for c in q.copies)
    assert len(questions[0].copies) == 4 and questions[0].split is None


def test_a_dev_split_without_answer_column_is_an_error_naming_the_file(tmp_path):
    path = _write(tmp_path / "MMBench_TEST_EN.tsv", TEST_HEADER, TEST_ROWS)
    with pytest.raises(ValueError) as err:
        read_mmbench_tsv(path)  # split="dev" is the default
    assert str(err.value) == (
        f"{path}: no answer column, so this dev split cannot be scored (header: index, question, hint, A, B, C, D, "
        "category, l2_category, image). A test split has no answers: evaluate it with eval.split=test, which "
        "writes the MMBench submission file instead of scores")


def test_a_dev_row_without_its_answer_is_an_error_naming_the_row(tmp_path):
    rows = [list(r) for r in MAINS]
    rows[2][7] = "nan"
    path = _write(tmp_path / "dev.tsv", HEADER, rows)  # row 2's question spans lines 3 and 4
    with pytest.raises(ValueError) as err:
        read_mmbench_tsv(path)
    assert str(err.value) == (f"{path} line 5 (row 3, index 2): the answer cell is empty; every row of a dev split "
                              "needs its answer (eval.split=test evaluates a split without answers)")


def test_a_test_split_reads_no_answers_even_when_the_file_has_them(dev_tsv, caplog):
    with caplog.at_level(logging.WARNING, logger="vlmablate.eval.mmbench"):
        questions = read_mmbench_tsv(dev_tsv, split="test")
    assert [[c.answer for c in q.copies] for q in questions] == [[None] * 4, [None] * 2, [None] * 3, [None]]
    assert [[c.options for c in q.copies] for q in questions] == \
        [[c.options for c in q.copies] for q in EXPECTED_WITH_COPIES]
    assert caplog.messages == [f"{dev_tsv} has an answer column; eval.split=test does not read it "
                               "(use eval.split=dev to score)"]
    with pytest.raises(ValueError, match="split='val': expected one of dev, test"):
        read_mmbench_tsv(dev_tsv, split="val")


# ----------------------------------------------------------------------------- image cells

NOT_BASE64 = "iVBORw0KGgo" + "!" * 60  # longer than 64 characters, so not a row reference
NOT_AN_IMAGE = base64.b64encode(b"plain text, not a PNG or JPEG; long enough to be an image cell").decode()


@pytest.mark.parametrize("cell, reason", [
    (NOT_BASE64, "the image cell is not valid base64 (71 characters: Only base64 data is allowed)"),
    (IMG[1][:-2] + "\n" + IMG[1][-2:], f"the image cell is not valid base64 ({len(IMG[1]) + 1} characters: "
                                      "Only base64 data is allowed)"),
    (IMG[1][:-1], f"the image cell is not valid base64 ({len(IMG[1]) - 1} characters: Incorrect padding)"),
    (NOT_AN_IMAGE, "the image cell is base64 but not an image (62 bytes in no format PIL knows)"),
])
def test_a_bad_image_cell_fails_at_read_time_naming_file_row_and_index(tmp_path, cell, reason):
    rows = [list(r) for r in MAINS + COPIES]
    rows[1][10] = cell  # question 1 holds its own image; its copy (row 8) refers to it
    path = _write(tmp_path / "bad_image.tsv", HEADER, rows)
    with pytest.raises(ValueError) as err:
        read_mmbench_tsv(path)
    assert str(err.value) == f"{path} line 3 (row 2, index 1): {reason}"


def test_decoding_is_strict_where_lenient_decoding_would_pass():
    # Lenient decoding drops the stray characters and would hand a valid image on.
    with_stray = IMG[0][:10] + "!" + IMG[0][10:]
    assert base64.b64decode(with_stray) == base64.b64decode(IMG[0])
    with pytest.raises(ValueError, match="not a decodable base64 image"):
        decode_image(with_stray)


@pytest.mark.parametrize("mutate, message", [
    (lambda h, r: ([x for x in h if x != "image"], [row[:10] + row[11:] for row in r]), "image"),
    (lambda h, r: (h, r + [r[0]]), "duplicate index 0"),
    (lambda h, r: (h, r + [[1000009, *r[0][1:]]]), "question 9, which is not in"),
    (lambda h, r: (h, r[:-1] + [r[-1][:3] + ["bird", "cat", "cow"] + r[-1][6:]]), "not those of question 2"),
    (lambda h, r: (h, r[:-1] + [r[-1][:7] + ["B"] + r[-1][8:]]), "not the correct option of question 2"),
    (lambda h, r: (h, r[:-1] + [r[-1][:10] + ["77"] + r[-1][11:]]), "index 77, which is not in the file"),
    (lambda h, r: (h, [r[0][:7] + ["E"] + r[0][8:]] + r[1:]), "answer 'E' is not one of the options"),
    (lambda h, r: (h, [r[0][:5] + ["nan"] + r[0][6:]] + r[1:]), "without gaps"),
])
def test_malformed_files_raise_naming_file_and_row(tmp_path, mutate, message):
    header, rows = mutate(list(HEADER), [list(r) for r in MAINS + COPIES])
    path = _write(tmp_path / "bad.tsv", header, rows)
    with pytest.raises(ValueError, match=message) as err:
        read_mmbench_tsv(path)
    assert str(path) in str(err.value)


def test_error_names_the_row_and_index(tmp_path):
    rows = [list(r) for r in MAINS] + [[2000002, Q2, "", "bird", "cat", "dog", "", "A", "a", "b", "55", "", ""]]
    with pytest.raises(ValueError, match=r"bad\.tsv line 7 \(row 5, index 2000002\): image refers to index 55"):
        read_mmbench_tsv(_write(tmp_path / "bad.tsv", HEADER, rows))


def test_copy_in_another_order_is_kept_with_a_warning(tmp_path, caplog):
    # Same options and same correct text, but not the left rotation by 2.
    reordered = [2000002, Q2, "", "dog", "cat", "bird", "", "C", "animal", "coarse_perception", "2", "dev", "s"]
    rows = MAINS + [r for r in COPIES if r[0] != 2000002] + [reordered]
    with caplog.at_level(logging.WARNING, logger="vlmablate.eval.mmbench"):
        questions = read_mmbench_tsv(_write(tmp_path / "odd.tsv", HEADER, rows))
    assert questions[2].copies[2] == Copy(2000002, 2, {"A": "dog", "B": "cat", "C": "bird"}, "C")
    assert "not question 2's options rotated left by 2" in caplog.text


def test_unknown_circular_mode(dev_tsv):
    with pytest.raises(ValueError, match="circular="):
        read_mmbench_tsv(dev_tsv, circular="rotate")


# ----------------------------------------------------------------------------- prompt and image


def test_prompt_text_with_and_without_hint():
    q0, q1 = EXPECTED_WITH_COPIES[0], EXPECTED_WITH_COPIES[1]
    assert prompt_text(q0, q0.copies[0]) == (
        "Look closely.\nWhat color is the car?\nA. red\nB. blue\nC. green\nD. yellow\n"
        "Answer with the option's letter from the given choices directly.")
    assert prompt_text(q1, q1.copies[1]) == (
        'Is it "raining"?\nAnswer honestly.\nA. no\nB. yes\n'
        "Answer with the option's letter from the given choices directly.")


def test_decode_image_gives_rgb():
    image = decode_image(IMG[0])
    assert image.mode == "RGB" and image.size == (4, 4) and image.getpixel((0, 0)) == (255, 0, 0)
    assert decode_image(_png_b64((0, 0, 255, 128), mode="RGBA")).mode == "RGB"
    with pytest.raises(ValueError, match="not a decodable base64 image"):
        decode_image("bm90IGFuIGltYWdl")


# ----------------------------------------------------------------------------- submission file


def test_submission_file_has_every_row_in_llava_layout(tmp_path):
    """LLaVA's layout: hint, category, source, image, comment and l2-category dropped, `prediction` after D."""
    header = [h for h in HEADER if h != "answer"] + ["comment"]
    rows = [[cell for h, cell in zip(HEADER, row) if h != "answer"] + ["c"] for row in MAINS + COPIES]
    path = _write(tmp_path / "MMBench_TEST_EN.tsv", header, rows)
    predictions = {0: "B", 1000000: "The answer is A.", 2000000: "D", 3000000: "C", 1: "A", 1000001: "B",
                   2: "C", 1000002: "(B)", 3: "A\tfinal"}  # 2000002 was not predicted
    out = write_submission(path, predictions, tmp_path / "out")
    assert out == {"xlsx": str(tmp_path / "out" / "submission.xlsx"), "tsv": str(tmp_path / "out" / "submission.tsv"),
                   "rows": 10, "predicted": 9}
    expected = [
        ["index", "question", "A", "B", "C", "D", "prediction", "split"],
        [0, Q0, "red", "blue", "green", "yellow", "B", "dev"],
        [1, Q1, "yes", "no", "", "", "A", "dev"],  # "nan" and "None" are pandas' NaN: empty cells
        [2, Q2, "cat", "dog", "bird", "", "C", "dev"],
        [3, "Is it day?", "day", "night", "", "", "A\tfinal", "dev"],
        [2000000, Q0, "green", "yellow", "red", "blue", "D", "dev"],
        [1000000, Q0, "blue", "green", "yellow", "red", "The answer is A.", "dev"],
        [3000000, Q0, "yellow", "red", "blue", "green", "C", "dev"],
        [1000001, Q1, "no", "yes", "", "", "B", "dev"],
        [1000002, Q2, "dog", "bird", "cat", "", "(B)", "dev"],
        [2000002, Q2, "bird", "cat", "dog", "", "", "dev"],
    ]
    from openpyxl import load_workbook

    sheet = load_workbook(out["xlsx"]).active
    assert [[cell if cell is not None else "" for cell in row] for row in sheet.iter_rows(values_only=True)] == expected
    with open(out["tsv"], newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle, delimiter="\t"))
    assert table == [[str(cell) for cell in row] for row in expected]


# ----------------------------------------------------------------------------- metrics


def _records():
    rec = Record
    return [
        # q0: every copy right -> circular and vanilla right
        rec(0, 0, "color", "AR", "B", "B"), rec(0, 1, "color", "AR", "A", "A"),
        rec(0, 2, "color", "AR", "D", "D"), rec(0, 3, "color", "AR", "C", "C"),
        # q1: copy 0 right, copy 2 wrong -> vanilla right, circular wrong
        rec(1, 0, "color", "AR", "A", "A"), rec(1, 1, "color", "AR", "C", "C"), rec(1, 2, "color", "AR", "A", "B"),
        # q2: copy 0 unparsed -> both wrong
        rec(2, 0, "animal", "CP", None, "C"), rec(2, 1, "animal", "CP", "B", "B"),
        # q3: no answer (test split) -> not scored
        rec(3, 0, "animal", "CP", "A", None),
    ]


def test_circular_and_vanilla_accuracy_by_hand():
    m = circular_metrics(_records(), n_boot=200, seed=0)
    assert m["circular_acc"] == pytest.approx(1 / 3) and m["vanilla_acc"] == pytest.approx(2 / 3)
    assert (m["n_questions"], m["n_rows"], m["n_unscored_rows"], m["n_unparsed"]) == (3, 9, 1, 1)
    assert m["unparsed_rate"] == pytest.approx(1 / 9)
    assert m["per_category"] == {
        "animal": {"circular_acc": 0.0, "vanilla_acc": 0.0, "n": 1},
        "color": {"circular_acc": 0.5, "vanilla_acc": 1.0, "n": 2},
    }
    assert m["per_l2"] == {
        "AR": {"circular_acc": 0.5, "vanilla_acc": 1.0, "n": 2},
        "CP": {"circular_acc": 0.0, "vanilla_acc": 0.0, "n": 1},
    }
    for key, acc in (("circular_ci", m["circular_acc"]), ("vanilla_ci", m["vanilla_acc"])):
        lo, hi = m[key]
        assert 0.0 <= lo <= acc <= hi <= 1.0
    # by the number of options (copies): q0 has 4, q1 3, q2 2; the blank target reads the 3+ ones
    assert m["per_n_options"] == {"2": {"circular_acc": 0.0, "vanilla_acc": 0.0, "n": 1},
                                  "3": {"circular_acc": 0.0, "vanilla_acc": 1.0, "n": 1},
                                  "4": {"circular_acc": 1.0, "vanilla_acc": 1.0, "n": 1}}
    assert m["circular_acc_3plus_options"] == 0.5 and m["n_questions_3plus_options"] == 2


def test_bootstrap_is_deterministic_and_degenerate_when_all_correct():
    assert circular_metrics(_records(), seed=3) == circular_metrics(_records(), seed=3)
    perfect = [Record(q, k, "c", "l2", "A", "A") for q in range(20) for k in range(2)]
    m = circular_metrics(perfect)
    assert m["circular_ci"] == [1.0, 1.0] and m["vanilla_ci"] == [1.0, 1.0] and m["circular_acc"] == 1.0


def test_bootstrap_width_matches_the_normal_approximation():
    # 400 coin flips at p = 0.5: the 95% interval is about +-1.96 * sqrt(0.25 / 400) = +-0.049.
    lo, hi = bootstrap_ci([1.0, 0.0] * 200, n_boot=2000, seed=0)
    assert lo < 0.5 < hi and 0.08 < hi - lo < 0.12


def test_records_must_be_well_formed():
    with pytest.raises(ValueError, match="two records for question 0 copy 1"):
        circular_metrics([Record(0, 0, "c", "l", "A", "A"), Record(0, 1, "c", "l", "A", "A"),
                          Record(0, 1, "c", "l", "B", "A")])
    with pytest.raises(ValueError, match="no copy 0"):
        circular_metrics([Record(5, 1, "c", "l", "A", "A")])


def test_paired_difference():
    same = {q: q % 3 == 0 for q in range(40)}
    r = paired_difference(same, dict(same), n_boot=500, seed=0)
    assert r["diff"] == 0.0 and r["p_value"] == 1.0 and r["ci"] == [0.0, 0.0]

    better, worse = {q: True for q in range(40)}, {q: False for q in range(40)}
    r = paired_difference(better, worse, n_boot=1000, seed=0)
    assert r["diff"] == 1.0 and r["p_value"] < 0.01 and (r["a_only"], r["b_only"]) == (40, 0)

    # One discordant question in forty: no evidence of a difference.
    one_off = dict(same) | {1: True}
    r = paired_difference(one_off, same, n_boot=500, seed=0)
    assert r["diff"] == pytest.approx(1 / 40) and r["p_value"] == 1.0
    assert paired_difference(one_off, same, seed=7) == paired_difference(one_off, same, seed=7)

    with pytest.raises(ValueError, match="same questions"):
        paired_difference({0: True}, {1: True})
