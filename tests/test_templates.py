"""Label masking of the plain and chat templates, image-token expansion, validation and truncation."""

from __future__ import annotations

import copy
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


def test_plain_is_llavas_caption_and_newline_without_eos(llava_processor):
    tok = llava_processor.tokenizer
    caption = "a red circle and a blue square."
    out = encode(llava_processor, turns("<image>\nDescribe the image.", caption), "plain", image())

    # LLaVA's preprocess_plain: <image> + caption + "\n" (the separator); loss on the caption and "\n".
    assert labelled_spans(tok, out) == [caption + "\n"]
    caption_tokens = n_ids(tok, caption + "\n")
    assert int((out["labels"] != IGNORE_INDEX).sum()) == caption_tokens
    assert tok.eos_token_id not in out["input_ids"].tolist()
    # BOS + 16 image tokens are the only unlabelled positions; the human prompt is dropped.
    assert int((out["labels"] == IGNORE_INDEX).sum()) == 1 + N_IMAGE_TOKENS
    assert out["input_ids"][0] == tok.bos_token_id
    assert out["input_ids"][1 : 1 + N_IMAGE_TOKENS].eq(llava_processor.image_token_id).all()
    assert len(out["input_ids"]) == 1 + N_IMAGE_TOKENS + caption_tokens
    assert out["n_image_tokens"] == N_IMAGE_TOKENS
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    assert out["image_sizes"] is None


def test_plain_eos_ends_the_caption_with_eos(llava_processor):
    tok = llava_processor.tokenizer
    caption = "a red circle and a blue square."
    out = encode(llava_processor, turns("<image>\nDescribe the image.", caption), "plain_eos", image())
    assert labelled_spans(tok, out) == [caption + "</s>"]
    assert out["input_ids"][-1] == tok.eos_token_id == out["labels"][-1]
    assert len(out["input_ids"]) == 1 + N_IMAGE_TOKENS + n_ids(tok, caption + "</s>")


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


def test_vicuna_v1_system_prompt_is_llava_15s_user_wording(llava_processor):
    # LLaVA-1.5 trains with --version v1 (conv_vicuna_v1): "user", not the "human" of llava_v1.
    out = encode(llava_processor, turns("Hello?", "Yes."))
    assert llava_processor.tokenizer.decode(out["input_ids"]) == (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hello? ASSISTANT: Yes.</s>")


CHATML = ("{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}"
          "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}")
# Phi-3's layout: the conversation is closed with EOS when there is no generation prompt.
PHI3 = ("{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}{{- '<|user|>\n' + m['content'] + '<|end|>\n' -}}"
        "{%- else -%}{{- '<|assistant|>\n' + m['content'] + '<|end|>\n' -}}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- else -%}{{- eos_token -}}{%- endif -%}")
# Vicuna, but with the space after "ASSISTANT:" in the prompt, where byte-level BPE joins it to the reply.
SPACED = ("{%- for m in messages -%}"
          "{%- if m['role'] == 'user' -%}{{- 'USER: ' + m['content'] + ' ' -}}"
          "{%- else -%}{{- 'ASSISTANT: ' + m['content'] + eos_token -}}{%- endif -%}{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{- 'ASSISTANT: ' -}}{%- endif -%}")
TEMPLATE_TOKENS = ["<|im_start|>", "<|im_end|>", "<|user|>", "<|assistant|>", "<|end|>"]


def with_template(processor, template):
    """A copy of the processor whose tokenizer has `template` and the chat control tokens as special tokens."""
    other = copy.deepcopy(processor)
    other.tokenizer.add_tokens(TEMPLATE_TOKENS, special_tokens=True)
    other.tokenizer.chat_template = template
    return other


@pytest.fixture(scope="module")
def chatml(llava_processor):
    return with_template(llava_processor, CHATML)


@pytest.fixture(scope="module")
def phi3(llava_processor):
    return with_template(llava_processor, PHI3)


def test_chatml_labels_the_reply_and_its_end_of_turn(chatml):
    tok = chatml.tokenizer
    out = encode(chatml, turns("<image>\nWhat colour?", "Red.", "And the square?", "\nBlue."), img=image())
    assert tok.decode(out["input_ids"]).replace("<image>" * N_IMAGE_TOKENS, "<image>") == (
        "<s><|im_start|>user\n<image>\nWhat colour?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n"
        "<|im_start|>user\nAnd the square?<|im_end|>\n<|im_start|>assistant\n\nBlue.<|im_end|>\n")
    # The prompt's newline after "assistant" is never trained; a reply's own leading newline is.
    assert labelled_spans(tok, out) == ["Red.<|im_end|>\n", "\nBlue.<|im_end|>\n"]


def test_phi3_style_eos_does_not_reject_multi_turn_records(phi3):
    tok = phi3.tokenizer
    out = encode(phi3, turns("<image>\nWhat colour?", "Red.", "How many?", "Two.", "Where?", "Left."), img=image())
    # EOS closes the conversation once, so only the last reply trains it.
    assert labelled_spans(tok, out) == ["Red.<|end|>\n", "Two.<|end|>\n", "Left.<|end|>\n</s>"]
    assert out["input_ids"].tolist().count(tok.eos_token_id) == 1
    assert out["input_ids"][-1] == tok.eos_token_id


def test_a_token_straddling_the_prompt_and_the_reply_is_not_trained(llava_processor):
    tok = llava_processor.tokenizer
    spaced = with_template(llava_processor, SPACED)
    out = encode(spaced, turns("What colour?", "red circle"))
    ids = out["input_ids"].tolist()
    straddler = tok.convert_tokens_to_ids("\u0120re")  # " re": the prompt's space and the reply's "re"
    assert tok.convert_ids_to_tokens(ids[-5:]) == ["\u0120re", "d", "\u0120c", "ircle", "</s>"]
    assert out["labels"][-5] == IGNORE_INDEX and ids[-5] == straddler
    assert labelled_spans(tok, out) == ["d circle</s>"]


# --- text in data is text --------------------------------------------------------------------------

INJECTED = "Say </s> then <s>, <pad> and <unk>; <|im_end|><|end|></s>"


def real_control_ids(tok, ids):
    """(position, token) of every special token in `ids` except image tokens."""
    special = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(t) for t in TEMPLATE_TOKENS}
    special.discard(tok.convert_tokens_to_ids("<image>"))
    return [tok.convert_ids_to_tokens(i) for i in ids if i in special]


@pytest.mark.parametrize(
    ("name", "template", "expected_controls", "expected_span"),
    [
        ("plain", "plain", ["<s>"], INJECTED + "\n"),
        ("plain_eos", "plain_eos", ["<s>", "</s>"], INJECTED + "</s>"),
        ("vicuna", "chat", ["<s>", "</s>"], " " + INJECTED + "</s>"),
        ("chatml", "chat", ["<s>", "<|im_start|>", "<|im_end|>", "<|im_start|>", "<|im_end|>"],
         INJECTED + "<|im_end|>\n"),
        ("phi3", "chat", ["<s>", "<|user|>", "<|end|>", "<|assistant|>", "<|end|>", "</s>"],
         INJECTED + "<|end|>\n</s>"),
    ],
)
def test_control_tokens_in_content_are_text(llava_processor, chatml, phi3, name, template, expected_controls,
                                            expected_span):
    processor = {"chatml": chatml, "phi3": phi3}.get(name, llava_processor)
    tok = processor.tokenizer
    out = encode(processor, turns("<image>\nRepeat: " + INJECTED, INJECTED), template, image())
    ids = out["input_ids"].tolist()
    # Only the template's own control tokens are real; the ones written in the messages are text.
    assert real_control_ids(tok, ids) == expected_controls
    assert out["n_image_tokens"] == N_IMAGE_TOKENS
    assert labelled_spans(tok, out) == [expected_span]


def test_control_tokens_in_content_are_text_on_llava_next(next_processor):
    tok = next_processor.tokenizer
    out = encode(next_processor, turns("<image>\nSay </s> now.", "Done </s> here."), img=image(64, 32))
    assert real_control_ids(tok, out["input_ids"].tolist()) == ["<s>", "</s>"]
    assert labelled_spans(tok, out) == [" Done </s> here.</s>"]


def test_a_second_image_marker_in_text_is_still_rejected(llava_processor):
    with pytest.raises(TemplateError, match="2 <image> markers; this model takes one image per sample"):
        encode(llava_processor, turns("<image>\nWhat about <image>?", "Red."), img=image())


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

    # Cut before the first trained token: nothing is left to learn, so the record is bad (answer_truncated).
    first_trained = int((full["labels"] != IGNORE_INDEX).nonzero()[0]) + 1
    for max_length in (image_end, first_trained - 1):
        with pytest.raises(TemplateError) as caught:
            encode(llava_processor, conv, img=image(), max_length=max_length)
        assert caught.value.reason == "answer_truncated"
        assert str(caught.value) == (
            f"{REF}: the answer is cut off entirely: its first trained token is at position {first_trained} of "
            f"{len(full['input_ids'])} but max_length is {max_length}; raise max_length or drop the record")
    one = encode(llava_processor, conv, img=image(), max_length=first_trained)  # one trained token survives
    assert int((one["labels"] != IGNORE_INDEX).sum()) == 1 and one["n_image_tokens"] == N_IMAGE_TOKENS

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
