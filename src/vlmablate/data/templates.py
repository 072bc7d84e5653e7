"""Conversation templates: LLaVA's `plain` (stage 1) and chat templates (stage 2) with label masking.

`encode_conversation` turns one LLaVA conversation into `input_ids` / `labels` for the model. The
rules, each one tested:

- Where `<image>` goes. With LLaVA's own templates (`plain`, `plain_eos`, and `chat` on the built-in
  Vicuna v1), a human turn holding `<image>` is rewritten as LLaVA's `preprocess_multimodal` does: the
  marker is taken out, the rest stripped, and `<image>\n` put in front ("What is this?\n<image>" trains
  as "<image>\nWhat is this?"). A tokenizer's own chat template gets the marker where the record has it.
- Rendering. `plain` is LLaVA's stage 1: `<image>` + caption + "\n" (the separator), loss on the caption
  and the "\n", no EOS; `plain_eos` ends the caption with EOS instead. `chat` is the tokenizer's own chat
  template (Vicuna v1 when it has none), rendered through `apply_chat_template`.
- Reply spans. The span of assistant turn i is what rendering turns 0..i adds to rendering turns 0..i-1
  with the generation prompt: the reply plus whatever the template closes it with (Vicuna's `</s>`).
  A template that appends EOS only when there is no generation prompt (Phi-3) has that EOS dropped
  from every reply but the last, which is where the full conversation has it.
- Labels. A token is trained when its first character lies in a reply span. A token that straddles the
  prompt/reply boundary (it starts in the prompt) is not: no prompt character is ever trained.
- Text is text. Control tokens (`</s>`, `<|im_end|>`...) written inside a message are wrapped with
  transformers' `mark_control_tokens` and encoded as plain text (`encode_marked_chat`, and the processor
  with `sanitize_control_tokens=True`); only the template's own control tokens, BOS, and the record's one
  validated `<image>` marker are real tokens.
- BOS. If the tokenizer has a BOS token and the rendered text does not start with it, its text is
  prefixed; all tokenization uses add_special_tokens=False, so BOS appears exactly once.
- The HF processor expands `<image>` to the model's image tokens; its ids must equal ours token for
  token outside the image run, or the record raises (a tokenizer/processor mismatch).
- Truncation cuts from the end, never into the image tokens (`too_long`), and never away every trained
  token (`answer_truncated`).

Anything that does not line up raises `TemplateError` naming the record and a reason code.
"""

from __future__ import annotations

import json
import re
import weakref
from functools import lru_cache

import torch
from transformers.utils.chat_template_utils import encode_marked_chat, mark_control_tokens

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"  # how LLaVA JSON marks the image inside a human turn
TEMPLATES = ("plain", "plain_eos", "chat")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# The private-use characters transformers' `mark_control_tokens` wraps a control token in, read from the
# function itself so that this module follows whatever the installed version writes.
_MARK_START, _MARK_END = mark_control_tokens("x", re.compile("x")).split("x")

# Vicuna v1 as LLaVA-1.5 trains it (`--version v1` = conv_vicuna_v1: the "user" system prompt, sep " "
# after user turns and "</s>" after assistant turns), as a Jinja chat template so that one mechanism
# renders every model's conversations. Content may be a string (LLaVA JSON, "<image>\n..." inline) or a
# list of HF content items.
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                    "gives helpful, detailed, and polite answers to the user's questions.")
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
    image_token = image_token_of(processor)
    text, spans = render_conversation(messages, template=template, tokenizer=tokenizer, image_token=image_token,
                                      has_image=image is not None, ref=record_ref)
    ids, offsets = tokenize_rendered(text, tokenizer, record_ref)
    labels = [tid if _starts_in_spans(start, spans) else IGNORE_INDEX for tid, (start, _) in zip(ids, offsets)]
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


def image_token_of(processor) -> str:
    """How the processor spells the image token (LLaVA JSON always writes `<image>`)."""
    return getattr(processor, "image_token", None) or IMAGE_MARKER


def fully_masked(labels) -> bool:
    """True when no position carries a loss (every label is IGNORE_INDEX, or there are none)."""
    return bool((torch.as_tensor(labels) == IGNORE_INDEX).all())


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
        if value is not None and not isinstance(value, str):
            raise TemplateError(f"{ref}: turn {k} ({raw_role}) has a value of type {type(value).__name__} "
                                f"({json.dumps(value)[:40]}), expected a string", "malformed_record")
        if value is None or not value.strip():
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


def render_conversation(messages: list[dict], *, template: str, tokenizer, image_token: str, has_image: bool,
                        ref: str, first_reply_only: bool = False) -> tuple[str, list]:
    """The text the model reads (BOS included, control tokens in content marked) and its reply spans.

    `messages` come from `to_messages` and `check_image_marker`. With `first_reply_only`, only the first
    reply's span is computed (what the scan needs for `answer_truncated`), with fewer renders.
    """
    chat_template, name = chat_template_of(tokenizer)
    if template != "chat" or chat_template == VICUNA_V1_CHAT_TEMPLATE:
        messages = llava_image_first(messages)
    messages = _mark_content(messages, tokenizer, chat_template, image_token)
    if template == "chat":
        text, spans = _render_chat(messages, tokenizer, chat_template, name, ref, first_reply_only)
    else:
        text, spans = _render_plain(messages, tokenizer, has_image, image_token, template, ref)
    return _with_bos(text, spans, tokenizer)


def llava_image_first(messages: list[dict]) -> list[dict]:
    """LLaVA's `preprocess_multimodal` on each turn holding `<image>`: marker out, the rest stripped, then
    `<image>\n` + the rest, stripped again (so a turn of the marker alone is just `<image>`)."""
    out = []
    for m in messages:
        if IMAGE_MARKER in m["content"]:
            rest = m["content"].replace(IMAGE_MARKER, "").strip()
            m = {**m, "content": (IMAGE_MARKER + "\n" + rest).strip()}
        out.append(m)
    return out


def _mark_content(messages: list[dict], tokenizer, chat_template: str, image_token: str) -> list[dict]:
    """Every control token written in a message is wrapped by `mark_control_tokens` (so it is encoded
    as text), except the record's one validated `<image>` marker, which becomes the processor's image
    token."""
    pattern = _control_token_pattern(tokenizer, chat_template)
    return [{**m, "content": image_token.join(mark_control_tokens(part, pattern)
                                               for part in m["content"].split(IMAGE_MARKER))}
            for m in messages]


def _control_token_pattern(tokenizer, chat_template: str) -> re.Pattern:
    """The tokens `apply_chat_template(sanitize_control_tokens=True)` treats as control tokens (every special
    token, and the added tokens the template writes), as one regex, longest first; kept per tokenizer, as
    listing them costs more than encoding a short record when there are hundreds of added tokens."""
    cache = _PATTERNS.setdefault(tokenizer, {})
    key = (chat_template, len(tokenizer))  # tokens added later change the length
    if key not in cache:
        control = getattr(tokenizer, "_get_control_tokens", None)
        if control is not None:
            tokens = tuple(control(chat_template))
        else:  # not a transformers tokenizer: its special tokens
            tokens = tuple(getattr(tokenizer, "all_special_tokens", ()))
        cache[key] = _alternation(tokens)
    return cache[key]


_PATTERNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@lru_cache(maxsize=64)
def _alternation(tokens: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)")


def _render_plain(messages, tokenizer, has_image: bool, image_token: str, template: str,
                  ref: str) -> tuple[str, list]:
    """LLaVA stage 1: `<image>` + caption + "\n" (plain) or + EOS (plain_eos); the human text is dropped,
    as LLaVA's plain does."""
    if not has_image:
        raise TemplateError(f"{ref}: the plain template needs an image (text-only record)", "marker_without_image")
    if template == "plain_eos" and not tokenizer.eos_token:
        raise TemplateError(f"{ref}: the plain_eos template needs an eos token and the tokenizer has none")
    caption = next(m["content"] for m in messages if m["role"] == "assistant")
    text = image_token + caption + ("\n" if template == "plain" else tokenizer.eos_token)
    return text, [(len(image_token), len(text))]


def chat_template_of(tokenizer) -> tuple[str, str]:
    """The tokenizer's own chat template, else Vicuna v1; with a name for error messages."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own:
        return own, f"the chat template of tokenizer {getattr(tokenizer, 'name_or_path', '') or '?'!r}"
    return VICUNA_V1_CHAT_TEMPLATE, "the built-in Vicuna v1 chat template"


def _render_chat(messages, tokenizer, chat_template: str, name: str, ref: str,
                 first_reply_only: bool = False) -> tuple[str, list]:
    """Render with the chat template; reply spans come from renders of growing prefixes.

    The span of assistant turn i starts where the render of messages[:i] with the generation prompt
    ends, and ends where the render of messages[:i+1] stops agreeing with the full render. This needs
    no knowledge of the template, only that its renders are prefix-consistent, with one allowance:
    a template that closes a conversation with EOS when there is no generation prompt (Phi-3) renders
    messages[:i+1] with an EOS that the full conversation has only at its end; it is not part of
    reply i's span unless reply i is the last.
    """

    def render(msgs, generation_prompt):
        try:
            return tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=generation_prompt, chat_template=chat_template
            )
        except Exception as err:  # jinja raises anything from TemplateError to TypeError
            raise TemplateError(f"{ref}: {name} failed to render the conversation: {err}") from err

    full = render(messages, False)
    eos = getattr(tokenizer, "eos_token", None) or None
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        if first_reply_only:
            if not full.startswith(prompt):
                _raise_inconsistent(ref, name, i)
            return full, [(len(prompt), len(full))]
        upto = render(messages[: i + 1], False)
        if eos and not full.startswith(upto) and upto.endswith(eos):
            upto = upto[: -len(eos)]  # the closing EOS of a conversation that ends here (Phi-3)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            _raise_inconsistent(ref, name, i)
        if message["content"].strip() not in upto[len(prompt):]:
            raise TemplateError(f"{ref}: {name} does not place the answer of turn {i} after its prompt")
        spans.append((len(prompt), len(upto)))
    return full, spans


def _raise_inconsistent(ref: str, name: str, turn: int):
    raise TemplateError(
        f"{ref}: {name} is not prefix-consistent at turn {turn}: the render up to the generation "
        "prompt is not a prefix of the render with the answer, so the answer cannot be located"
    )


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


def tokenize_rendered(text: str, tokenizer, ref: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of a rendered text and each token's character offsets in it.

    Unmarked text is tokenized in one call. Marked text is encoded the way `encode_marked_chat` encodes
    it (what the processor does with `sanitize_control_tokens=True`): the pieces between marked tokens
    tokenized with the template's control tokens real, each marked token as plain text. The ids are then
    checked against `encode_marked_chat` itself; a marked token's ids all carry the offsets of its text.
    """
    if _MARK_START not in text and _MARK_END not in text:
        return _tokenize_piece(tokenizer, text, 0, ref)
    ids, offsets = [], []
    splitter = _marker_pattern(tuple(tokenizer.added_tokens_encoder))
    cursor = 0
    newline_ids = tokenizer.encode("\n", add_special_tokens=False)
    for match in splitter.finditer(text):
        piece_ids, piece_offsets = _tokenize_piece(tokenizer, text[cursor:match.start()], cursor, ref,
                                                   after=newline_ids if cursor else None)
        ids += piece_ids
        offsets += piece_offsets
        if match.group(1) is not None:  # a marked control token: plain text (a lone marker is dropped)
            as_text = _encode_marked(tokenizer, match.group(0), ref)
            ids += as_text
            offsets += [(match.start(1), match.end(1))] * len(as_text)
        cursor = match.end()
    piece_ids, piece_offsets = _tokenize_piece(tokenizer, text[cursor:], cursor, ref,
                                               after=newline_ids if cursor else None)
    ids += piece_ids
    offsets += piece_offsets
    if ids != _encode_marked(tokenizer, text, ref):
        raise TemplateError(f"{ref}: control tokens in the text could not be encoded as text consistently with "
                            "transformers' encode_marked_chat; this tokenizer is not supported for such records")
    return ids, offsets


def _encode_marked(tokenizer, text: str, ref: str) -> list[int]:
    try:
        return encode_marked_chat(tokenizer, text)
    except ValueError as err:  # a control token that the tokenizer also produces from its plain text
        raise TemplateError(f"{ref}: {err}") from err


@lru_cache(maxsize=16)
def _marker_pattern(added_tokens: tuple[str, ...]) -> re.Pattern:
    """A marked added token (group 1), or a lone marker, as `encode_marked_chat` splits a text."""
    tokens = _alternation(added_tokens).pattern
    return re.compile(f"{_MARK_START}({tokens}){_MARK_END}|[{_MARK_START}{_MARK_END}]")


def _tokenize_piece(tokenizer, piece: str, start: int, ref: str, after: list[int] | None = None):
    """Ids and absolute offsets of one piece of text. A piece from the middle of a text (`after` = the ids
    of "\n") is tokenized after a newline that is then removed, as `encode_marked_chat` does, so that
    SentencePiece does not add the space it puts at the start of a string."""
    if not piece:
        return [], []
    try:
        if after is not None:
            enc = tokenizer("\n" + piece, add_special_tokens=False, return_offsets_mapping=True)
            if enc["input_ids"][: len(after)] == after:
                return (list(enc["input_ids"][len(after):]),
                        [(a - 1 + start, b - 1 + start) for a, b in enc["offset_mapping"][len(after):]])
        enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as err:  # slow tokenizers have no offsets
        raise TemplateError(f"{ref}: label masking needs a fast tokenizer (offset mapping)") from err
    return list(enc["input_ids"]), [(a + start, b + start) for a, b in enc["offset_mapping"]]


def _starts_in_spans(start: int, spans: list) -> bool:
    # A token is trained when its first character belongs to a reply: the model must emit it after the
    # prompt. A token that starts in the prompt and runs into the reply is not (no prompt character is
    # trained); byte-level tokenizers' leading-space token of " Red" starts at the reply's own space.
    return any(a <= start < b for a, b in spans)


def _run_processor(processor, text: str, image, ref: str):
    """The processor's own expansion of <image> and its pixel_values for this one sample."""
    kwargs = {"text": [text], "return_tensors": "pt", "add_special_tokens": False}
    if _MARK_START in text or _MARK_END in text:  # marked control tokens: text to the processor too
        kwargs["sanitize_control_tokens"] = True
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
    """Cut from the end, but never into the image tokens (the model needs all of them or none), and
    never so that no trained token is left (a sample that teaches nothing is a bad record)."""
    if len(input_ids) <= max_length:
        return input_ids, labels
    image_positions = (input_ids == image_token_id).nonzero().flatten()
    if len(image_positions) and int(image_positions[-1]) >= max_length:
        raise TemplateError(
            f"{ref}: image tokens would be cut: they end at position {int(image_positions[-1]) + 1} "
            f"but max_length is {max_length}; raise max_length or drop the record", "too_long"
        )
    trained = (labels != IGNORE_INDEX).nonzero().flatten()
    if len(trained) and int(trained[0]) >= max_length:
        raise TemplateError(
            f"{ref}: the answer is cut off entirely: its first trained token is at position {int(trained[0]) + 1} "
            f"of {len(input_ids)} but max_length is {max_length}; raise max_length or drop the record",
            "answer_truncated",
        )
    return input_ids[:max_length], labels[:max_length]
