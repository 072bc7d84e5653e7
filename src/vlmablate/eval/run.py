"""Run a model over MMBench-style and TextVQA-style sets: prompts, batched inference, predictions, metrics.

Two labelled answer modes for multiple choice, one record format:
- `generate`: greedy generation and exact-matching extraction under a named VLMEvalKit revision's rule
  (`eval.extraction`), the number comparable to published MMBench results;
- `likelihood`: the scores of the option letters at the answer position from one batched forward,
  the fast mode for sweeps (never unparsed, not comparable to published numbers).
Both write `predictions.jsonl` and the same metrics. A text-only baseline runs the same prompts with
a blank image (the image processor's mean colour), to show that the benchmark needs the image. A test
split (no answers) is not scored: it writes MMBench's submission file for the official server.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from vlmablate.eval.extract import DEFAULT_EXTRACTION, extract_choice
from vlmablate.eval.metrics import Record, circular_metrics
from vlmablate.eval.mmbench import Question, decode_image, prompt_text, read_mmbench_tsv
from vlmablate.eval.submission import write_submission
from vlmablate.eval.vqa import read_textvqa_json, vqa_metrics, vqa_prompt, vqa_score

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"


@dataclass
class Item:
    """One model input: a prompt (with `<image>` first, as LLaVA asks) and its image."""

    key: tuple
    prompt: str
    image: Image.Image


def chat_prompt(processor, text: str) -> str:
    """The user turn `<image>\\n{text}` in the model's chat template, ready for the assistant's reply."""
    messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{text}"}]
    return processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def blank_image(processor, like: Image.Image) -> Image.Image:
    mean = getattr(processor.image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
    return Image.new("RGB", like.size, tuple(int(round(255 * m)) for m in mean))


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _encode(processor, prompts: list[str], images: list[Image.Image], device) -> dict:
    # Left padding: every row's last position is its own answer position.
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in inputs.items()}


def _bos(processor, prompt: str) -> str:
    bos = processor.tokenizer.bos_token
    return prompt if not bos or prompt.startswith(bos) else bos + prompt


@torch.no_grad()
def generate_replies(model, processor, items: list[Item], *, batch_size: int, max_new_tokens: int,
                     progress: bool = False) -> list[str]:
    """Greedy replies, batched."""
    device = next(model.parameters()).device
    replies = []
    for batch in tqdm(list(_batches(items, batch_size)), desc="generate", disable=not progress):
        inputs = _encode(processor, [_bos(processor, it.prompt) for it in batch], [it.image for it in batch], device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        replies += processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    return replies


def letter_continuations(processor, letters: list[str]) -> dict[str, list[int]]:
    """The tokens the chat template puts after the prompt when the answer is each letter (Vicuna: ` A`),
    end-of-turn tokens left out."""
    tok = processor.tokenizer
    out = {}
    for letter in letters:
        messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n"}, {"role": "assistant", "content": letter}]
        full = tok.apply_chat_template(messages, tokenize=False)
        head = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        reply = full[len(head):]
        out[letter] = tok.encode(reply[: reply.index(letter) + len(letter)], add_special_tokens=False)
    return out


@torch.no_grad()
def letter_scores(model, processor, items: list[Item], letters_of: list[list[str]], *, batch_size: int,
                  progress: bool = False) -> list[dict[str, float]]:
    """Log-probability of each option letter's reply (` A`, as the chat template spells it) after the prompt.

    A letter may be one token or several (` A` one token, ` D` a space then `D` in a small BPE). The
    replies form a little tree of token prefixes. Each forward appends one longest path of that tree to
    every prompt and reads the next-token scores at each of its positions, so a path's prefixes come
    from the same forward; a letter's score is the sum along its path. Tokens shared by every letter add
    the same amount to each and are skipped. Each batch is encoded once. With single-token letters (the
    usual case for real tokenizers) that is one batched forward in all, and one per extra branch otherwise.
    """
    device = next(model.parameters()).device
    letters_all = sorted({letter for letters in letters_of for letter in letters})
    conts = letter_continuations(processor, letters_all)
    shared = _common_prefix(list(conts.values()))
    head = tuple(conts[letters_all[0]][:shared])
    prefixes = {tuple(c[shared:shared + j]) for c in conts.values() for j in range(len(c) - shared)}
    paths = sorted(p for p in prefixes if not any(len(q) > len(p) and q[:len(p)] == p for q in prefixes))
    next_logprobs: dict[tuple, list[torch.Tensor]] = {}
    for idx in tqdm(list(_batches(list(range(len(items))), batch_size)), desc="likelihood", disable=not progress):
        encoded = _encode(processor, [_bos(processor, items[i].prompt) for i in idx], [items[i].image for i in idx],
                          device)
        read = set()  # prefixes this batch has scores for (two paths can share one)
        for path in paths:
            inputs = dict(encoded)
            if head + path:  # the same tokens go after every row, so left padding stays valid
                extra = torch.tensor(head + path, device=device).expand(len(idx), -1)
                inputs["input_ids"] = torch.cat([encoded["input_ids"], extra], dim=1)
                inputs["attention_mask"] = torch.cat([encoded["attention_mask"], torch.ones_like(extra)], dim=1)
            # Only the path's positions: a 7B model's full logits are vocab × length floats per row.
            logits = model(**inputs, logits_to_keep=len(path) + 1).logits[:, -(len(path) + 1):, :]
            logprobs = logits.float().log_softmax(-1).cpu()
            for k in range(len(path) + 1):
                if path[:k] not in read:
                    read.add(path[:k])
                    next_logprobs.setdefault(path[:k], []).extend(logprobs[:, k])
    scores = []
    for i, letters in enumerate(letters_of):
        row = {}
        for letter in letters:
            path = conts[letter][shared:]
            row[letter] = float(sum(next_logprobs[tuple(path[:j])][i][path[j]] for j in range(len(path))))
        scores.append(row)
    return scores


def _common_prefix(seqs: list[list[int]]) -> int:
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    # keep at least the last token of the shortest reply: it is what tells the letters apart
    return min(n, min(len(s) for s in seqs) - 1)


# --- MMBench ----------------------------------------------------------------------------------------

def mmbench_items(questions: list[Question], processor, *, blank: bool = False) -> tuple[list[Item], list]:
    items, meta = [], []
    for q in questions:
        image = decode_image(q.image_b64)
        if blank:
            image = blank_image(processor, image)
        for copy in q.copies:
            items.append(Item((q.q, copy.k), chat_prompt(processor, prompt_text(q, copy)), image))
            meta.append((q, copy))
    return items, meta


def evaluate_mmbench(model, processor, tsv: str | Path, *, mode: str, out_dir: Path, circular: str = "auto",
                     split: str = "dev", extraction: str = DEFAULT_EXTRACTION, batch_size: int = 16,
                     max_new_tokens: int = 16, max_questions: int | None = None, blank: bool = False,
                     n_boot: int = 1000, progress: bool = False) -> tuple[dict, list[dict]]:
    """Score one TSV (a test split: write its submission file); write `predictions.jsonl` into `out_dir`;
    return (metrics, prediction rows)."""
    questions = read_mmbench_tsv(tsv, circular=circular, split=split)[:max_questions]
    items, meta = mmbench_items(questions, processor, blank=blank)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        if mode == "generate":
            # Stripped as LLaVA's MMBench script and VLMEvalKit's LLaVA wrapper strip their generations.
            replies = [r.strip() for r in generate_replies(model, processor, items, batch_size=batch_size,
                                                           max_new_tokens=max_new_tokens, progress=progress)]
            predictions = [extract_choice(reply, copy.options, extraction) for reply, (_, copy) in zip(replies, meta)]
            raw = [{"reply": r} for r in replies]
        elif mode == "likelihood":
            scores = letter_scores(model, processor, items, [list(copy.options) for _, copy in meta],
                                   batch_size=batch_size, progress=progress)
            predictions = [max(s, key=s.get) for s in scores]
            raw = [{"letter_scores": s} for s in scores]
        else:
            raise ValueError(f"eval.mode={mode!r} is not one of generate, likelihood")
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    rows = [{"index": copy.index, "q": q.q, "copy": copy.k, "category": q.category, "l2_category": q.l2_category,
             "prediction": pred, "answer": copy.answer, "correct": pred == copy.answer if copy.answer else None, **r}
            for (q, copy), pred, r in zip(meta, predictions, raw)]
    _write_jsonl(out_dir / "predictions.jsonl", rows)
    if split == "test":
        sent = {r["index"]: r["reply"] if mode == "generate" else r["prediction"] for r in rows}
        metrics = unscored_metrics(rows, write_submission(tsv, sent, out_dir))
    else:
        records = [Record(r["q"], r["copy"], r["category"], r["l2_category"], r["prediction"], r["answer"])
                   for r in rows]
        metrics = circular_metrics(records, n_boot=n_boot)
    metrics.update(mode=mode, extraction=extraction if mode == "generate" else None, split=split,
                   seconds=round(seconds, 2), blank_image=blank, tsv=str(tsv))
    return metrics, rows


def unscored_metrics(rows: list[dict], submission: dict) -> dict:
    """What a split without answers can say: its size, the unparsed rate, and where the submission file is."""
    n_unparsed = sum(r["prediction"] is None for r in rows)
    return {"circular_acc": None, "vanilla_acc": None, "circular_ci": [None, None], "vanilla_ci": [None, None],
            "n_questions": len({r["q"] for r in rows}), "n_rows": len(rows), "n_unscored_rows": len(rows),
            "n_unparsed": n_unparsed, "unparsed_rate": n_unparsed / len(rows) if rows else None,
            "submission": submission}


# --- VQA --------------------------------------------------------------------------------------------

def evaluate_vqa(model, processor, path: str | Path, *, out_dir: Path, image_root: str | Path | None = None,
                 use_ocr: bool = True, batch_size: int = 16, max_new_tokens: int = 16,
                 max_questions: int | None = None, blank: bool = False, n_boot: int = 1000,
                 progress: bool = False) -> dict:
    """Score a TextVQA-layout JSON (`blank`: every image replaced by a blank one of its size, the score of a
    model that does not look); write `predictions.jsonl` into `out_dir`; return the metrics."""
    vqa = read_textvqa_json(path, image_root=image_root)[:max_questions]
    items, ocr_given = [], []
    for item in vqa:
        text, ocr = vqa_prompt(item, use_ocr=use_ocr)
        ocr_given.append(ocr)
        with Image.open(item.image) as image:
            image = image.convert("RGB")
        items.append(Item((item.question_id,), chat_prompt(processor, text),
                          blank_image(processor, image) if blank else image))
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        replies = generate_replies(model, processor, items, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   progress=progress)
    finally:
        model.train(was_training)
    scores = [vqa_score(reply.strip(), item.answers) for reply, item in zip(replies, vqa)]
    _write_jsonl(out_dir / "predictions.jsonl", [
        {"question_id": it.question_id, "question": it.question, "reply": r, "score": s, "ocr_given": o}
        for it, r, s, o in zip(vqa, replies, scores, ocr_given)])
    metrics = vqa_metrics(scores, n_boot=n_boot)
    metrics.update(seconds=round(time.perf_counter() - start, 2), ocr_given=any(ocr_given), file=str(path),
                   blank_image=blank)
    return metrics


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
