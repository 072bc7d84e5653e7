"""benchmarks/world_lm_copy.py: the copy losses on crafted models, the repeated texts, and the table."""

from __future__ import annotations

import math
import re
import sys

import pytest
import torch
from conftest import load_benchmark
from transformers import LlamaConfig, LlamaForCausalLM

from vlmablate.model.tiny import train_tiny_tokenizer


@pytest.fixture(scope="module")
def copy():
    return load_benchmark("world_lm_copy")


def tiny_lm(vocab: int = 50) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_an_lm_that_predicts_nothing_scores_log_vocab_on_both_copies(copy):
    model = tiny_lm(50)
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: the uniform distribution at every position
    first, second = copy.copy_losses(model, [[3, 4, 5, 6], [7, 8, 9, 10, 11]], bos_id=1)
    assert first == pytest.approx(math.log(50)) and second == pytest.approx(math.log(50))


def test_the_copies_are_scored_on_the_right_positions(copy, monkeypatch):
    # A "model" that knows the answer at exactly the second copy's positions: loss ~0 there, log V elsewhere.
    seq, vocab = [5, 6, 7, 8], 12
    ids = [1, *seq, *seq]

    class Oracle(torch.nn.Module):
        def forward(self, input_ids):
            logits = torch.zeros(1, len(ids), vocab)
            for i in range(len(seq) + 1, len(ids)):  # position i predicts ids[i + 1] ... of the second copy
                if i + 1 < len(ids):
                    logits[0, i, ids[i + 1]] = 100.0
            return type("Out", (), {"logits": logits})()

    first, second = copy.copy_losses(Oracle(), [seq], bos_id=1)
    assert first == pytest.approx(math.log(vocab))
    assert second == pytest.approx(0.0, abs=1e-6)


def test_repeat_texts_are_a_passage_twice(copy):
    texts = copy.repeat_texts(["red", "circle", "two", "above"], 20, seed=3, lengths=(2, 4))
    assert texts == copy.repeat_texts(["red", "circle", "two", "above"], 20, seed=3, lengths=(2, 4))
    for text in texts:
        words = text.split()
        half = len(words) // 2
        assert 2 <= half <= 4 and words[:half] == words[half:]


def test_random_sequences_avoid_special_tokens_and_words_are_whole(copy):
    tokenizer = train_tiny_tokenizer(300, extra_text="a red circle and a blue square " * 50)
    sequences = copy.random_token_sequences(tokenizer, 10, 7, seed=0)
    assert len(sequences) == 10 and all(len(s) == 7 for s in sequences)
    assert not set(tokenizer.all_special_ids) & {t for s in sequences for t in s}
    words = copy.vocabulary_words(tokenizer)
    assert {"red", "circle", "blue", "square"} <= set(words)
    assert all(w.isalpha() and len(w) > 1 and not w.startswith("Ġ") for w in words)


def test_main_prints_the_world_lm_and_a_trained_one(copy, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["world_lm_copy.py", "--n", "3", "--length", "6", "--train-steps", "2",
                                      "world=test"])
    copy.main()
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\s+(world LM|2 steps, 50% repeats) \|", line)]
    assert len(rows) == 2
    for line in rows:
        first, second, drop = (float(x) for x in re.findall(r"[+-]?\d+\.\d{3}", line)[:3])
        assert first > 0 and second > 0 and drop == pytest.approx(first - second, abs=2e-3)
    assert "held-out perplexity" in rows[1]


def test_a_bad_repeat_share_is_refused(copy, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["world_lm_copy.py", "--repeat-share", "1.0"])
    with pytest.raises(SystemExit):
        copy.main()
