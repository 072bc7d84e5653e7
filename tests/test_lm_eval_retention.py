"""Retention on lm-evaluation-harness tasks (eval/lm_eval_retention.py), offline, on a local task of 12 questions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_run

pytest.importorskip("lm_eval")  # the optional extra; the dev extra installs it

from vlmablate.config import ConfigError, RetentionConfig, validate  # noqa: E402
from vlmablate.eval.lm_eval_retention import check_tasks, lm_eval_result, run_tasks, text_lm  # noqa: E402

TASKS = ROOT / "tests" / "data" / "lm_eval_tasks"
TASK = "vlmablate_retention_mc"
DOCS = json.loads((TASKS / "retention_mc.json").read_text())
LM_EVAL_RUN = ("eval=none", "eval.retention.enabled=true", f"eval.retention.lm_eval_tasks=[{TASK}]",
               f"eval.retention.lm_eval_include_path={TASKS}", "train.max_steps=2")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No hub: the task reads its JSON file, whose path in the YAML is relative to the repository root."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def tiny():
    """The tiny random Llava (random weights) and its tokenizer, built in memory."""
    from vlmablate.model.tiny import TinySpec, build_tiny_llava, train_tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = train_tiny_tokenizer()
    return build_tiny_llava(TinySpec(), tokenizer).eval(), tokenizer


def _settings(**kw) -> RetentionConfig:
    return RetentionConfig(lm_eval_tasks=[TASK], lm_eval_include_path=str(TASKS), lm_eval_batch_size=5, **kw)


def _choice_logliks(model, tokenizer, doc) -> list[float]:
    """Each choice's log-likelihood given the question, by the whole Llava model (input ids only, no image): the
    context and the context + " choice" encoded without special tokens, the continuation = the extra tokens."""
    context = f"Question: {doc['question']}\nAnswer:"
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    out = []
    for choice in doc["choices"]:
        whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
        assert whole[:len(ctx)] == ctx  # the split lm-eval makes is the plain prefix here
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([whole[:-1]])).logits[0].double().log_softmax(-1)
        out.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
    return out


def test_lm_eval_scores_what_the_model_itself_scores(tiny):
    model, tokenizer = tiny
    head = model.lm_head.weight
    rng = torch.get_rng_state()
    got = run_tasks(model, tokenizer, _settings())
    assert torch.equal(torch.get_rng_state(), rng)  # lm-eval's seeding does not leak into training
    assert model.lm_head.weight is head and not model.training  # lm-eval's tie_weights left the model alone
    scores = [_choice_logliks(model, tokenizer, doc) for doc in DOCS]
    acc = [float(np.argmax(s) == doc["answer"]) for s, doc in zip(scores, DOCS)]
    acc_norm = [float(np.argmax(np.array(s) / [len(c) for c in doc["choices"]]) == doc["answer"])
                for s, doc in zip(scores, DOCS)]
    assert got["docs"][TASK] == {"acc": acc, "acc_norm": acc_norm}
    assert got["results"][TASK]["acc"] == pytest.approx(np.mean(acc))
    assert got["results"][TASK]["acc_stderr"] == pytest.approx(np.std(acc, ddof=1) / math.sqrt(12))
    assert got["n"] == {TASK: 12} and got["higher_is_better"][TASK] == {"acc": True, "acc_norm": True}


def test_a_flat_head_picks_the_choice_of_fewest_tokens(tiny):
    """A head of zeros gives every token probability 1/V: a choice of k tokens scores -k log V, so lm-eval's acc
    is the share of questions whose answer is the first of the fewest-token choices, computed here by hand."""
    model, tokenizer = tiny
    flat = type(model)(model.config).eval()
    flat.load_state_dict(model.state_dict())
    with torch.no_grad():
        flat.lm_head.weight.zero_()
    got = run_tasks(flat, tokenizer, _settings(lm_eval_limit=8))
    context = [tokenizer(f"Question: {d['question']}\nAnswer:", add_special_tokens=False)["input_ids"] for d in DOCS]
    tokens = [[len(tokenizer(f"Question: {d['question']}\nAnswer: {c}", add_special_tokens=False)["input_ids"])
               - len(ctx) for c in d["choices"]] for d, ctx in zip(DOCS, context)]
    expected = [float(int(np.argmin(k)) == d["answer"]) for k, d in zip(tokens[:8], DOCS)]
    # acc_norm divides by the choice's length in characters: the choice of fewest tokens per character wins
    expected_norm = [float(int(np.argmin(np.array(k) / [len(c) for c in d["choices"]])) == d["answer"])
                     for k, d in zip(tokens[:8], DOCS)]
    assert got["n"][TASK] == 8 and got["docs"][TASK] == {"acc": expected, "acc_norm": expected_norm}
    assert got["results"][TASK]["acc"] == np.mean(expected) == 0.375  # 3 of the first 8 (this tokenizer)
    assert got["results"][TASK]["acc_norm"] == pytest.approx(np.mean(expected_norm))


def test_the_base_runs_with_lora_switched_off_and_the_text_view_shares_the_weights(tiny):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    view = text_lm(model)
    assert view.model is model.model.language_model and view.lm_head is model.lm_head
    assert not any(p.is_meta for p in view.parameters())
    ids = torch.tensor([[1, 5, 9, 14, 30]])
    with torch.no_grad():
        assert torch.equal(view(ids).logits, model(input_ids=ids).logits)
    plain = run_tasks(model, tokenizer, _settings())
    copy = type(model)(model.config).eval()
    copy.load_state_dict(model.state_dict())  # the same base weights, LoRA on top
    torch.manual_seed(1)
    wrapped = get_peft_model(copy, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    on = text_lm(wrapped)  # the adapters live inside the shared modules: switched off there, off for the view
    with torch.no_grad():
        assert not torch.allclose(on(ids).logits, view(ids).logits, atol=1e-4)
        with wrapped.disable_adapter():
            assert torch.equal(on(ids).logits, view(ids).logits)
    base = run_tasks(wrapped, tokenizer, _settings(), base=True)
    assert base["docs"] == plain["docs"] and base["results"] == plain["results"]


def test_lm_eval_result_on_crafted_results():
    def res(acc, stderr, docs):
        return {"results": {"t": {"acc": acc, "acc_stderr": stderr, "exact_match,strict-match": acc,
                                  "exact_match_stderr,strict-match": None}},
                "docs": {"t": {"acc": docs}}, "n": {"t": len(docs)},
                "higher_is_better": {"t": {"acc": True, "exact_match,strict-match": True}}}

    out = lm_eval_result(res(0.75, 0.25, [1, 1, 1, 0]), res(0.5, 0.29, [1, 0, 1, 0]), measured="m", n_boot=200)
    acc = out["tasks"]["t"]["metrics"]["acc"]
    assert (acc["before"], acc["after"], acc["difference"]) == (0.75, 0.5, -0.25)
    assert (acc["stderr_before"], acc["stderr_after"], acc["higher_is_better"]) == (0.25, 0.29, True)
    lo, hi = acc["ci"]
    assert -1.0 <= lo <= -0.25 <= hi <= 0.0  # resamples of the differences {0, -1, 0, 0}
    em = out["tasks"]["t"]["metrics"]["exact_match,strict-match"]
    assert em["difference"] == -0.25 and em["stderr_after"] is None and "ci" not in em
    assert set(out["tasks"]["t"]["metrics"]) == {"acc", "exact_match,strict-match"} and out["measured"] == "m"
    assert out["tasks"]["t"]["n"] == 4


def test_a_frozen_llm_loses_nothing_on_lm_eval_tasks_and_the_base_is_cached(run_cell):
    summary = run_cell(*LM_EVAL_RUN, "freeze=frozen_llm", name="frozen")
    assert summary["status"] == "completed"
    section = summary["eval"]["retention"]["lm_eval"]
    assert set(summary["eval"]["retention"]) == {"lm_eval"}  # tiny_random has no loss set of its own
    metrics = section["tasks"][TASK]["metrics"]
    assert section["tasks"][TASK]["n"] == 12 and set(metrics) == {"acc", "acc_norm"}
    for m in metrics.values():
        assert m["difference"] == 0.0 and m["before"] == m["after"] and m["ci"] == [0.0, 0.0]
        assert 0.0 <= m["before"] <= 1.0 and m["stderr_before"] == m["stderr_after"] > 0
    assert not section["before_cached"] and TASK in section["measured"] and "lm-evaluation-harness" in section[
        "measured"]
    stored = json.loads((Path(summary["run_dir"]) / "eval" / "retention" / "lm_eval.json").read_text())
    assert stored["before"]["docs"] == stored["after"]["docs"]
    # a LoRA cell of the same base reads "before" from the cache
    lora = run_cell(*LM_EVAL_RUN, "freeze=lora_llm", name="lora")["eval"]["retention"]["lm_eval"]
    assert lora["before_cached"] and all(lora["tasks"][TASK]["metrics"][k]["before"] == m["before"]
                                         for k, m in metrics.items())


def test_a_misnamed_task_fails_before_training(run_cell, tmp_path):
    with pytest.raises(ConfigError, match=rf"unknown lm-eval task\(s\) \['{TASK}x'\].*lm_eval_include_path="
                                          rf"{TASKS}.*lm-eval ls tasks --include_path"):
        run_cell(*LM_EVAL_RUN, f"eval.retention.lm_eval_tasks=[{TASK}x]", name="bad")
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert summary["status"] == "failed" and "params" not in summary and f"{TASK}x" in summary["error"]
    check_tasks([TASK], str(TASKS))  # the right name passes


def test_the_config_says_how_to_install_lm_eval_and_checks_its_settings(monkeypatch, tmp_path):
    import importlib.util

    cfg, _ = compose_run("world=test", f"eval.retention.lm_eval_tasks=[{TASK}]")
    validate(cfg)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r'lm_eval_tasks=\[.vlmablate_retention_mc.\] needs lm-evaluation-harness.*'
                                          r'pip install "vlmablate\[lmeval\]"'):
        validate(cfg)
    validate(compose_run("world=test", "eval=none", f"eval.retention.lm_eval_tasks=[{TASK}]")[0])  # retention off
    monkeypatch.undo()
    cfg, _ = compose_run("world=test", f"eval.retention.lm_eval_tasks=[{TASK}]", "eval.retention.lm_eval_limit=0")
    with pytest.raises(ConfigError, match=r"lm_eval_limit \(0\) must be >= 1"):
        validate(cfg)
    cfg, _ = compose_run("world=test", f"eval.retention.lm_eval_tasks=[{TASK}]",
                         f"eval.retention.lm_eval_include_path={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match=r"lm_eval_include_path=.*nowhere is not a folder"):
        validate(cfg)


def test_lm_eval_settings_leave_the_config_hash_alone():
    from vlmablate.config import config_hash
    from vlmablate.train.stages import learning_config

    base = compose_run()[1]
    other = compose_run(f"eval.retention.lm_eval_tasks=[{TASK}]", f"eval.retention.lm_eval_include_path={TASKS}",
                        "eval.retention.lm_eval_limit=5", "eval.retention.lm_eval_num_fewshot=2",
                        "eval.retention.lm_eval_batch_size=4")[1]
    assert config_hash(learning_config(base)) == config_hash(learning_config(other))
