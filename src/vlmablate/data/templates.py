"""Conversation templates: LLaVA's `plain` (stage 1) and chat templates (stage 2) with label masking.

`encode_conversation` turns one LLaVA conversation into `input_ids` / `labels` for the model:
the text is rendered (plain: `<image>` + caption + eos; chat: the tokenizer's own chat template),
the answer spans are located as characters, mapped to tokens through the fast tokenizer's offsets,
and then carried onto the HF processor's output, which is what expands `<image>` to the model's
image tokens. Anything that does not line up raises `TemplateError` naming the record.

BOS rule: if the tokenizer has a BOS token and the rendered text does not start with it, its text
is prefixed; all tokenization then uses add_special_tokens=False, so BOS appears exactly once.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"  # how LLaVA JSON marks the image inside a human turn
TEMPLATES = ("plain", "chat")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Vicuna v1 as LLaVA writes it (conv_vicuna_v1, sep " " after user turns and "</s>" after assistant
# turns), as a Jinja chat template so that one mechanism renders every model's conversations.
# Content may be a string (LLaVA JSON, "<image>\n..." inline) or a list of HF content items.
VICUNA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                    "gives helpful, detailed, and polite answers to the human's questions.")
VICUNA_V1_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system=\"" + VICUNA_V1_SYSTEM + "\") -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text'] -%}"
    "{%- endif -%}"
    "{{- ns.system }}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = namespace(v='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set text.v = text.v + '<image>\\n' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set text.v = text.v + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = text.v -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- (' ' if loop.first else '') + 'USER: ' + text + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' + text + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' }}{%- endif -%}"
)


class TemplateError(ValueError):
    """A conversation that cannot become a training sample, or a template that does not fit its tokenizer.

    `reason` is a short code from `data.errors.REASONS` (what `data.on_bad_sample=skip` counts by)."""

    def __init__(self, message: str, reason: str = "invalid_conversation"):
        super().__init__(message)
        self.reason = reason


def fully_masked(labels) -> bool:
    """True when no position carries a loss (every label is IGNORE_INDEX, or there are none)."""
    return bool((torch.as_tensor(labels) == IGNORE_INDEX).all())


def encode_conversation(
    conversations: list[dict],
    *,
    template: str,
    processor,
    image=None,
    max_length: int,
    record_ref: str,
) -> dict:
    """Render, tokenize and label one LLaVA conversation, expanding `<image>` through the HF processor.

    Returns `input_ids` and `labels` (LongTensor[L], no batch dim), `pixel_values` and `image_sizes`
    exactly as the processor returns them for one image (None for text-only, and `image_sizes` None
    for processors that do not produce it), and `n_image_tokens` (expanded image positions).
    """
    if template not in TEMPLATES:
        raise TemplateError(f"{record_ref}: unknown template {template!r}; expected one of {TEMPLATES}")
    if not isinstance(max_length, int) or max_length < 1:
        raise TemplateError(f"{record_ref}: max_length must be a positive int, got {max_length!r}")
    messages = to_messages(conversations, record_ref)
    check_image_marker(messages, image, record_ref)
    tokenizer = processor.tokenizer
    image_token = getattr(processor, "image_token", None) or IMAGE_MARKER
    if image_token != IMAGE_MARKER:  # LLaVA JSON always writes <image>; the processor may spell it otherwise
        messages = [{**m, "content": m["content"].replace(IMAGE_MARKER, image_token)} for m in messages]

    if template == "plain":
        text, spans = _render_plain(messages, tokenizer, image, image_token, record_ref)
    else:
        text, spans = _render_chat(messages, tokenizer, record_ref)
    text, spans = _with_bos(text, spans, tokenizer)

    ids, labels = _tokenize_with_labels(text, spans, tokenizer, record_ref)
    expanded = _run_processor(processor, text, image, record_ref)
    image_token_id = _image_token_id(processor, image_token)
    proc_ids = expanded["input_ids"][0].tolist()
    labels = _align_to_processor(ids, labels, proc_ids, image_token_id, tokenizer, record_ref)

    input_ids = torch.tensor(proc_ids, dtype=torch.long)
    labels = torch.tensor(labels, dtype=torch.long)
    input_ids, labels = _truncate(input_ids, labels, image_token_id, max_length, record_ref)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "pixel_values": expanded.get("pixel_values") if image is not None else None,
        "image_sizes": expanded.get("image_sizes") if image is not None else None,
        "n_image_tokens": int((input_ids == image_token_id).sum()),
    }


# --- validation ------------------------------------------------------------------------------------


def to_messages(conversations, ref: str) -> list[dict]:
    """LLaVA turns -> chat messages (roles system/user/assistant, string content), validated."""
    if not isinstance(conversations, list) or not conversations:
        raise TemplateError(f"{ref}: empty conversation (expected a non-empty list of turns)", "empty_turns")
    messages = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise TemplateError(f"{ref}: turn {k} is {type(turn).__name__}, expected an object", "malformed_record")
        raw_role = turn.get("from", turn.get("role"))
        role = _ROLES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise TemplateError(
                f"{ref}: turn {k} has unknown role {raw_role!r}; expected human/user, gpt/assistant or system",
                "unknown_role"
            )
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str) or not value.strip():
            raise TemplateError(f"{ref}: turn {k} ({raw_role}) has an empty value", "empty_turns")
        messages.append({"role": role, "content": value})
    _check_roles(messages, ref)
    return messages


def _check_roles(messages: list[dict], ref: str) -> None:
    """Human and gpt turns alternate, starting with human; a system turn may only come first."""
    offset = 1 if messages[0]["role"] == "system" else 0
    for k, message in enumerate(messages[offset:]):
        expected = "user" if k % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise TemplateError(
                f"{ref}: roles do not alternate: turn {k + offset} is {message['role']} where {expected} "
                "was expected (human/gpt must alternate, starting with human; system only as the first turn)",
                "non_alternating",
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise TemplateError(f"{ref}: no assistant (gpt) turn, so there is nothing to learn", "non_alternating")


def check_image_marker(messages: list[dict], image, ref: str) -> None:
    """Exactly one <image> in a human turn when there is an image, none otherwise."""
    if any(IMAGE_MARKER in m["content"] for m in messages if m["role"] != "user"):
        raise TemplateError(f"{ref}: {IMAGE_MARKER} may only appear in a human turn", "misplaced_image_marker")
    count = sum(m["content"].count(IMAGE_MARKER) for m in messages)
    if count > 1:
        raise TemplateError(
            f"{ref}: {count} {IMAGE_MARKER} markers; this model takes one image per sample",
            "too_many_image_markers")
    if count == 1 and image is None:
        raise TemplateError(f"{ref}: {IMAGE_MARKER} in the text but the record has no image", "marker_without_image")
    if count == 0 and image is not None:
        raise TemplateError(
            f"{ref}: an image was given but the text has no {IMAGE_MARKER} marker",
            "image_without_marker")


# --- rendering: text plus the character spans that carry a loss ----------------------------------


def _render_plain(messages, tokenizer, image, image_token: str, ref: str) -> tuple[str, list]:
    """LLaVA stage 1: `<image>` + caption + eos; the human text is dropped, as LLaVA's plain does."""
    if image is None:
        raise TemplateError(f"{ref}: the plain template needs an image (text-only record)", "marker_without_image")
    if not tokenizer.eos_token:
        raise TemplateError(f"{ref}: the plain template needs an eos token and the tokenizer has none")
    caption = next(m["content"] for m in messages if m["role"] == "assistant")
    text = image_token + caption + tokenizer.eos_token
    return text, [(len(image_token), len(text))]


def chat_template_of(tokenizer) -> tuple[str, str]:
    """The tokenizer's own chat template, else Vicuna v1; with a name for error messages."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own:
        return own, f"the chat template of tokenizer {getattr(tokenizer, 'name_or_path', '') or '?'!r}"
    return VICUNA_V1_CHAT_TEMPLATE, "the built-in Vicuna v1 chat template"


def _render_chat(messages, tokenizer, ref: str) -> tuple[str, list]:
    """Render with the chat template; assistant spans come from renders of growing prefixes.

    The span of assistant turn i is what rendering messages[:i+1] adds to rendering messages[:i]
    with the generation prompt: the answer plus whatever the template closes it with (Vicuna's
    `</s>`). This needs no knowledge of the template, only that its renders are prefix-consistent.
    """
    chat_template, name = chat_template_of(tokenizer)

    def render(msgs, generation_prompt):
        try:
            return tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=generation_prompt, chat_template=chat_template
            )
        except Exception as err:  # jinja raises anything from TemplateError to TypeError
            raise TemplateError(f"{ref}: {name} failed to render the conversation: {err}") from err

    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise TemplateError(
                f"{ref}: {name} is not prefix-consistent at turn {i}: the render up to the generation "
                "prompt is not a prefix of the render with the answer, so the answer cannot be located"
            )
        if message["content"].strip() not in upto[len(prompt):]:
            raise TemplateError(f"{ref}: {name} does not place the answer of turn {i} after its prompt")
        spans.append((len(prompt), len(upto)))
    return full, spans


def _with_bos(text: str, spans: list, tokenizer) -> tuple[str, list]:
    """Prefix the tokenizer's BOS text unless the rendering already starts with it.

    Everything is then tokenized with add_special_tokens=False, so BOS appears exactly once whether
    or not the template emits it (Vicuna does not; Llama-3's does); its label stays IGNORE_INDEX.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or getattr(tokenizer, "bos_token_id", None) is None or text.startswith(bos):
        return text, spans
    return bos + text, [(a + len(bos), b + len(bos)) for a, b in spans]


# --- tokenization and alignment with the processor ------------------------------------------------


def _tokenize_with_labels(text: str, spans: list, tokenizer, ref: str) -> tuple[list, list]:
    """Token ids of `text` (one token per <image>) and labels: the id where the token touches a span."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as err:  # slow tokenizers have no offsets
        raise TemplateError(f"{ref}: label masking needs a fast tokenizer (offset mapping)") from err
    labels = [
        tid if _in_spans(start, end, spans) else IGNORE_INDEX
        for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"])
    ]
    return list(enc["input_ids"]), labels


def _in_spans(start: int, end: int, spans: list) -> bool:
    # A token that overlaps the answer is one the model must emit, so it is trained on; this keeps
    # the leading space token of " Red" that byte-level tokenizers split off.
    if start == end:
        return any(a <= start < b for a, b in spans)
    return any(start < b and end > a for a, b in spans)


def _run_processor(processor, text: str, image, ref: str):
    """The processor's own expansion of <image> and its pixel_values for this one sample."""
    kwargs = {"text": [text], "return_tensors": "pt", "add_special_tokens": False}
    if image is not None:
        kwargs["images"] = [image]
    try:
        return processor(**kwargs)
    except Exception as err:  # image processors raise many types; the record must be named
        raise TemplateError(f"{ref}: the processor failed on this record: {err}") from err


def _image_token_id(processor, image_token: str) -> int:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    return int(token_id)


def _align_to_processor(ids, labels, proc_ids, image_token_id: int, tokenizer, ref: str) -> list:
    """Carry our labels onto the processor's ids: each image-token run there is one image token here.

    Every other id must be identical; otherwise the labels would be applied to different tokens,
    the failure that silently masks every answer (LLaVA #1166, #1706), so it raises.
    """
    out, j = [], 0
    for i, tid in enumerate(ids):
        if tid == image_token_id:
            run = 0
            while j < len(proc_ids) and proc_ids[j] == image_token_id:
                run, j = run + 1, j + 1
            if run == 0:
                _raise_mismatch(ids, proc_ids, i, j, tokenizer, ref)
            out.extend([IGNORE_INDEX] * run)
        elif j < len(proc_ids) and proc_ids[j] == tid:
            out.append(labels[i])
            j += 1
        else:
            _raise_mismatch(ids, proc_ids, i, j, tokenizer, ref)
    if j != len(proc_ids):
        _raise_mismatch(ids, proc_ids, len(ids), j, tokenizer, ref)
    return out


def _raise_mismatch(ids, proc_ids, i: int, j: int, tokenizer, ref: str):
    ours = tokenizer.convert_ids_to_tokens(ids[i : i + 3])
    theirs = tokenizer.convert_ids_to_tokens(proc_ids[j : j + 3])
    raise TemplateError(
        f"{ref}: tokenizer/template mismatch: the processor's input_ids differ from the tokenizer's at "
        f"token {i} (tokenizer {ours} vs processor {theirs}); labels would land on the wrong tokens and "
        "could mask every answer. Use the tokenizer that belongs to the processor."
    )


def _truncate(input_ids, labels, image_token_id: int, max_length: int, ref: str):
    """Cut from the end, but never into the image tokens (the model needs all of them or none)."""
    if len(input_ids) <= max_length:
        return input_ids, labels
    image_positions = (input_ids == image_token_id).nonzero().flatten()
    if len(image_positions) and int(image_positions[-1]) >= max_length:
        raise TemplateError(
            f"{ref}: image tokens would be cut: they end at position {int(image_positions[-1]) + 1} "
            f"but max_length is {max_length}; raise max_length or drop the record", "too_long"
        )
    return input_ids[:max_length], labels[:max_length]
