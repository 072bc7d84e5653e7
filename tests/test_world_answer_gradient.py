"""benchmarks/world_answer_gradient.py on the test-size world: the answer's gradient, where it lands, the table."""

from __future__ import annotations

import random
import re

import pytest
import torch
from conftest import load_benchmark

from vlmablate.world import language
from vlmablate.world.scenes import Obj, Scene, render


@pytest.fixture(scope="module")
def gradient():
    return load_benchmark("world_answer_gradient")


@pytest.fixture(scope="module")
def composed(gradient):
    return gradient.composed_model(["world=test"])


def test_the_gradient_is_the_answer_losses_and_leaves_the_model_as_it_was(gradient, composed):
    _, loaded = composed
    model, processor = loaded.model, loaded.processor
    scene = Scene((Obj("circle", "red", "large", "solid", row=1, col=2, mark="dotted"),))
    item = language.question(scene, "mark", random.Random(0))
    assert item["cells"] == [6]
    tokens, token_grad, feature_grad, loss = gradient.gradients(model, processor, item, render(scene))
    assert tokens.shape == token_grad.shape == (16, model.config.text_config.hidden_size)
    assert feature_grad.shape == (16, model.config.vision_config.hidden_size)
    projector = model.model.multi_modal_projector
    assert not projector._forward_hooks and not projector._forward_pre_hooks
    assert all(p.grad is None for p in model.parameters())  # nothing trains: only the activations get gradients
    # the loss is on the answer and EOS only: the same as scoring those two tokens by hand
    tokenizer = processor.tokenizer
    question = f"{item['question']}\n{gradient.SHORT_ANSWER_PROMPT}"
    prompt = tokenizer.bos_token + gradient.chat_prompt(processor, question)
    enc = processor(text=[f"{prompt} {item['answer']}{tokenizer.eos_token}"], images=[render(scene)],
                    return_tensors="pt", add_special_tokens=False)
    answer = tokenizer(f" {item['answer']}{tokenizer.eos_token}", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(**enc).logits[0]
    n = enc["input_ids"].shape[1]
    by_hand = torch.nn.functional.cross_entropy(logits[n - len(answer) - 1:n - 1], torch.tensor(answer))
    assert loss == pytest.approx(float(by_hand), rel=1e-5)


def test_main_prints_shares_and_norms(gradient, capsys):
    r = gradient.main(["--category", "fill", "--n", "3", "world=test"])
    assert r["n"] == 3 and 0.0 < r["share_features"] <= 1.0 and 0.0 < r["share_tokens"] <= 1.0
    assert r["object_norm"] > 0 and r["empty_norm"] > 0 and r["word_norm"] > 0
    out = capsys.readouterr().out
    assert "fill questions, 3 held out" in out
    assert re.search(r"tower features \d\.\d{3}, image tokens \d\.\d{3}", out)
