"""The data layer at scale: Arrow record stores, the scan, mixes and subsets, bad-sample policies,
image modes, HF `datasets` sources and the `vlmablate.data.check` command."""

from __future__ import annotations

import copy
import json
import os

import datasets
import numpy as np
import pytest
import torch
from conftest import compose_run
from PIL import Image
from transformers import AutoProcessor

from vlmablate.config import ConfigError, DataConfig, SourceConfig, split_subset, validate
from vlmablate.data import records as records_module
from vlmablate.data.collator import LlavaCollator
from vlmablate.data.dataset import DataError, LlavaJsonDataset
from vlmablate.data.records import RecordStore, open_hf, open_llava_json
from vlmablate.data.scan import CODES, scan_source
from vlmablate.data.sources import MixedDataset, build_dataset, share
from vlmablate.model.tiny import TinySpec, save_tiny_checkpoint


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return AutoProcessor.from_pretrained(save_tiny_checkpoint(tmp_path_factory.mktemp("llava"), TinySpec()))


@pytest.fixture(scope="module")
def next_processor(tmp_path_factory):
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("llava_next"), TinySpec(arch="llava_next"))
    return AutoProcessor.from_pretrained(folder)


def turns(question: str, answer: str = "Red.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def good(i: int, image: bool = True) -> dict:
    if image:
        return {"id": f"g{i}", "image": "ok.png", "conversations": turns("<image>\nWhat colour?")}
    return {"id": f"t{i}", "conversations": turns("Say hello" + " please" * (i % 5), "Hello.")}


BROKEN = {  # reason -> a record that has exactly that fault
    "malformed_record": {"id": "b0", "conversations": "not a list"},
    "empty_turns": {"id": "b1", "conversations": []},
    "unknown_role": {"id": "b2", "conversations": [{"from": "robot", "value": "a"}, {"from": "gpt", "value": "b"}]},
    "non_alternating": {"id": "b3", "conversations": [{"from": "human", "value": "a"},
                                                      {"from": "human", "value": "b"}]},
    "misplaced_image_marker": {"id": "b4", "conversations": turns("Hi", "<image> here")},
    "too_many_image_markers": {"id": "b5", "image": "ok.png", "conversations": turns("<image>\n<image>\nWhat?")},
    "marker_without_image": {"id": "b6", "conversations": turns("<image>\nWhat?")},
    "image_without_marker": {"id": "b7", "image": "ok.png", "conversations": turns("What?")},
    "image_outside_root": {"id": "b8", "image": "../secret.png", "conversations": turns("<image>\nWhat?")},
    "missing_image": {"id": "b9", "image": "nope.png", "conversations": turns("<image>\nWhat?")},
    "unreadable_image": {"id": "b10", "image": "corrupt.png", "conversations": turns("<image>\nWhat?")},
    # over 256 tokens of question: the answer starts beyond max_length
    "answer_truncated": {"id": "b11", "conversations": turns("Tell me about the red circle. " * 60)},
}


@pytest.fixture()
def root(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 20), (200, 10, 10)).save(images / "ok.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    return tmp_path


def write(path, records, jsonl: bool = False):
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return path


def data_config(path, root, **kwargs) -> DataConfig:
    return DataConfig(name="t", path=str(path), image_root=str(root / "images"),
                      sources=[SourceConfig(name=kwargs.pop("name", "src"), kind="llava_json",
                                            **{k: kwargs.pop(k) for k in ("count", "weight") if k in kwargs})],
                      **kwargs)


def build(data, processor, tmp_path, max_length=256, image_aspect="square"):
    return build_dataset(data, processor=processor, template="chat", max_length=max_length,
                         image_aspect=image_aspect, cache_dir=tmp_path / "cache", image_size=32, image_tokens=16,
                         progress=False)


# --- record stores ---------------------------------------------------------------------------------


def test_llava_json_and_jsonl_become_the_same_arrow_records(tmp_path):
    records = [good(0), good(1, image=False), BROKEN["malformed_record"]]
    a = open_llava_json(write(tmp_path / "d.json", records), tmp_path / "cache")
    b = open_llava_json(write(tmp_path / "d.jsonl", records, jsonl=True), tmp_path / "cache")
    assert [a[i] for i in range(3)] == [b[i] for i in range(3)] == records
    assert list(a.iter_records(batch_size=2)) == records
    assert isinstance(a.table, datasets.Dataset) and a.table.cache_files  # memory-mapped from disk


def test_conversion_is_cached_and_redone_when_the_file_changes(tmp_path, monkeypatch):
    path = write(tmp_path / "d.json", [good(0)])
    first = open_llava_json(path, tmp_path / "cache")
    calls = []
    monkeypatch.setattr(records_module, "_convert", lambda *a: calls.append(a))
    assert open_llava_json(path, tmp_path / "cache").identity == first.identity and calls == []
    write(path, [good(0), good(1)])
    os.utime(path, ns=(1, 1))
    monkeypatch.undo()
    changed = open_llava_json(path, tmp_path / "cache")
    assert changed.identity != first.identity and len(changed) == 2
    assert not list((tmp_path / "cache" / "records").glob("*.tmp*"))  # nothing half-written left


def test_bad_files_are_named(tmp_path):
    (tmp_path / "obj.json").write_text('{"id": 1}')
    with pytest.raises(DataError, match=r"obj\.json: expected a JSON list"):
        open_llava_json(tmp_path / "obj.json", tmp_path / "cache")
    (tmp_path / "cut.json").write_text(json.dumps([good(0), good(1)])[:-30])
    with pytest.raises(DataError, match=r"cut\.json: not valid JSON after record 1"):
        open_llava_json(tmp_path / "cut.json", tmp_path / "cache")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="holds no records"):
        open_llava_json(tmp_path / "empty.json", tmp_path / "cache")
    with pytest.raises(DataError, match="data file not found"):
        open_llava_json(tmp_path / "none.json", tmp_path / "cache")


def test_hf_parquet_source_with_column_mapping_and_image_bytes(tmp_path, root, processor):
    png = (root / "images" / "ok.png").read_bytes()
    table = datasets.Dataset.from_dict(
        {"uid": ["a", "b"], "messages": [turns("<image>\nWhat colour?"), turns("Hi there", "Hello.")],
         "picture": [{"bytes": png, "path": None}, None]},
        features=datasets.Features({"uid": datasets.Value("string"),
                                    "messages": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
                                    "picture": datasets.Image()}))
    table.to_parquet(str(tmp_path / "d.parquet"))
    store = open_hf(builder="parquet", data_files=str(tmp_path / "d.parquet"), split="train",
                    columns={"conversations": "messages", "image": "picture", "id": "uid"}, cache_dir=tmp_path,
                    name="x")
    assert store[0]["id"] == "a" and store[0]["image_data"] == png and store[1].get("image") is None
    ds = LlavaJsonDataset(store, source_path=store.source, image_root=None, processor=processor, template="chat",
                          max_length=256)
    assert ds.load_image(0).size == (40, 20)
    assert ds[0]["pixel_values"].shape == (1, 3, 32, 32) and ds[1]["pixel_values"] is None
    with pytest.raises(DataError, match=r"columns \['nope'\] not in"):
        open_hf(builder="parquet", data_files=str(tmp_path / "d.parquet"), split="train",
                columns={"conversations": "nope"}, cache_dir=tmp_path, name="x")


# --- the scan --------------------------------------------------------------------------------------


def test_scan_finds_every_reason_and_measures_exact_lengths(tmp_path, root, processor):
    multi = {"id": "m", "image": "ok.png", "conversations": turns("<image>\nWhat colour?") + turns("And </s>?", "Two.")}
    records = [good(0), good(1, image=False), multi, *BROKEN.values()]
    store = RecordStore.from_records(records, source="mem.json")
    scan = scan_source(store, image_root=root / "images", tokenizer=processor.tokenizer, template="chat",
                       max_length=256, image_tokens=16, cache_dir=tmp_path, verify_images=True, progress=False)
    assert [CODES[c] for c in scan.reasons] == ["ok", "ok", "ok", *BROKEN]
    # The scan renders and tokenizes as encoding does: its lengths are the encoded lengths (LLaVA's sign:
    # negative for text-only), bad records 0.
    encoded = LlavaJsonDataset(records[:3], source_path="mem.json", image_root=root / "images", processor=processor,
                               template="chat", max_length=256)
    assert scan.lengths[:3].tolist() == [len(encoded[0]["input_ids"]), -len(encoded[1]["input_ids"]),
                                         len(encoded[2]["input_ids"])]
    assert (scan.lengths[3:] == 0).all()


def test_scan_finds_answers_and_images_beyond_max_length(tmp_path, root, processor):
    from vlmablate.data.templates import VICUNA_V1_CHAT_TEMPLATE

    # LLaVA's templates move <image> to the front of its turn; a tokenizer's own template keeps it in place
    processor = copy.deepcopy(processor)
    processor.tokenizer.chat_template = VICUNA_V1_CHAT_TEMPLATE + "{#- the tokenizer's own -#}"
    question = "Tell me about the red circle. " * 3
    records = [good(0),
               {"id": "late", "image": "ok.png", "conversations": turns(question + "\n<image>")},  # image at the end
               {"id": "cut", "conversations": turns(question)}]
    store = RecordStore.from_records(records, source="mem.json")
    encoded = LlavaJsonDataset(records, source_path="mem.json", image_root=root / "images", processor=processor,
                               template="chat", max_length=512)
    image_end = [int((encoded[i]["input_ids"] == processor.image_token_id).nonzero().max()) + 1 for i in (0, 1)]
    answer_at = [int((encoded[i]["labels"] != -100).nonzero()[0]) for i in (0, 1, 2)]  # 0-based first trained
    assert image_end[0] < answer_at[0] < answer_at[2] < image_end[1] < answer_at[1]

    def reasons(max_length):
        scan = scan_source(store, image_root=root / "images", tokenizer=processor.tokenizer, template="chat",
                           max_length=max_length, image_tokens=16, cache_dir=tmp_path, progress=False)
        return [CODES[c] for c in scan.reasons]

    assert reasons(answer_at[2]) == ["ok", "too_long", "answer_truncated"]
    assert reasons(answer_at[2] + 1) == ["ok", "too_long", "ok"]
    assert reasons(image_end[1]) == ["ok", "answer_truncated", "ok"]  # the image fits, its answer does not
    assert reasons(answer_at[1] + 1) == ["ok", "ok", "ok"]


def test_scan_is_cached_per_tokenizer_and_max_length(tmp_path, root, processor, next_processor):
    store = RecordStore.from_records([good(0)], source="mem.json")
    kwargs = dict(image_root=root / "images", template="chat", image_tokens=16, cache_dir=tmp_path, progress=False)
    scan_source(store, tokenizer=processor.tokenizer, max_length=256, **kwargs)
    scan_source(store, tokenizer=processor.tokenizer, max_length=256, **kwargs)
    assert len(list((tmp_path / "scan").glob("*.npz"))) == 1
    scan_source(store, tokenizer=processor.tokenizer, max_length=128, **kwargs)
    other = copy.deepcopy(processor.tokenizer)  # the module's processor is shared: change a copy
    other.add_tokens(["<brand-new>"])
    scan_source(store, tokenizer=other, max_length=256, **kwargs)
    assert len(list((tmp_path / "scan").glob("*.npz"))) == 3


def test_a_record_whose_image_would_be_cut_is_too_long(tmp_path, root, processor):
    store = RecordStore.from_records([good(0)], source="mem.json")
    scan = scan_source(store, image_root=root / "images", tokenizer=processor.tokenizer, template="chat",
                       max_length=20, image_tokens=16, cache_dir=tmp_path, progress=False)
    assert CODES[scan.reasons[0]] == "too_long"


def test_image_paths_outside_the_root_are_never_opened(tmp_path, root, processor, monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    escape = LlavaJsonDataset([BROKEN["image_outside_root"]], source_path=root / "d.json", image_root=root / "images",
                              processor=processor, template="chat", max_length=256)
    with pytest.raises(DataError, match=r"d\.json#0 \(id=b8\): image path '\.\./secret\.png' resolves outside"):
        escape[0]
    os.symlink(root / "secret.png", root / "images" / "link.png")  # a symlink out is caught after resolving
    link = LlavaJsonDataset([{**BROKEN["image_outside_root"], "image": "link.png"}], source_path=root / "d.json",
                            image_root=root / "images", processor=processor, template="chat", max_length=256)
    with pytest.raises(DataError, match="resolves outside"):
        link[0]
    assert opened == []


# --- policies --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", sorted(BROKEN))
def test_error_policy_names_file_record_id_and_reason(tmp_path, root, processor, reason):
    path = write(tmp_path / "d.json", [good(0), good(1), BROKEN[reason]])
    data = data_config(path, root, verify_images=True)
    with pytest.raises(DataError) as err:
        build(data, processor, tmp_path)
    assert err.value.reason == reason
    assert f"d.json#2 (id={BROKEN[reason]['id']}): bad record ({reason})" in str(err.value)


@pytest.mark.parametrize("reason", sorted(BROKEN))
def test_skip_policy_counts_by_reason(tmp_path, root, processor, reason):
    path = write(tmp_path / "d.json", [good(i, image=i % 2 == 0) for i in range(9)] + [BROKEN[reason]])
    mixed = build(data_config(path, root, on_bad_sample="skip", max_bad_fraction=0.2, verify_images=True),
                  processor, tmp_path)
    report = mixed.report()
    assert len(mixed) == 9 and report["bad"] == 1 and report["sources"]["src"]["bad"] == {reason: 1}
    assert report["bad_fraction"] == pytest.approx(0.1)


def test_jsonl_lines_that_do_not_parse_follow_the_policy(tmp_path, root, processor):
    lines = [json.dumps(good(0)), json.dumps(good(1, image=False)), '{"id": "x", "conversations": [}',
             json.dumps(good(3))]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # the bad line is line 4
    with pytest.raises(DataError) as caught:
        build(data_config(path, root), processor, tmp_path)
    assert caught.value.reason == "invalid_json"
    assert str(caught.value).startswith(f"{path}#2 (id=?): bad record (invalid_json): line 4 is not valid JSON: "
                                        "Expecting value. 1 bad records in this source ({'invalid_json': 1})")
    mixed = build(data_config(path, root, on_bad_sample="skip", max_bad_fraction=0.25), processor, tmp_path)
    assert len(mixed) == 3 and mixed.report()["sources"]["src"]["bad"] == {"invalid_json": 1}
    assert [mixed[k]["record_ref"] for k in range(3)] == [f"{path}#{i} (id={n})" for i, n in
                                                          ((0, "g0"), (1, "t1"), (3, "g3"))]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, suffix):
    records = [good(0), good(1, image=False)]
    text = json.dumps(records) if suffix == ".json" else "\n".join(json.dumps(r) for r in records)
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    store = open_llava_json(path, tmp_path / "cache")
    assert [store[i] for i in range(len(store))] == records


def test_each_bad_record_is_counted_once(tmp_path, root, processor):
    """90 good records and 10 consecutive truncated PNGs: 10 bad records, however often they are met."""
    from vlmablate.data.verdict import BadRecordTally

    png = (root / "images" / "ok.png").read_bytes()
    for k in range(10):
        (root / "images" / f"cut{k}.png").write_bytes(png[: len(png) // 2])
    records = [good(i) for i in range(90)]
    records += [{"id": f"c{k}", "image": f"cut{k}.png", "conversations": turns("<image>\nWhat?")} for k in range(10)]
    path = write(tmp_path / "d.json", records)
    checked = build(data_config(path, root, on_bad_sample="skip", max_bad_fraction=1.0, verify_images=True),
                    processor, tmp_path)  # what data.check sees: the scan verifies every image
    assert checked.report()["bad"] == 10 and checked.report()["sources"]["src"]["bad"] == {"unreadable_image": 10}
    mixed = build(data_config(path, root, on_bad_sample="skip", max_bad_fraction=0.2), processor, tmp_path)
    assert mixed.report()["bad"] == 0 and len(mixed) == 100  # found only when decoded
    collate = LlavaCollator(processor.tokenizer.pad_token_id)
    tally = BadRecordTally(records=100, scanned_bad=0, limit=0.2)
    met = 0
    for epoch in range(2):
        order = np.random.default_rng(epoch).permutation(100)
        for batch in np.array_split(order, 25):
            skipped = collate([mixed[int(k)] for k in batch]).get("bad_samples", [])
            met += len(skipped)
            tally.add(skipped)
    assert met > 20  # each bad record is met as its own sample every epoch, and again as a neighbour's substitute
    assert tally.counts() == {"unreadable_image": 10}
    assert tally.examples(2) == [f"{path}#90 (id=c0)", f"{path}#91 (id=c1)"]
    strict = BadRecordTally(records=100, scanned_bad=0, limit=0.05)
    with pytest.raises(DataError) as caught:
        strict.add(collate([mixed[90]])["bad_samples"])  # record 90: all ten are tried before record 0 encodes
    assert str(caught.value) == (
        f"10 of 100 records are bad (10.00%; found while encoding: {{'unreadable_image': 10}}, e.g. "
        f"['{path}#90 (id=c0)', '{path}#91 (id=c1)', '{path}#92 (id=c2)']), more than data.max_bad_fraction=5.00%: "
        "fix the data, or raise the limit knowingly")


def test_skip_stops_when_bad_fraction_passes_the_limit(tmp_path, root, processor):
    path = write(tmp_path / "d.json", [good(0), good(1), good(2), BROKEN["missing_image"]])
    with pytest.raises(DataError, match=r"1 of 4 records are bad \(25\.00%\), more than data\.max_bad_fraction"):
        build(data_config(path, root, on_bad_sample="skip", max_bad_fraction=0.2), processor, tmp_path)


def test_corrupt_pixels_found_while_encoding_are_skipped_and_counted(tmp_path, root, processor):
    # Without verify_images the scan only checks that the file exists; decoding happens in the worker.
    records = [good(0), BROKEN["unreadable_image"], good(2), good(3, image=False)]
    path = write(tmp_path / "d.json", records)
    mixed = build(data_config(path, root, on_bad_sample="skip"), processor, tmp_path)
    assert len(mixed) == 4
    sample = mixed[1]  # record 1 fails; the next record of the source is served instead
    skipped = (f"{path}#1 (id=b10)", "unreadable_image")
    assert sample["bad_samples"] == [skipped] and sample["index"] == 2
    assert sample["record_ref"] == f"{path}#2 (id=g2)"  # the substitute says which record it is
    batch = LlavaCollator(processor.tokenizer.pad_token_id)([mixed[0], sample])
    assert batch["bad_samples"] == [skipped]
    strict = build(data_config(path, root), processor, tmp_path)
    with pytest.raises(DataError, match=r"d\.json#1 \(id=b10\): cannot read image") as err:
        strict[1]
    assert err.value.reason == "unreadable_image"


# --- mixes -----------------------------------------------------------------------------------------


def test_subset_suffix_and_validation():
    assert split_subset("llava_pretrain#3000") == ("llava_pretrain", 3000)
    assert split_subset("plain") == ("plain", None)
    for bad in ("x#0", "x#-3", "#5", "x#many"):
        with pytest.raises(ConfigError, match="subset suffix"):
            split_subset(bad)


def test_share_counts_weights_and_determinism():
    pool = np.arange(100)
    full = share(pool, SourceConfig(name="a"), seed=0, position=0)
    assert (full == pool).all()
    a = share(pool, SourceConfig(name="a#30"), seed=0, position=0)
    assert len(a) == 30 and len(set(a)) == 30
    assert (a == share(pool, SourceConfig(name="a", count=30), seed=0, position=0)).all()  # #N == count
    assert not (a == share(pool, SourceConfig(name="a#30"), seed=1, position=0)).all()  # the seed decides
    assert not (a == share(pool, SourceConfig(name="a#30"), seed=0, position=1)).all()  # and the position
    assert len(share(pool, SourceConfig(name="a", weight=0.25), seed=0, position=0)) == 25
    over = share(pool, SourceConfig(name="a", weight=2.5), seed=0, position=0)
    assert len(over) == 250 and np.bincount(over).min() == 2 and np.bincount(over).max() == 3


def test_mix_proportions_and_lengths_follow_the_sources(tmp_path, root, processor):
    images = write(tmp_path / "images.json", [good(i) for i in range(40)])
    texts = write(tmp_path / "texts.json", [good(i, image=False) for i in range(10)])
    data = DataConfig(name="mix", seed=7, sources=[
        SourceConfig(name="img#12", kind="llava_json", path=str(images), image_root=str(root / "images")),
        SourceConfig(name="txt", kind="llava_json", path=str(texts), weight=3.0)])
    mixed = build(data, processor, tmp_path)
    assert len(mixed) == 42
    assert sum(n > 0 for n in mixed.lengths) == 12 and sum(n < 0 for n in mixed.lengths) == 30
    assert mixed.report()["sources"]["img#12"]["in_mix"] == 12
    again = build(data, processor, tmp_path)
    assert [again.locate(k) for k in range(42)] == [mixed.locate(k) for k in range(42)]
    assert mixed[0]["input_ids"].shape == again[0]["input_ids"].shape


def test_data_config_rules():
    cfg, _ = compose_run("data=llava_json", "data.path=/x.json")
    assert cfg.data.path == "/x.json" and cfg.data.sources[0].kind == "llava_json"
    for overrides, message in [
        (["data=llava_json", "data.path=/x.json", "data.on_bad_sample=ignore"], "on_bad_sample"),
        (["data=llava_json", "data.path=/x.json", "data.max_bad_fraction=2"], "max_bad_fraction"),
        (["data=llava_json", "data.path=/x.json", "data.sources.0.count=0"], "count=0 must be >= 1"),
        (["data=llava_json", "data.path=/x.json", "+data.sources.0.weight=0.5", "data.sources.0.count=5"],
         "not several"),
        (["data=llava_json", "data.path=/x.json", "data.sources.0.kind=tar"], "kind='tar'"),
    ]:
        cfg, _ = compose_run(*overrides)
        with pytest.raises(ConfigError, match=message):
            validate(cfg)


# --- image modes -----------------------------------------------------------------------------------


def image_dataset(processor, root, mode):
    return LlavaJsonDataset([good(0)], source_path=root / "d.json", image_root=root / "images", processor=processor,
                            template="chat", max_length=4096, image_aspect=mode)


def test_image_modes_on_llava(root, processor):
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    for mode in ("square", "pad"):
        sample = image_dataset(processor, root, mode)[0]
        assert sample["pixel_values"].shape == (1, 3, 32, 32)
        assert int((sample["input_ids"] == image_token).sum()) == 16  # (32 / 8)^2 patches
    padded = image_dataset(processor, root, "pad").load_image(0)
    assert padded.size == (40, 40)
    assert padded.getpixel((0, 0)) == tuple(int(x * 255) for x in processor.image_processor.image_mean)
    assert image_dataset(processor, root, "square").load_image(0).size == (40, 20)  # the processor crops


def test_image_modes_on_llava_next(root, next_processor):
    image_token = next_processor.tokenizer.convert_tokens_to_ids("<image>")
    counts = {}
    for mode in ("anyres", "pad", "square"):
        sample = image_dataset(next_processor, root, mode)[0]
        pixel_values, sizes = sample["pixel_values"], sample["image_sizes"]
        assert pixel_values.dim() == 5 and pixel_values.shape[2:] == (3, 32, 32)  # tiles of the base size
        counts[mode] = int((sample["input_ids"] == image_token).sum())
        expected = next_processor._get_number_of_features(int(sizes[0, 0]), int(sizes[0, 1]), 32, 32)
        assert counts[mode] == expected - (next_processor.vision_feature_select_strategy == "default")  # no CLS
    assert tuple(image_dataset(next_processor, root, "anyres")[0]["image_sizes"][0].tolist()) == (20, 40)
    assert tuple(image_dataset(next_processor, root, "pad")[0]["image_sizes"][0].tolist()) == (40, 40)
    assert counts["anyres"] != counts["pad"]


def test_model_image_aspect_wins_over_the_stage():
    from vlmablate.train.runner import image_aspect_of

    cfg, _ = compose_run("model=llava16_mistral_7b")
    assert cfg.model.image_aspect == "anyres" and image_aspect_of(cfg) == "anyres"
    cfg, _ = compose_run()
    assert image_aspect_of(cfg) == cfg.stage.image_aspect == "pad"


# --- end to end ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_with_skipped_records_reports_them(tmp_path, root, run_cell):
    # two records the scan rejects, and three in a row whose pixels only fail when decoded in training
    records = [good(i, image=i % 3 != 0) for i in range(30)]
    records += [BROKEN["missing_image"], BROKEN["unknown_role"]]
    records += [{**BROKEN["unreadable_image"], "id": f"b10-{k}"} for k in range(3)]
    path = write(tmp_path / "d.json", records)
    summary = run_cell("data=llava_json", f"data.path={path}", f"data.image_root={root / 'images'}",
                       "data.on_bad_sample=skip", "data.max_bad_fraction=0.15", "train.max_steps=-1",
                       "train.num_train_epochs=2", "train.save_steps=100", "eval=none", "freeze=lora_llm")
    assert summary["status"] == "completed"
    data = summary["data"]
    assert data["bad"] == 2 and data["sources"]["llava_json"]["bad"] == {"unknown_role": 1, "missing_image": 1}
    # each corrupt record once, though each was met in both epochs and as its neighbours' substitute candidate
    assert data["records_in_mix"] == 33 and data["bad_at_encode"] == {"unreadable_image": 3}
    assert data["bad_at_encode_examples"] == [f"{path}#{i} (id=b10-{i - 32})" for i in (32, 33, 34)]
    assert data["bad_total"] == 5  # of 35 records: 14.3%, under the limit
    assert summary["train"]["samples_seen"] == 66 and 0 < summary["train"]["padding_efficiency"] <= 1
    with pytest.raises(DataError, match=r"d\.json#30 \(id=b9\): bad record \(missing_image\)"):
        run_cell("data=llava_json", f"data.path={path}", f"data.image_root={root / 'images'}", "eval=none",
                 name="strict")
    assert json.loads((tmp_path / "strict" / "summary.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_check_command_on_a_broken_data_set(tmp_path, root):
    from vlmablate.data.check import check_data, format_report

    path = write(tmp_path / "d.json", [good(0), good(1, image=False), *BROKEN.values()])
    cfg, _ = compose_run("model=tiny_random", "data=llava_json", f"data.path={path}",
                         f"data.image_root={root / 'images'}", "train.progress=false")
    report, ok = check_data(cfg, tmp_path)
    # the run's own scan does not decode images: the corrupt one is in the mix, and found when decoded
    assert not ok and report["bad"] == len(BROKEN) and report["in_mix"] == 3
    source = report["sources"]["llava_json"]
    assert {**source["bad"], **source["bad_when_encoded"]} == {reason: 1 for reason in BROKEN}
    assert source["bad_when_encoded"] == {"unreadable_image": 1}
    text = format_report(report)
    assert "bad: image_outside_root" in text and "NOT OK: a run would stop" in text
    # a record whose answer lies beyond model.max_length (256) is named, not called usable
    assert f"  bad: {'answer_truncated':<32} {1:>8,}   e.g. {path}#13 (id=b11)" in text.splitlines()
    assert json.loads((tmp_path / "data_check.json").read_text())["bad"] == len(BROKEN)
    clean = write(tmp_path / "clean.json", [good(0), good(1, image=False)])
    cfg, _ = compose_run("model=tiny_random", "data=llava_json", f"data.path={clean}",
                         f"data.image_root={root / 'images'}", "train.progress=false")
    report, ok = check_data(cfg)
    assert ok and report["sources"]["llava_json"]["encoded"] == 2


def test_mixed_dataset_is_a_torch_dataset(tmp_path, root, processor):
    path = write(tmp_path / "d.json", [good(0), good(1, image=False)])
    mixed = build(data_config(path, root), processor, tmp_path)
    assert isinstance(mixed, MixedDataset) and isinstance(mixed, torch.utils.data.Dataset)
    collate = LlavaCollator(processor.tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(mixed, batch_size=2, collate_fn=collate, num_workers=1)
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape == (1, 3, 32, 32)


def test_preflight_checks_each_source_of_a_mix_under_its_policy(tmp_path, root, processor):
    from vlmablate.data.dataset import preflight

    images = write(tmp_path / "images.json", [good(i) for i in range(4)] + [BROKEN["unreadable_image"]])
    texts = write(tmp_path / "texts.json", [good(i, image=False) for i in range(3)])
    data = DataConfig(name="mix", on_bad_sample="skip", max_bad_fraction=0.5, sources=[
        SourceConfig(name="img", kind="llava_json", path=str(images), image_root=str(root / "images")),
        SourceConfig(name="txt", kind="llava_json", path=str(texts))])
    mixed = build(data, processor, tmp_path)
    assert [len(v) for v in mixed.source_views] == [5, 3]
    assert mixed.source_views[1].record_ref(0).endswith("texts.json#0 (id=t0)")
    # the corrupt image is only found by decoding: skipped, not fatal, under skip; image sample 4 is served
    # by record 0 again, so 4 + 3 distinct records were encoded, and the bad one is counted under `bad`
    assert preflight(mixed, max_records=8) == {"checked": 7, "fully_masked": 0, "examples": [],
                                               "bad": {"unreadable_image": 1}}


def test_preflight_reports_a_substitute_under_its_own_reference(tmp_path, root, processor, monkeypatch):
    from vlmablate.data import dataset as dataset_module
    from vlmablate.data.dataset import preflight

    encode = dataset_module.encode_conversation

    def masking(conversations, **kwargs):  # record g2's template does not fit: every label masked
        out = encode(conversations, **kwargs)
        if "(id=g2)" in kwargs["record_ref"]:
            out["labels"] = torch.full_like(out["labels"], -100)
        return out

    monkeypatch.setattr(dataset_module, "encode_conversation", masking)
    path = write(tmp_path / "d.json", [good(0), BROKEN["unreadable_image"], good(2), good(3), good(4)])
    mixed = build(data_config(path, root, on_bad_sample="skip", max_bad_fraction=0.5), processor, tmp_path)
    # sample 1 (the corrupt record 1) is served by record 2: the masked result is record 2's, not record 1's
    assert preflight(mixed) == {"checked": 4, "fully_masked": 1, "examples": [f"{path}#2 (id=g2)"],
                                "bad": {"unreadable_image": 1}}
