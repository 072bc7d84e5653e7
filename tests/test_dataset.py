"""LLaVA JSON loading, safe image resolution, aspect policies, preflight, the collator and synthetic data."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmablate.data import dataset as dataset_module
from vlmablate.data.collator import LlavaCollator
from vlmablate.data.dataset import DataError, LlavaJsonDataset, expand2square, load_llava_json, preflight
from vlmablate.data.synthetic import write_synthetic_llava
from vlmablate.data.templates import IGNORE_INDEX, fully_masked
from vlmablate.model.tiny import TinySpec, save_tiny_checkpoint


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("llava"), TinySpec())


@pytest.fixture(scope="module")
def next_folder(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("llava_next"), TinySpec(arch="llava_next"))


@pytest.fixture(scope="module")
def processor(llava_folder):
    return AutoProcessor.from_pretrained(llava_folder)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_llava(tmp_path_factory.mktemp("synthetic"), n_caption=16, n_instruct=20)


def qa(question="<image>\nWhat colour is the circle?", answer="Red.", image="img.png", id_="r0"):
    record = {"id": id_, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    return record


def make_dataset(records, processor, root, template="chat", max_length=512, **kwargs):
    return LlavaJsonDataset(records, source_path=root / "data.json", image_root=root, processor=processor,
                            template=template, max_length=max_length, **kwargs)


# --- loading ---------------------------------------------------------------------------------------


def test_load_json_and_jsonl(tmp_path):
    records = [qa(id_="a"), qa(image=None, id_="b")]
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert load_llava_json(tmp_path / "d.json") == records
    assert load_llava_json(tmp_path / "d.jsonl") == records


def test_load_accepts_a_utf8_byte_order_mark(tmp_path):
    records = [qa(id_="a", answer="Rouge éclatant."), qa(image=None, id_="b")]
    (tmp_path / "d.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(records, ensure_ascii=False).encode())
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in records).encode())
    assert load_llava_json(tmp_path / "d.json") == records
    assert load_llava_json(tmp_path / "d.jsonl") == records


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"id": "x"}', "expected a JSON list"),
        ('[{"id": "a", "conversations": []}, 3]', r"d\.json#1 \(id=\?\): record is int"),
        ('[{"id": "a", "conversations": []}, {"id": "b7"}]', r"d\.json#1 \(id=b7\): record has no 'conversations'"),
        ('[{"id": "a", "image": ["x.png", "y.png"], "conversations": []}]', r"#0 \(id=a\).*one image per sample"),
        ("[{", "not valid JSON"),
    ],
)
def test_load_rejects_bad_files(tmp_path, content, reason):
    (tmp_path / "d.json").write_text(content)
    with pytest.raises(DataError, match=reason) as caught:
        load_llava_json(tmp_path / "d.json")
    assert str(tmp_path / "d.json") in str(caught.value)


# --- images ----------------------------------------------------------------------------------------


@pytest.fixture()
def root(tmp_path):
    (tmp_path / "root").mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "root" / "img.png")
    Image.new("RGB", (32, 32), (0, 255, 0)).save(tmp_path / "outside.png")
    return tmp_path / "root"


def test_getitem_returns_encoding_and_index(root, processor):
    ds = make_dataset([qa(image=None, question="Hello?"), qa()], processor, root)
    item = ds[1]
    assert item["index"] == 1 and item["n_image_tokens"] == 16 and item["pixel_values"].shape == (1, 3, 32, 32)
    assert ds[-2]["index"] == 0 and ds[0]["pixel_values"] is None
    with pytest.raises(IndexError):
        ds[2]


@pytest.mark.parametrize("escape", ["../outside.png", "ABSOLUTE", "link.png"])
def test_image_outside_root_is_rejected_without_opening(root, processor, monkeypatch, escape):
    outside = root.parent / "outside.png"
    if escape == "ABSOLUTE":
        escape = str(outside)
    if escape == "link.png":
        (root / "link.png").symlink_to(outside)

    def no_open(*args, **kwargs):
        raise AssertionError("an image outside image_root was opened")

    monkeypatch.setattr(dataset_module.Image, "open", no_open)
    ds = make_dataset([qa(image=escape, id_="evil")], processor, root)
    with pytest.raises(DataError, match=r"data\.json#0 \(id=evil\): .*resolves outside image_root"):
        ds[0]


def test_absolute_path_inside_root_is_accepted(root, processor):
    ds = make_dataset([qa(image=str(root / "img.png"))], processor, root)
    assert ds.load_image(0).size == (40, 20)


def test_missing_image(root, processor):
    ds = make_dataset([qa(image="nope.png", id_="m")], processor, root)
    with pytest.raises(DataError, match=r"data\.json#0 \(id=m\): image file not found: .*nope\.png"):
        ds[0]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image(root, processor, damage):
    data = (root / "img.png").read_bytes()
    (root / "bad.png").write_bytes(b"this is not an image" if damage == "garbage" else data[: len(data) // 2])
    ds = make_dataset([qa(image="bad.png", id_="c")], processor, root)
    with pytest.raises(DataError, match=r"data\.json#0 \(id=c\): cannot read image .*bad\.png"):
        ds[0]


def test_template_errors_become_data_errors(root, processor):
    ds = make_dataset([qa(question="No marker here.", id_="t")], processor, root)
    with pytest.raises(DataError, match=r"data\.json#0 \(id=t\): an image was given but the text has no <image>"):
        ds[0]


def test_pad_mode_pads_with_the_mean_colour(root, processor):
    mean = tuple(int(x * 255) for x in processor.image_processor.image_mean)
    padded = make_dataset([qa()], processor, root, image_aspect="pad")
    image = padded.load_image(0)
    assert image.size == (40, 40) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == mean and image.getpixel((39, 39)) == mean  # the padded bands
    assert image.getpixel((20, 20)) == (255, 0, 0) and image.getpixel((0, 10)) == (255, 0, 0)  # the image
    # After normalisation the padded top rows are (mean // 1/255 - mean) / std, i.e. about 0.
    pixels = padded[0]["pixel_values"][0]
    assert pixels[:, :4, :].abs().max() < 0.03
    assert pixels[0, 16, 16] > 1.5  # red channel of the red image, normalised
    assert make_dataset([qa()], processor, root).load_image(0).size == (40, 20)  # "square": as is


def test_expand2square_keeps_square_images():
    square = Image.new("RGB", (8, 8), (1, 2, 3))
    assert expand2square(square, (0, 0, 0)) is square
    tall = expand2square(Image.new("RGB", (2, 6), (9, 9, 9)), (5, 6, 7))
    assert tall.size == (6, 6) and tall.getpixel((0, 0)) == (5, 6, 7) and tall.getpixel((2, 3)) == (9, 9, 9)


def test_modality_lengths_signs_and_values(root, processor):
    records = [qa(question="<image>\nWhat colour?", answer="Red."), qa(image=None, question="What is two plus three?",
                                                                       answer="Five.")]
    ds = make_dataset(records, processor, root)
    assert ds.modality_lengths() == [4, -6]  # "<image>", "What", "colour?", "Red." / five + one words
    assert ds.modality_lengths(image_tokens=16) == [20, -6]


def test_bad_constructor_arguments(root, processor):
    with pytest.raises(DataError, match="unknown image_aspect"):
        make_dataset([qa()], processor, root, image_aspect="letterbox")
    with pytest.raises(DataError, match="anyres needs a LLaVA-NeXT processor"):
        make_dataset([qa()], processor, root, image_aspect="anyres")
    with pytest.raises(DataError, match="unknown template"):
        make_dataset([qa()], processor, root, template="v1")
    with pytest.raises(DataError, match=r"data\.json#0 \(id=x\): record has no 'conversations'"):
        make_dataset([{"id": "x"}], processor, root)


# --- preflight -------------------------------------------------------------------------------------


def text_records(n_short, n_long):
    short = [qa(image=None, question="What is two plus three?", answer="Five.", id_=f"s{k}") for k in range(n_short)]
    long_question = "Tell me " + "about the red circle and the blue square " * 6 + "?"
    long = [qa(image=None, question=long_question, answer="Yes.", id_=f"l{k}") for k in range(n_long)]
    return short + long


@pytest.fixture()
def mismatched(monkeypatch):
    """Encoding where records with ids starting "l" come out with every label masked, as a template that
    does not match its tokenizer leaves them."""
    encode = dataset_module.encode_conversation

    def masking(conversations, **kwargs):
        out = encode(conversations, **kwargs)
        if "(id=l" in kwargs["record_ref"]:
            out["labels"] = torch.full_like(out["labels"], IGNORE_INDEX)
        return out

    monkeypatch.setattr(dataset_module, "encode_conversation", masking)


def test_preflight_counts_fully_masked(root, processor, mismatched):
    ds = make_dataset(text_records(3, 1), processor, root)
    assert fully_masked(ds[3]["labels"]) and not fully_masked(ds[0]["labels"])
    assert preflight(ds) == {"checked": 4, "fully_masked": 1, "examples": [f"{root / 'data.json'}#3 (id=l0)"],
                             "bad": {}}
    assert preflight(ds, max_records=2) == {"checked": 2, "fully_masked": 0, "examples": [], "bad": {}}


def test_preflight_raises_when_most_labels_are_masked(root, processor, mismatched):
    ds = make_dataset(text_records(1, 3), processor, root)
    examples = [f"{root / 'data.json'}#{k} (id=l{k - 1})" for k in (1, 2, 3)]
    with pytest.raises(DataError) as caught:
        preflight(ds)
    assert str(caught.value) == (
        f"{root / 'data.json'}: 3 of the first 4 records: every label is masked: the template does not match the "
        f"tokenizer, training would learn nothing. Examples: {examples}")


def test_preflight_checks_concatenated_sources_separately(root, processor, mismatched):
    good = make_dataset(text_records(3, 0), processor, root)
    mostly_masked = LlavaJsonDataset(text_records(1, 2), source_path=root / "cut.json", image_root=root,
                                     processor=processor, template="chat", max_length=512)
    assert preflight(ConcatDataset([good, good])) == {"checked": 6, "fully_masked": 0, "examples": [], "bad": {}}
    with pytest.raises(DataError, match=r"cut\.json: 2 of the first 3"):
        preflight(ConcatDataset([good, good, good, mostly_masked]))


def test_an_answer_cut_off_by_max_length_is_a_bad_record(root, processor):
    records = text_records(1, 1)
    full = make_dataset(records, processor, root)[1]
    first_trained = int((full["labels"] != IGNORE_INDEX).nonzero()[0]) + 1
    ds = make_dataset(records, processor, root, max_length=first_trained - 1)
    assert not fully_masked(ds[0]["labels"])
    with pytest.raises(DataError) as caught:
        ds[1]
    assert caught.value.reason == "answer_truncated"
    assert str(caught.value) == (
        f"{root / 'data.json'}#1 (id=l0): the answer is cut off entirely: its first trained token is at position "
        f"{first_trained} of {len(full['input_ids'])} but max_length is {first_trained - 1}; raise max_length or "
        "drop the record")


# --- collator and a forward pass through the tiny models -------------------------------------------


def test_collator_pads_and_stacks(root, processor):
    ds = make_dataset([qa(), qa(image=None, question="Hi?", answer="Yes.")], processor, root)
    features = [ds[1], ds[0]]
    batch = LlavaCollator(pad_token_id=processor.tokenizer.pad_token_id)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    n_text, n_image = len(features[0]["input_ids"]), len(features[1]["input_ids"])
    assert batch["input_ids"].shape == (2, n_image)
    assert batch["attention_mask"].sum(1).tolist() == [n_text, n_image]
    assert batch["input_ids"][0, n_text:].eq(processor.tokenizer.pad_token_id).all()
    assert batch["labels"][0, n_text:].eq(IGNORE_INDEX).all()
    assert torch.equal(batch["pixel_values"], features[1]["pixel_values"])

    left = LlavaCollator(pad_token_id=processor.tokenizer.pad_token_id, padding_side="left")(features)
    assert torch.equal(left["input_ids"][0, n_image - n_text:], features[0]["input_ids"])
    assert left["attention_mask"][0, : n_image - n_text].eq(0).all()


def test_collator_text_only_batch_has_no_pixels(root, processor):
    ds = make_dataset(text_records(2, 0), processor, root)
    batch = LlavaCollator(pad_token_id=0)([ds[0], ds[1]])
    assert "pixel_values" not in batch and "image_sizes" not in batch


def test_mixed_batch_forward_llava(synthetic, llava_folder):
    proc = AutoProcessor.from_pretrained(llava_folder)
    records = load_llava_json(synthetic["instruct_json"])
    ds = LlavaJsonDataset(records, source_path=synthetic["instruct_json"], image_root=synthetic["image_root"],
                          processor=proc, template="chat", max_length=256, image_aspect="pad")
    features = [ds[i] for i in range(5)]  # records 0-3 have images, record 4 is text-only
    assert [f["pixel_values"] is None for f in features] == [False] * 4 + [True]
    batch = LlavaCollator(proc.tokenizer.pad_token_id)(features)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    model = AutoModelForImageTextToText.from_pretrained(llava_folder)
    loss = model(**batch).loss
    assert math.isfinite(loss.item()) and loss.item() > 0


def test_mixed_batch_forward_llava_next(root, next_folder):
    proc = AutoProcessor.from_pretrained(next_folder)
    Image.new("RGB", (64, 64), (0, 0, 255)).save(root / "square.png")
    records = [qa(), qa(image=None, question="Hi?", answer="Yes."), qa(image="square.png", answer="Blue.")]
    features = [make_dataset(records, proc, root)[i] for i in range(3)]
    patches = [f["pixel_values"].shape[1] for f in features if f["pixel_values"] is not None]
    assert patches == [3, 5]  # anyres: the 40x20 image takes a 1x2 grid (+ base), the 64x64 one 2x2
    batch = LlavaCollator(proc.tokenizer.pad_token_id)(features)
    assert batch["pixel_values"].shape == (2, max(patches), 3, 32, 32)
    assert batch["pixel_values"][0, 3:].eq(0).all()  # zero patches pad the shorter one
    assert torch.equal(batch["pixel_values"][0, :3], features[0]["pixel_values"][0])
    assert batch["image_sizes"].tolist() == [[20, 40], [64, 64]]
    model = AutoModelForImageTextToText.from_pretrained(next_folder)
    loss = model(**batch).loss
    assert math.isfinite(loss.item()) and loss.item() > 0


# --- synthetic data --------------------------------------------------------------------------------


def test_synthetic_is_deterministic(tmp_path):
    a = write_synthetic_llava(tmp_path / "a", n_caption=8, n_instruct=10, seed=3)
    b = write_synthetic_llava(tmp_path / "b", n_caption=8, n_instruct=10, seed=3)
    c = write_synthetic_llava(tmp_path / "c", n_caption=8, n_instruct=10, seed=4)
    for key in ("pretrain_json", "instruct_json"):
        assert open(a[key], "rb").read() == open(b[key], "rb").read()
    assert open(a["pretrain_json"], "rb").read() != open(c["pretrain_json"], "rb").read()
    for name in ("cap_00000.png", "ins_00003.png"):
        assert (tmp_path / "a/images" / name).read_bytes() == (tmp_path / "b/images" / name).read_bytes()


def test_synthetic_contents(synthetic):
    pretrain, instruct = load_llava_json(synthetic["pretrain_json"]), load_llava_json(synthetic["instruct_json"])
    assert len(pretrain) == 16 and len(instruct) == 20
    assert all(r["conversations"][1]["value"].startswith("a ") for r in pretrain)
    text_only = [r for r in instruct if "image" not in r]
    multi_turn = [r for r in instruct if len(r["conversations"]) >= 4]
    assert len(text_only) == 4  # records 4, 9, 14, 19
    assert len(multi_turn) == 8 and all(len(r["conversations"]) <= 6 for r in multi_turn)
    for record in instruct:
        markers = [turn["value"].count("<image>") for turn in record["conversations"]]
        assert markers == ([1] + [0] * (len(markers) - 1) if "image" in record else [0] * len(markers))
    image = Image.open(f"{synthetic['image_root']}/{pretrain[0]['image']}")
    assert image.size == (32, 32) and image.getpixel((0, 0)) == (255, 255, 255)


def test_synthetic_reuses_a_finished_folder(tmp_path):
    paths = write_synthetic_llava(tmp_path, n_caption=4, n_instruct=5)
    marker = json.dumps([{"id": "kept", "conversations": []}])
    open(paths["pretrain_json"], "w").write(marker)
    write_synthetic_llava(tmp_path, n_caption=4, n_instruct=5)
    assert open(paths["pretrain_json"]).read() == marker  # same parameters: nothing rewritten
    write_synthetic_llava(tmp_path, n_caption=6, n_instruct=5)
    assert len(load_llava_json(paths["pretrain_json"])) == 6  # new parameters: regenerated


def test_synthetic_encodes_cleanly(synthetic, processor):
    for key, template in (("pretrain_json", "plain"), ("instruct_json", "chat")):
        ds = LlavaJsonDataset(load_llava_json(synthetic[key]), source_path=synthetic[key],
                              image_root=synthetic["image_root"], processor=processor, template=template,
                              max_length=256)
        assert preflight(ds) == {"checked": len(ds), "fully_masked": 0, "examples": [], "bad": {}}
        lengths = ds.modality_lengths()
        assert all((length > 0) == ("image" in r) for length, r in zip(lengths, ds.records))
