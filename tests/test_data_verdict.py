"""`vlmablate.data.check`'s verdict is the run's: the same counts and the same rule (data/verdict.py), a
broken corpus judged side by side, the substitute limit as a setting, scan verdicts that follow the image
files, the data order of a run that skips, LLaVA's place for `<image>`, and records with NaN or a number
where text belongs."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
from conftest import compose_run
from PIL import Image
from transformers import AutoProcessor

from vlmablate.config import DataConfig, SourceConfig
from vlmablate.data import records as records_module
from vlmablate.data.dataset import LlavaJsonDataset
from vlmablate.data.errors import DataError
from vlmablate.data.records import RecordStore, open_llava_json
from vlmablate.data.scan import CODES, scan_source
from vlmablate.data.sources import build_dataset
from vlmablate.data.templates import (
    VICUNA_V1_CHAT_TEMPLATE,
    TemplateError,
    encode_conversation,
    llava_image_first,
    render_conversation,
    to_messages,
)
from vlmablate.data.verdict import BadPolicy, judge, longest_bad_run
from vlmablate.model.tiny import TinySpec, save_tiny_checkpoint


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return AutoProcessor.from_pretrained(save_tiny_checkpoint(tmp_path_factory.mktemp("llava"), TinySpec()))


def turns(question: str, answer="Red.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def image_record(i: int, image: str = "ok.jpg", question: str = "<image>\nWhat colour?") -> dict:
    return {"id": f"r{i}", "image": image, "conversations": turns(question)}


@pytest.fixture()
def images(tmp_path):
    """An image folder: a good JPEG, and ten JPEGs cut in half (PIL's verify() passes them; decoding fails)."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (48, 32), (200, 10, 10)).save(folder / "ok.jpg", quality=95)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "full.jpg", quality=95)
    data = (folder / "full.jpg").read_bytes()
    for k in range(30):
        (folder / f"cut{k}.jpg").write_bytes(data[: len(data) // 2])
    with Image.open(folder / "cut0.jpg") as opened:
        opened.verify()  # passes: the premise of the whole file
    return folder


def broken_corpus(folder, path):
    """100 records: 40-49 truncated JPEGs, 10 a missing image, 20 a NaN field, 30 a numeric reply, 60 <image> in
    the reply, 70 <image> after the question (good: LLaVA moves it), every 5th of the rest text-only."""
    records = []
    for i in range(100):
        record = image_record(i) if i % 5 else {"id": f"t{i}", "conversations": turns("Say hello.", "Hello.")}
        records.append(record)
    for k in range(10):
        records[40 + k] = image_record(40 + k, f"cut{k}.jpg")
    records[10] = image_record(10, "missing.jpg")
    records[20] = {**image_record(20), "score": math.nan}
    records[30] = {"id": "r30", "image": "ok.jpg", "conversations": turns("<image>\nHow many?", 42)}
    records[60] = {"id": "r60", "image": "ok.jpg", "conversations": turns("What?", "<image> there")}
    records[70] = image_record(70, question="What is this?\n<image>")
    with path.open("w") as f:
        json.dump(records, f)  # writes NaN, as Python does by default
    return path


def verdict_lines(report) -> list[str]:
    from vlmablate.data.check import format_report

    return [line for line in format_report(report).splitlines() if line.startswith(("bad records", "longest", "OK",
                                                                                     "NOT OK"))]


def overrides(path, folder, *extra):
    return ("model=tiny_random", "data=llava_json", f"data.path={path}", f"data.image_root={folder}",
            "train.progress=false", *extra)


# --- the rule ----------------------------------------------------------------------------------------


def test_judge_applies_each_limit():
    skip = BadPolicy("skip", 0.1, 3)
    assert not judge(skip, records=100, scanned={"missing_image": 4}, encoded={"unreadable_image": 6}).stops
    over = judge(skip, records=100, scanned={"missing_image": 4}, encoded={"unreadable_image": 7})
    assert over.stops and over.bad == 11 and over.by_reason() == {"missing_image": 4, "unreadable_image": 7}
    assert over.why == ("11 of 100 records are bad (11.00%; found while encoding: {'unreadable_image': 7}), more "
                        "than data.max_bad_fraction=10.00%: fix the data, or raise the limit knowingly")
    assert not judge(skip, records=100, scanned={}, in_a_row={"a": (3, 50)}).stops
    run = judge(skip, records=100, scanned={}, in_a_row={"a": (4, 50)})
    assert run.stops and "4 of its 50 samples in a row fail to encode, more than data.max_bad_in_a_row=3" in run.why
    assert judge(skip, records=100, scanned={}, in_a_row={"a": (2, 2)}).stops  # a source with nothing to serve
    error = judge(BadPolicy("error"), records=100, scanned={}, encoded={"unreadable_image": 1})
    assert error.stops and error.why.startswith("1 of 100 records are bad ({'unreadable_image': 1})")
    with pytest.raises(DataError, match="max_bad_in_a_row=-1"):
        BadPolicy("skip", 0.1, -1)


def test_longest_bad_run_wraps_around_as_the_substitute_search_does():
    assert longest_bad_run([False, True, True, False]) == 2
    assert longest_bad_run([True, True, False, False, True]) == 3  # 4, 0, 1
    assert longest_bad_run([True] * 5) == 5
    assert longest_bad_run([False] * 5) == 0


# --- side by side: data.check and the run on one broken corpus ---------------------------------------


@pytest.mark.slow
def test_check_and_run_agree_on_a_broken_corpus(tmp_path, images, run_cell):
    from vlmablate.data.check import check_data

    path = broken_corpus(images, tmp_path / "d.json")
    ref = lambda i: f"{path}#{i} (id=r{i})"  # noqa: E731
    by_reason = {"malformed_record": 1, "misplaced_image_marker": 1, "missing_image": 1, "non_finite_number": 1,
                 "unreadable_image": 10}
    side_by_side = {}

    # skip, 20%: 14 of 100 bad, both go on; the run's totals are data.check's
    skip = ("data.on_bad_sample=skip", "data.max_bad_fraction=0.2", "eval=none", "freeze=lora_llm",
            "train.max_steps=-1", "train.num_train_epochs=1", "train.save_steps=1000", "train.record_data_order=true")
    report, ok = check_data(compose_run(*overrides(path, images, *skip))[0], tmp_path)
    summary = run_cell(*overrides(path, images, *skip)[1:], name="skip")
    verdict = summary["data"]["verdict"]
    assert ok and report["verdict"]["stops"] is False and verdict["stops"] is False
    assert report["bad"] == verdict["bad"] == summary["data"]["bad_total"] == 14
    assert report["verdict"]["bad_by_reason"] == verdict["bad_by_reason"] == by_reason
    assert report["bad_found_by_scan"] == summary["data"]["bad"] == 4
    assert report["bad_found_when_encoded"] == sum(summary["data"]["bad_at_encode"].values()) == 10
    assert summary["data"]["bad_at_encode"] == summary["data"]["preflight"]["bad"] == {"unreadable_image": 10}
    assert report["sources"]["llava_json"]["longest_bad_run"] == 10
    assert summary["status"] == "completed" and summary["train"]["samples_seen"] == 96
    side_by_side["skip, max_bad_fraction=0.2"] = (verdict_lines(report), verdict)
    # what the order file says was trained: record 50 stood in for 40-49, 96 positions, 86 distinct
    order = json.loads((tmp_path / "skip" / "data_order.json").read_text())
    trained = Counter(i for step in order.values() for i in step)
    kept = [i for i in range(100) if i not in (10, 20, 30, 60)]  # one source: the mix is what the scan kept
    mix_of = {k: kept[k] for k in range(96)}
    records_trained = Counter({mix_of[k]: n for k, n in trained.items()})
    assert records_trained[50] == 11 and not any(records_trained[i] for i in range(40, 50))
    assert summary["train"]["data_order"]["records"] == 96 and summary["train"]["data_order"]["distinct"] == 86

    # skip, 10%: 14% is too many; data.check says so, the run stops in its preflight, before any step
    strict = ("data.on_bad_sample=skip", "data.max_bad_fraction=0.1", "eval=none")
    report, ok = check_data(compose_run(*overrides(path, images, *strict))[0], tmp_path)
    with pytest.raises(DataError) as stopped:
        run_cell(*overrides(path, images, *strict)[1:], name="strict")
    failed = json.loads((tmp_path / "strict" / "summary.json").read_text())
    assert not ok and failed["status"] == "failed" and "train" not in failed
    why = ("14 of 100 records are bad (14.00%; found while encoding: {'unreadable_image': 10}, e.g. "
           f"['{ref(40)}', '{ref(41)}', '{ref(42)}']), more than data.max_bad_fraction=10.00%: fix the data, "
           "or raise the limit knowingly")
    assert report["verdict"]["why"] == failed["data"]["verdict"]["why"] == why
    assert str(stopped.value) == f"data preflight: {why}"
    assert report["verdict"]["bad_by_reason"] == failed["data"]["verdict"]["bad_by_reason"] == by_reason
    side_by_side["skip, max_bad_fraction=0.1"] = (verdict_lines(report), failed["data"]["verdict"])

    # error: both stop, at the same record
    report, ok = check_data(compose_run(*overrides(path, images, "eval=none"))[0], tmp_path)
    with pytest.raises(DataError) as stopped:
        run_cell(*overrides(path, images, "eval=none")[1:], name="error")
    assert not ok and report["policy"]["stops_at"] == ref(10)
    assert str(stopped.value).startswith(f"{ref(10)}: bad record (missing_image)")
    side_by_side["error"] = (verdict_lines(report), str(stopped.value))
    for case, (check, run) in side_by_side.items():
        print(f"\n== {case}\ndata.check:\n  " + "\n  ".join(check) + f"\nrun:\n  {run}")


@pytest.mark.slow
def test_more_failures_in_a_row_than_the_setting_stop_both(tmp_path, images, run_cell):
    from vlmablate.data.check import check_data

    records = [image_record(i) for i in range(60)]
    records[20:40] = [image_record(20 + k, f"cut{k}.jpg") for k in range(20)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    skip = ("data.on_bad_sample=skip", "data.max_bad_fraction=0.5", "eval=none")
    report, ok = check_data(compose_run(*overrides(path, images, *skip))[0], tmp_path)
    assert not ok and report["bad"] == 20 and report["verdict"]["longest_bad_run"] == {"llava_json": 20}
    assert report["verdict"]["why"] == ("data source 'llava_json': 20 of its 60 samples in a row fail to encode, "
                                        "more than data.max_bad_in_a_row=16: the source looks broken")
    with pytest.raises(DataError, match=r"17 samples in a row failed to encode \(unreadable_image\) starting at "
                                        r"record 20, more than data\.max_bad_in_a_row=16"):
        run_cell(*overrides(path, images, *skip)[1:], name="broken")
    report, ok = check_data(compose_run(*overrides(path, images, *skip, "data.max_bad_in_a_row=20"))[0], tmp_path)
    assert ok and report["bad"] == 20
    summary = run_cell(*overrides(path, images, *skip, "data.max_bad_in_a_row=20", "train.max_steps=2")[1:],
                       name="allowed")
    assert summary["status"] == "completed" and summary["data"]["bad_total"] == 20


def test_the_substitute_limit_is_the_setting(tmp_path, images, processor):
    records = [image_record(i) for i in range(30)]
    records[5:10] = [image_record(5 + k, f"cut{k}.jpg") for k in range(5)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))

    def mix(limit):
        data = DataConfig(name="t", path=str(path), image_root=str(images), on_bad_sample="skip",
                          max_bad_fraction=0.5, max_bad_in_a_row=limit,
                          sources=[SourceConfig(name="src", kind="llava_json")])
        return build_dataset(data, processor=processor, template="chat", max_length=256, image_aspect="square",
                             cache_dir=tmp_path / "cache", image_size=32, image_tokens=16, progress=False)

    assert mix(5)[5]["sample_index"] == 10
    with pytest.raises(DataError, match=r"5 samples in a row failed .* data\.max_bad_in_a_row=4"):
        mix(4)[5]


def test_a_substitute_is_recorded_as_itself(tmp_path, images, processor):
    """Records 40-49 cannot be decoded: each is served by record 50, and says so in `sample_index`."""
    records = [image_record(i) for i in range(60)]
    records[40:50] = [image_record(40 + k, f"cut{k}.jpg") for k in range(10)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    data = DataConfig(name="t", path=str(path), image_root=str(images), on_bad_sample="skip", max_bad_fraction=0.5,
                      sources=[SourceConfig(name="src", kind="llava_json")])
    mixed = build_dataset(data, processor=processor, template="chat", max_length=256, image_aspect="square",
                          cache_dir=tmp_path / "cache", image_size=32, image_tokens=16, progress=False)
    served = Counter(mixed[k]["sample_index"] for k in range(60))
    assert served[50] == 11 and not any(served[i] for i in range(40, 50)) and sum(served.values()) == 60
    assert mixed[45]["record_ref"] == f"{path}#50 (id=r50)"


# --- the scan's verdict follows the image files --------------------------------------------------------


@pytest.mark.parametrize("verify", [False, True])
def test_a_repaired_image_counts_at_once(tmp_path, images, processor, verify):
    store = RecordStore.from_records([image_record(0), image_record(1, "late.jpg")], source="mem.json")

    def scan():
        return scan_source(store, image_root=images, tokenizer=processor.tokenizer, template="chat", max_length=256,
                           image_tokens=16, cache_dir=tmp_path, verify_images=verify, progress=False)

    first = scan()
    assert [CODES[c] for c in first.reasons] == ["ok", "missing_image"] and first.lengths[1] == 0
    if verify:  # a file that cannot be decoded first, then repaired
        (images / "late.jpg").write_bytes((images / "cut0.jpg").read_bytes())
        assert [CODES[c] for c in scan().reasons] == ["ok", "unreadable_image"]
    (images / "late.jpg").write_bytes((images / "ok.jpg").read_bytes())
    again = scan()
    assert [CODES[c] for c in again.reasons] == ["ok", "ok"] and again.lengths[1] == first.lengths[0]
    assert len(list((tmp_path / "scan").glob("*.npz"))) == 1  # the same key: the cached verdict was renewed
    (images / "late.jpg").unlink()
    assert [CODES[c] for c in scan().reasons] == ["ok", "ok"]  # a good verdict stands: encoding finds the loss


# --- records: NaN, a number where text belongs, the reference said once --------------------------------


def test_a_json_list_is_read_as_python_json_reads_it(tmp_path, monkeypatch):
    records = [{"id": "a", "v": [1, 2.5, -0.0, 1e300, "x]},{,\"y"], "u": "é中 \\ 😀"},
               {"id": "nan", "score": math.nan, "w": [math.inf, -math.inf]}, {"id": 7}, 12345678901234567890, "s",
               None, [], {"nested": {"deep": [[{}]]}}]
    path = tmp_path / "d.json"
    path.write_text(" \n" + json.dumps(records, indent=1, ensure_ascii=False) + "\n ", encoding="utf-8")
    monkeypatch.setattr(records_module, "_CHUNK", 7)  # records and numbers cut by the buffer's end
    store = open_llava_json(path, tmp_path / "cache")
    expected = json.loads(path.read_text(encoding="utf-8"))
    got = [store[i] for i in range(len(store))]
    assert json.dumps(got) == json.dumps(expected) and math.isnan(got[1]["score"])
    for text, message in (("[1, 2", "not valid JSON after record 2: expected ',' or ']'"),
                          ("[1 2]", "not valid JSON after record 1: expected ',' or ']', found '2'"),
                          ("[1] x", "not valid JSON after record 1: extra data after the list"),
                          ('[{"a": }]', "not valid JSON after record 0: Expecting value")):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
            open_llava_json(tmp_path / "bad.json", tmp_path / "cache")


def test_nan_makes_its_own_record_bad(tmp_path, images, processor):
    records = [image_record(0), {**image_record(1), "score": math.nan}, image_record(2),
               {"id": "r3", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": math.inf}]}]
    path = tmp_path / "d.json"
    with path.open("w") as f:
        json.dump(records, f)
    data = DataConfig(name="t", path=str(path), image_root=str(images), on_bad_sample="skip", max_bad_fraction=0.5,
                      sources=[SourceConfig(name="src", kind="llava_json")])
    kwargs = dict(processor=processor, template="chat", max_length=256, image_aspect="square",
                  cache_dir=tmp_path / "cache", image_size=32, image_tokens=16, progress=False)
    mixed = build_dataset(data, **kwargs)
    assert len(mixed) == 2 and mixed.report()["sources"]["src"]["bad"] == {"non_finite_number": 2}
    data.on_bad_sample = "error"
    with pytest.raises(DataError) as caught:
        build_dataset(data, **kwargs)
    assert str(caught.value) == (
        f"{path}#1 (id=r1): bad record (non_finite_number): field score is NaN, which is not a JSON number "
        "(Python's json writes it for a float that is not finite); fix or drop that value. 2 bad records in this "
        "source ({'non_finite_number': 2}); set data.on_bad_sample=skip to leave them out, or run "
        "`python -m vlmablate.data.check` for the full list")
    with pytest.raises(DataError, match=r"#0 \(id=r3\): field conversations\[1\]\.value is Infinity"):
        LlavaJsonDataset(records[3:], source_path=path, image_root=images, processor=processor, template="chat",
                         max_length=256)


def test_a_number_where_text_belongs_is_the_wrong_type():
    with pytest.raises(TemplateError) as caught:
        to_messages(turns("Hi", 42), "d.json#3 (id=n)")
    assert caught.value.reason == "malformed_record"
    assert str(caught.value) == "d.json#3 (id=n): turn 1 (gpt) has a value of type int (42), expected a string"
    with pytest.raises(TemplateError) as caught:
        to_messages(turns("Hi", "  "), "d.json#3 (id=n)")
    assert caught.value.reason == "empty_turns" and str(caught.value).endswith("turn 1 (gpt) has an empty value")


def test_a_malformed_record_names_itself_once(tmp_path, images, processor):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([image_record(0), {**image_record(1), "id": "two_images", "image": ["a.jpg", "b.jpg"]}]))
    data = DataConfig(name="t", path=str(path), image_root=str(images),
                      sources=[SourceConfig(name="src", kind="llava_json")])
    with pytest.raises(DataError) as caught:
        build_dataset(data, processor=processor, template="chat", max_length=256, image_aspect="square",
                      cache_dir=tmp_path / "cache", image_size=32, image_tokens=16, progress=False)
    assert str(caught.value) == (
        f"{path}#1 (id=two_images): bad record (malformed_record): 'image' must be one relative path (one image "
        "per sample), got ['a.jpg', 'b.jpg']. 1 bad records in this source ({'malformed_record': 1}); set "
        "data.on_bad_sample=skip to leave them out, or run `python -m vlmablate.data.check` for the full list")


# --- where <image> goes --------------------------------------------------------------------------------


def test_llava_moves_image_to_the_front_of_its_turn():
    # LLaVA's preprocess_multimodal: marker out, rest stripped, "<image>\n" + rest, stripped
    cases = {"What is this?\n<image>": "<image>\nWhat is this?", "<image>\nWhat is this?": "<image>\nWhat is this?",
             "  Left <image> right  ": "<image>\nLeft  right", "<image>": "<image>", "\n<image>\n": "<image>"}
    for value, expected in cases.items():
        assert llava_image_first([{"role": "user", "content": value}]) == [{"role": "user", "content": expected}]
    assert llava_image_first([{"role": "user", "content": " no image "}]) == [{"role": "user", "content": " no image "}]


def test_the_llava_templates_train_image_first(processor):
    tok = processor.tokenizer
    assert tok.chat_template == VICUNA_V1_CHAT_TEMPLATE  # the tiny model speaks LLaVA-1.5's Vicuna v1
    after = to_messages(turns("What is this?\n<image>"), "r")
    text, _ = render_conversation(after, template="chat", tokenizer=tok, image_token="<image>", has_image=True,
                                  ref="r")
    system = VICUNA_V1_CHAT_TEMPLATE.split('"')[1]
    assert text == f"<s>{system} USER: <image>\nWhat is this? ASSISTANT: Red.</s>"
    image = Image.new("RGB", (32, 32))
    kwargs = dict(template="chat", processor=processor, image=image, max_length=256, record_ref="r")
    moved = encode_conversation(turns("What is this?\n<image>"), **kwargs)
    front = encode_conversation(turns("<image>\nWhat is this?"), **kwargs)
    assert moved["input_ids"].tolist() == front["input_ids"].tolist()
    assert moved["labels"].tolist() == front["labels"].tolist()
    plain, _ = render_conversation(after, template="plain", tokenizer=tok, image_token="<image>", has_image=True,
                                   ref="r")
    assert plain == "<s><image>Red.\n"


def test_a_tokenizers_own_template_keeps_image_in_place(processor):
    import copy

    own = copy.deepcopy(processor.tokenizer)
    own.chat_template = VICUNA_V1_CHAT_TEMPLATE + "{#- the tokenizer's own -#}"
    text, _ = render_conversation(to_messages(turns("What is this?\n<image>"), "r"), template="chat", tokenizer=own,
                                  image_token="<image>", has_image=True, ref="r")
    assert text.endswith(" USER: What is this?\n<image> ASSISTANT: Red.</s>")
