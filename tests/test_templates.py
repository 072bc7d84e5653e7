"""Label masking of the plain and chat templates, image-token expansion, validation and truncation."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from vlmablate.data.templates import (
    IGNORE_INDEX,
    TemplateError,
    encode_conversation,
    fully_masked,
)
from vlmablate.model.tiny import TinySpec, save_tiny_checkpoint, train_tiny_tokenizer

REF = "data.json#17 (id=abc)"
N_IMAGE_TOKENS = 16  # (32 / 8) ** 2 patches of the tiny llava


@pytest.fixture(scope="module")
def llava_processor(tmp_path_factory):
    return AutoProcessor.from_pretrained(save_tiny_checkpoint(tmp_path_factory.mktemp("llava"), TinySpec()))


@pytest.fixture(scope="module")
def next_processor(tmp_path_factory):
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("llava_next"), TinySpec(arch="llava_next"))
    return AutoProcessor.from_pretrained(folder)


def image(width=32, height=32):
    return Image.new("RGB", (width, height), (200, 30, 30))


def turns(*values, roles=("human", "gpt")):
    return [{"from": roles[k % 2], "value": v} for k, v in enumerate(values)]


def encode(processor, conversations, template="chat", img=None, max_length=512):
    return encode_conversation(
        conversations, template=template, processor=processor, image=img, max_length=max_length, record_ref=REF
    )


def labelled_spans(tokenizer, out):
    """Decode each contiguous run of labelled positions separately."""
    spans, run = [], []
    for token, label in zip(out["input_ids"].tolist(), out["labels"].tolist()):
        if label != IGNORE_INDEX:
            assert label == token  # a label is always the token at its own position
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


def n_ids(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- plain -----------------------------------------------------------------------------------------


def test_plain_labels_only_caption_and_eos(llava_processor):
    tok = llava_processor.tokenizer
    caption = "a red circle and a blue square."
    out = encode(llava_processor, turns("<image>\nDescribe the image.", caption), "plain", image())

    assert labelled_spans(tok, out) == [caption + "</s>"]
    caption_tokens = n_ids(tok, caption + "</s>")
    assert int((out["labels"] != IGNORE_INDEX).sum()) == caption_tokens
    # BOS + 16 image tokens are the only unlabelled positions; the human prompt is dropped.
    assert int((out["labels"] == IGNORE_INDEX).sum()) == 1 + N_IMAGE_TOKENS
    assert out["input_ids"][0] == tok.bos_token_id
    assert out["input_ids"][1 : 1 + N_IMAGE_TOKENS].eq(llava_processor.image_token_id).all()
    assert len(out["input_ids"]) == 1 + N_IMAGE_TOKENS + caption_tokens
    assert out["n_image_tokens"] == N_IMAGE_TOKENS
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    assert out["image_sizes"] is None


def test_plain_needs_an_image(llava_processor):
    with pytest.raises(TemplateError, match=re.escape(REF) + ".*plain template needs an image"):
        encode(llava_processor, turns("Describe.", "a red circle."), "plain")


# --- chat ------------------------------------------------------------------------------------------


def test_chat_single_turn_labels(llava_processor):
    tok = llava_processor.tokenizer
    out = encode(llava_processor, turns("<image>\nWhat colour is the circle?", "Red."), img=image())
    # Byte-level BPE splits the space after "ASSISTANT:" into its own token; the model must emit it.
    assert labelled_spans(tok, out) == [" Red.</s>"]
    assert int((out["input_ids"] == llava_processor.image_token_id).sum()) == N_IMAGE_TOKENS
    assert out["n_image_tokens"] == N_IMAGE_TOKENS
    text = tok.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat colour is the circle?"}, {"role": "assistant", "content": "Red."}],
        tokenize=False,
    )
    # BOS + the rendered text, where the one <image> token became 16.
    assert len(out["input_ids"]) == 1 + n_ids(tok, text) + N_IMAGE_TOKENS - 1


def test_chat_multi_turn_labels_every_answer(llava_processor):
    conv = turns("<image>\nWhat colour is the circle?", "Red.", "How many shapes are there?", "Two.")
    out = encode(llava_processor, conv, img=image())
    assert labelled_spans(llava_processor.tokenizer, out) == [" Red.</s>", " Two.</s>"]
    assert out["input_ids"][0] == llava_processor.tokenizer.bos_token_id
    assert out["labels"][0] == IGNORE_INDEX


def test_chat_system_turn_and_role_aliases(llava_processor):
    tok = llava_processor.tokenizer
    conv = [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "Hello?"},
            {"from": "assistant", "value": "Yes."}]
    out = encode(llava_processor, conv)
    assert tok.decode(out["input_ids"]) == "<s>Be brief. USER: Hello? ASSISTANT: Yes.</s>"
    assert labelled_spans(tok, out) == [" Yes.</s>"]


def test_chat_text_only(llava_processor):
    out = encode(llava_processor, turns("What is two plus three?", "Five."))
    assert labelled_spans(llava_processor.tokenizer, out) == [" Five.</s>"]
    assert out["pixel_values"] is None and out["image_sizes"] is None and out["n_image_tokens"] == 0


def test_tokenizer_without_chat_template_falls_back_to_vicuna(llava_processor, monkeypatch):
    conv = turns("<image>\nWhat colour?", "Red.")
    expected = encode(llava_processor, conv, img=image())
    monkeypatch.setattr(llava_processor.tokenizer, "chat_template", None)
    out = encode(llava_processor, conv, img=image())
    assert torch.equal(out["input_ids"], expected["input_ids"]) and torch.equal(out["labels"], expected["labels"])


@pytest.mark.parametrize("size", [(32, 32), (64, 32), (20, 60)])
def test_llava_next_image_tokens_come_from_the_processor(next_processor, size):
    img = image(*size)
    reference = next_processor(text=["<image>"], images=[img], return_tensors="pt", add_special_tokens=False)
    expected = int((reference["input_ids"] == next_processor.image_token_id).sum())
    out = encode(next_processor, turns("<image>\nWhat colour?", "Red.", "How many?", "One."), img=img)
    assert out["n_image_tokens"] == expected
    assert int((out["input_ids"] == next_processor.image_token_id).sum()) == expected
    assert labelled_spans(next_processor.tokenizer, out) == [" Red.</s>", " One.</s>"]
    assert torch.equal(out["pixel_values"], reference["pixel_values"])
    assert out["image_sizes"].tolist() == [[size[1], size[0]]]


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conversation", "with_image", "reason"),
    [
        (turns("<image>\nWhat?", "Red."), False, "<image> in the text but the record has no image"),
        (turns("What?", "Red."), True, "an image was given but the text has no <image>"),
        (turns("<image>\n<image>\nWhat?", "Red."), True, "one image per sample"),
        (turns("<image>\nWhat?", "Red.", "<image>\nAnd?", "Blue."), True, "one image per sample"),
        (turns("What?", "<image> red"), True, "only appear in a human turn"),
        ([], False, "empty conversation"),
        (turns("What?", "  "), False, "turn 1 .* has an empty value"),
        (turns("What?", "And?", roles=("human", "human")) + turns("x", "Red.")[1:], False, "roles do not alternate"),
        (turns("What?", "Red.", roles=("gpt", "human")), False, "roles do not alternate"),
        ([{"from": "human", "value": "Hi"}, {"from": "system", "value": "S"}], False, "roles do not alternate"),
        ([{"from": "robot", "value": "Hi"}], False, "unknown role 'robot'"),
        (turns("What?"), False, "no assistant"),
    ],
)
def test_validation_errors_name_the_record(llava_processor, conversation, with_image, reason):
    with pytest.raises(TemplateError) as caught:
        encode(llava_processor, conversation, img=image() if with_image else None)
    assert REF in str(caught.value)
    assert re.search(reason, str(caught.value)), str(caught.value)


def test_unknown_template(llava_processor):
    with pytest.raises(TemplateError, match=re.escape(REF) + ".*unknown template"):
        encode(llava_processor, turns("What?", "Red."), template="vicuna")


# --- truncation ------------------------------------------------------------------------------------


def test_truncation_never_cuts_image_tokens(llava_processor):
    conv = turns("<image>\nWhat colour is the circle in the image?", "Red.")
    full = encode(llava_processor, conv, img=image())
    image_end = int((full["input_ids"] == llava_processor.image_token_id).nonzero().max()) + 1

    with pytest.raises(TemplateError, match=re.escape(REF) + ".*image tokens would be cut"):
        encode(llava_processor, conv, img=image(), max_length=image_end - 1)

    # Cut right after the image: the answer is gone, every label is masked, the sample still comes back.
    cut = encode(llava_processor, conv, img=image(), max_length=image_end)
    assert len(cut["input_ids"]) == len(cut["labels"]) == image_end
    assert cut["n_image_tokens"] == N_IMAGE_TOKENS
    assert fully_masked(cut["labels"])
    assert torch.equal(cut["input_ids"], full["input_ids"][:image_end])

    # Cut inside the answer: the kept answer tokens keep their labels.
    keep = len(full["input_ids"]) - 2
    partial = encode(llava_processor, conv, img=image(), max_length=keep)
    assert len(partial["input_ids"]) == keep
    assert torch.equal(partial["labels"], full["labels"][:keep]) and not fully_masked(partial["labels"])


def test_fully_masked():
    assert fully_masked(torch.tensor([IGNORE_INDEX, IGNORE_INDEX]))
    assert fully_masked([])
    assert not fully_masked(torch.tensor([IGNORE_INDEX, 5]))


# --- template / tokenizer mismatches ---------------------------------------------------------------


class _ProcessorWithForeignTokenizer:
    """A processor whose `.tokenizer` is not the tokenizer it uses: the LLaVA #1166 situation."""

    def __init__(self, processor, tokenizer):
        self._processor, self.tokenizer = processor, tokenizer

    def __call__(self, **kwargs):
        return self._processor(**kwargs)

    def __getattr__(self, name):
        return getattr(self._processor, name)


def test_tokenizer_processor_mismatch_raises(llava_processor):
    foreign = _ProcessorWithForeignTokenizer(llava_processor, train_tiny_tokenizer(vocab_size=300))
    with pytest.raises(TemplateError, match=re.escape(REF) + ".*tokenizer/template mismatch"):
        encode(foreign, turns("<image>\nWhat colour is the circle?", "Red."), img=image())


def test_processor_adding_tokens_raises(llava_processor):
    """A processor that adds its own BOS (special tokens on) no longer lines up with our ids."""
    class AddsBos(_ProcessorWithForeignTokenizer):
        def __call__(self, **kwargs):
            out = self._processor(**kwargs)
            bos = torch.tensor([[self.tokenizer.bos_token_id]])
            out["input_ids"] = torch.cat([bos, out["input_ids"]], dim=1)
            return out

    with pytest.raises(TemplateError, match="tokenizer/template mismatch"):
        encode(AddsBos(llava_processor, llava_processor.tokenizer), turns("What?", "Red."))


def test_prefix_inconsistent_chat_template_raises(llava_processor, monkeypatch):
    # The generation prompt says "ASSISTANT:" but answers are rendered after "BOT:".
    bad = (
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}USER: {{ m['content'] }} "
        "{%- else -%}BOT: {{ m['content'] }}{{ eos_token }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
    )
    monkeypatch.setattr(llava_processor.tokenizer, "chat_template", bad)
    with pytest.raises(TemplateError) as caught:
        encode(llava_processor, turns("What?", "Red."))
    message = str(caught.value)
    assert REF in message and "not prefix-consistent" in message and "chat template of tokenizer" in message
