"""Retention (eval/retention.py): the LM's loss on text alone before and after stage 2, and the report's use of it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_run
from transformers import LlamaConfig, LlamaForCausalLM

from vlmablate.config import ConfigError, validate
from vlmablate.eval.retention import (
    RetentionDataError,
    encode_texts,
    item_losses,
    read_retention_file,
    retention_result,
    world_records,
)

DATA = Path(__file__).parent / "data"
# A real model's path: a user-given text-only set, here on the tiny random Llava and the test-size world.
FILE_RUN = ("eval=none", "eval.retention.enabled=true", f"eval.retention.data={DATA / 'retention_chat.json'}",
            "train.max_steps=3")
# The tiny world's own LM (the shipped components) on a small world, stage 2 from a fresh projector.
WORLD_RUN = ("world=default", "world.n_caption=400", "world.n_instruct=300", "world.n_bench=40", "world.n_vqa=20",
             "model=tiny_world", "stage=single", "eval=none", "eval.retention.enabled=true",
             "eval.retention.n_world=40", "train.max_steps=2")


def _tiny_lm(vocab: int = 11) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


ITEMS = [([1, 4, 2, 7, 3], [-100, -100, 2, 7, 3]), ([1, 3, 3], [1, 3, 3]), ([1, 5, 9, 2, 2, 6], [1, 5, 9, 2, 2, 6])]


def _items(summary: dict) -> list[dict]:
    path = Path(summary["run_dir"]) / "eval" / "retention" / "items.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_frozen_llm_retains_exactly_and_the_base_is_cached(run_cell):
    frozen = run_cell(*FILE_RUN, "freeze=frozen_llm", name="frozen")
    ret = frozen["eval"]["retention"]
    assert ret["difference"] == 0.0 and ret["ci"] == [0.0, 0.0] and ret["before"] == ret["after"] > 0
    assert ret["n"] == 6 and not ret["before_cached"] and "retention_chat.json" in ret["measured"]
    assert ret["perplexity_before"] == pytest.approx(math.exp(ret["before"]))
    rows = _items(frozen)
    assert len(rows) == 6 and all(r["before"] == r["after"] and r["tokens"] > 0 for r in rows)
    # the LoRA cell reads the same base from the cache, and training its LLM moved the loss
    lora = run_cell(*FILE_RUN, "freeze=lora_llm", "train.lr_scale=100", name="lora")["eval"]["retention"]
    assert lora["before_cached"] and lora["before"] == ret["before"] and lora["tokens"] == ret["tokens"]
    assert lora["difference"] != 0.0 and lora["difference"] == pytest.approx(lora["after"] - lora["before"])
    assert lora["difference"] == pytest.approx(np.mean([r["after"] - r["before"] for r in _items(
        {"run_dir": Path(frozen["run_dir"]).parent / "lora"})]))


@pytest.mark.slow
def test_the_tiny_world_scores_its_own_dialogues_and_a_frozen_llm_loses_nothing(run_cell):
    ret = run_cell(*WORLD_RUN, "freeze=frozen_llm", "eval.retention.reading_per_kind=8")["eval"]["retention"]
    assert ret["difference"] == 0.0 and ret["ci"] == [0.0, 0.0] and ret["n"] == 40
    assert "text-only dialogues of the tiny world" in ret["measured"]
    assert 0 < ret["before"] < 1.0  # the shipped LM knows these facts: far below log(vocabulary) = 6.6
    # Its other skill, reading boards: every kind in both formats, the same before and after for a frozen LLM,
    # and the base's accuracies through the Llava model's LM are the shipped LM's own on the same questions.
    reading = ret["reading"]
    from vlmablate.world import language

    kinds = [*language.CATEGORIES, *(f"{k}@choice" for k in language.CATEGORIES)]
    assert list(reading["before"]) == kinds and reading["after"] == reading["before"]
    assert set(reading["difference"].values()) == {0.0} and reading["mean_difference"] == 0.0
    assert reading["per_kind"] == 8 and "board transcripts" in reading["measured"]
    assert reading["before"] == _shipped_lm_reading(per_kind=8)
    assert reading["mean_before"] > 0.5  # it reads: most kinds near 1.0 (docs/tiny_world.md, the reading probe)


def _shipped_lm_reading(per_kind: int, folder: Path | None = None, recipe=None) -> dict:
    """A components folder's LM (the shipped one by default) reading on its own, outside any Llava model, the
    retention probe's questions."""
    from transformers import AutoTokenizer

    from vlmablate.eval.retention import READING_SEED
    from vlmablate.world import components
    from vlmablate.world.reading import Encoder, reading_probe

    folder = folder or components.shipped_folder()
    enc = Encoder(AutoTokenizer.from_pretrained(folder / "llm"))
    lm = LlamaForCausalLM.from_pretrained(folder / "llm").eval()
    items = components.every_kind_probe_set(enc, recipe or components.shipped_config(), seed=READING_SEED,
                                            per_kind=per_kind)
    return reading_probe(lm, components.load_board(folder), enc, items)


def test_a_known_logit_shift_changes_the_loss_by_the_hand_computed_amount():
    """Adding c to token t's logit everywhere changes the loss at a position with target y by
    log(1 - p_t + p_t e^c) - c [y == t], p_t the unperturbed probability of t there."""
    model, c, t = _tiny_lm(), 1.5, 3
    before, tokens = item_losses(model, ITEMS, pad_id=0, batch_size=2)
    assert tokens.tolist() == [3, 2, 5]
    expected = []
    for ids, labels in ITEMS:
        with torch.no_grad():
            p = model(input_ids=torch.tensor([ids])).logits[0].double().softmax(-1)
        changes = [math.log(1 - p[i, t] + p[i, t] * math.exp(c)) - c * (labels[i + 1] == t)
                   for i in range(len(ids) - 1) if labels[i + 1] != -100]
        expected.append(sum(changes) / len(changes))
    hook = model.lm_head.register_forward_hook(lambda m, i, out: out + c * torch.nn.functional.one_hot(
        torch.tensor(t), out.shape[-1]))
    after, _ = item_losses(model, ITEMS, pad_id=0, batch_size=2)
    hook.remove()
    np.testing.assert_allclose(after - before, expected, atol=1e-5)
    # a head of zeros predicts every token with probability 1/V: the loss is log(V) on every item
    with torch.no_grad():
        model.lm_head.weight.zero_()
    flat, _ = item_losses(model, ITEMS, pad_id=0, batch_size=3)
    np.testing.assert_allclose(flat, math.log(11), atol=1e-6)


def test_padding_and_batch_size_do_not_change_the_losses():
    model = _tiny_lm()
    one, _ = item_losses(model, ITEMS, pad_id=0, batch_size=1)
    three, _ = item_losses(model, ITEMS, pad_id=10, batch_size=3)
    np.testing.assert_allclose(one, three, atol=1e-5)


def test_retention_result_on_crafted_losses():
    out = retention_result(np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.0, 3.5]), np.array([4, 5, 6]),
                           measured="m", n_boot=200)
    assert out["before"] == 2.0 and out["after"] == 7 / 3 and out["difference"] == pytest.approx(1 / 3)
    assert out["n"] == 3 and out["tokens"] == 15 and out["measured"] == "m"
    assert out["perplexity_before"] == pytest.approx(math.exp(2.0))
    lo, hi = out["ci"]
    assert 0.0 <= lo <= 1 / 3 <= hi <= 0.5  # a resample of {0.5, 0, 0.5} has a mean in [0, 0.5]
    same = retention_result(np.array([1.0, 2.0]), np.array([1.0, 2.0]), np.array([1, 1]), measured="m")
    assert same["difference"] == 0.0 and same["ci"] == [0.0, 0.0]


def test_world_records_are_fixed_text_only_dialogues():
    a, b = world_records(30), world_records(30)
    assert a == b and len(a) == 30 and len({json.dumps(r) for r in a}) > 10
    assert all("image" not in r and [t["from"] for t in r["conversations"]][:2] == ["human", "gpt"] for r in a)


def test_plain_texts_score_every_token_after_bos():
    class Tok:
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(ch) - 90 for ch in text]}

    items = encode_texts(["abc", "de"], Tok(), max_length=3, source="f.jsonl")
    assert items == [([1, 7, 8], [1, 7, 8]), ([1, 10, 11], [1, 10, 11])]  # cut to 3 tokens
    with pytest.raises(RetentionDataError, match=r"f.jsonl: line 1: fewer than two tokens"):
        encode_texts([""], Tok(), max_length=8, source="f.jsonl")


def test_bad_retention_files_name_the_file_the_record_and_the_reason(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"id": "ok", "conversations": []}, {"id": "x1", "image": "a.png",
                                                                    "conversations": []}]))
    with pytest.raises(RetentionDataError, match=r"chat.json: record 1 \(id x1\): has an image"):
        read_retention_file(path)
    assert read_retention_file(path, max_items=1) == ("chat", [{"id": "ok", "conversations": []}])
    lines = tmp_path / "texts.jsonl"
    lines.write_text('{"text": "one"}\n{"txt": "two"}\n')
    with pytest.raises(RetentionDataError, match=r"texts.jsonl: line 2: expected"):
        read_retention_file(lines)
    assert read_retention_file(lines, max_items=1) == ("text", ["one"])
    kind, texts = read_retention_file(DATA / "retention_texts.jsonl")  # the documented layout, one text a line
    assert kind == "text" and len(texts) == 4 and texts[0] == "A square has four equal sides."


def test_a_conversation_that_cannot_be_scored_names_its_record_and_reason(tmp_path):
    from vlmablate.eval.retention import encode_chat

    with pytest.raises(RetentionDataError, match=r"r.json: record 0 \(id q\).*no assistant.*reason: non_alternating"):
        encode_chat([{"id": "q", "conversations": [{"from": "human", "value": "hi"}]}], processor=None,
                    max_length=64, source="r.json")


def test_config_checks_the_retention_file(tmp_path):
    cfg, _ = compose_run("world=test", f"eval.retention.data={tmp_path / 'missing.json'}")
    with pytest.raises(ConfigError, match="eval.retention.data=.*missing.json is not a file"):
        validate(cfg)
    (tmp_path / "set.txt").write_text("x")
    cfg, _ = compose_run("world=test", f"eval.retention.data={tmp_path / 'set.txt'}")
    with pytest.raises(ConfigError, match=r"not a \*.txt file"):
        validate(cfg)
    assert compose_run("eval=none")[0].eval.retention.enabled is False
    assert compose_run()[0].eval.retention.enabled is True


# --- the report ------------------------------------------------------------------------------------------------------


def _fake_run(folder: Path, cell: str, seed: int, correct: bool, *, freeze: str, vision: str = "frozen",
              items: list[float] | None = None, retention: dict | None = None) -> None:
    """A completed run: 20 MMBench questions all right or all wrong, and its retention (per-item differences
    `items`, before = 1.0 each, written as the runner writes them; or just a `retention` section)."""
    run = folder / cell / f"seed{seed}"
    (run / "eval" / "mmbench").mkdir(parents=True)
    (run / "eval" / "mmbench" / "predictions.jsonl").write_text(
        "\n".join(json.dumps({"q": q, "copy": 0, "correct": correct}) for q in range(20)))
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(json.dumps({"freeze": {"name": freeze}, "vision": {"policy": vision}}))
    summary = {"status": "completed", "seed": seed, "cell": {"name": cell, "label": cell.upper()},
               "train": {"wall_clock_s": 10.0}, "eval": {}}
    if items is not None:
        (run / "eval" / "retention").mkdir()
        (run / "eval" / "retention" / "items.jsonl").write_text("\n".join(
            json.dumps({"item": i, "before": 1.0, "after": 1.0 + d, "tokens": 5}) for i, d in enumerate(items)))
        retention = retention_result(np.ones(len(items)), 1.0 + np.array(items), np.full(len(items), 5),
                                     measured="m", n_boot=100)
    if retention is not None:
        summary["eval"]["retention"] = retention
    (run / "summary.json").write_text(json.dumps(summary))


def _crafted(folder: Path) -> None:
    for seed in (0, 1):
        _fake_run(folder, "frozen_frozen", seed, False, freeze="frozen_llm", items=[0.0] * 4)
        items = [[0.1, 0.2, 0.3, 0.4], [0.3, 0.4, 0.5, 0.6]][seed]
        _fake_run(folder, "full", seed, True, freeze="full_llm", items=items)
    _fake_run(folder, "frozen_lora", 0, True, freeze="lora_llm",
              retention={"difference": 0.03, "ci": [0.01, 0.05], "before": 1.0, "after": 1.03, "n": 4})
    # lm-eval tasks only, no text set: no loss difference to report
    _fake_run(folder, "unmeasured", 0, True, freeze="lora_llm", vision="unfrozen",
              retention={"lm_eval": {"tasks": {"mmlu": {"metrics": {"acc": {"difference": -0.01}}}}}})


def test_the_report_sets_learning_against_forgetting(tmp_path):
    import csv

    from vlmablate.report.compare import write_report

    _crafted(tmp_path)
    result = write_report(tmp_path, n_boot=50)
    rows = {r["cell"]: r for r in result["rows"]}
    assert rows["frozen_frozen"]["retention_loss"] == 0.0
    assert [rows["frozen_frozen"]["retention_ci_low"], rows["frozen_frozen"]["retention_ci_high"]] == [0.0, 0.0]
    full = rows["full"]
    assert full["retention_loss"] == pytest.approx(0.35)  # runs of 0.25 and 0.45
    # crossed seeds × items (no residual: the runs differ by a constant): var = MS_seed / (S·Q) + var(item means) / Q
    # = 0.08 / 8 + 0.01667 / 4, with Satterthwaite's degrees of freedom from (0.01, 1) and (0.004167, 3)
    from scipy import stats as sps

    seed_part, item_part = 0.08 / 8, np.var([0.2, 0.3, 0.4, 0.5], ddof=1) / 4
    dof = (seed_part + item_part) ** 2 / (seed_part ** 2 / 1 + item_part ** 2 / 3)
    half = sps.t.ppf(0.975, dof) * math.sqrt(seed_part + item_part)
    assert [full["retention_ci_low"], full["retention_ci_high"]] == pytest.approx([0.35 - half, 0.35 + half])
    one = rows["frozen_lora"]
    assert (one["retention_loss"], one["retention_ci_low"], one["retention_ci_high"]) == (0.03, 0.01, 0.05)
    assert rows["unmeasured"]["retention_loss"] is None
    # MMBench gain over the frozen-LLM cell: all right against all wrong
    assert {c: r["mmbench_gain"] for c, r in rows.items()} == {"frozen_frozen": 0.0, "full": 1.0, "frozen_lora": 1.0,
                                                                "unmeasured": 1.0}
    assert all(r["gain_over"] == "frozen_frozen" for r in rows.values())
    with (tmp_path / "comparison.csv").open() as f:
        csv_rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert float(csv_rows["full"]["retention_loss"]) == pytest.approx(0.35)
    assert csv_rows["unmeasured"]["retention_loss"] == ""
    table = (tmp_path / "comparison.md").read_text().split("## The cells\n\n")[1]
    assert table.startswith("| Config | Trainable params | MM-Bench circular (95% CI) | Wall-clock (s) | "
                            "retention loss (95% CI) |")
    assert "| +0.0300 (+0.0100 to +0.0500) |" in table and "| 10.0 | - |" in table
    assert (tmp_path / "comparison_forgetting.png").stat().st_size > 10_000


def test_the_decision_reads_the_retention_loss_where_asked(tmp_path):
    from vlmablate.report.compare import write_report

    _crafted(tmp_path)
    decided = write_report(tmp_path, n_boot=50, settings={"max_retention_loss": 0.1})["decision"]
    assert "left out FULL (retention loss 0.350), UNMEASURED (retention not measured)" in decided["lines"][0]


def test_wandb_summaries_carry_the_retention_keys():
    from vlmablate.report.wandb_log import finish_wandb, sweep_retention_summary

    class Run:
        summary: dict = {}
        settings = type("S", (), {"mode": "online"})()
        dir = "/tmp/x/files"

        def finish(self):
            pass

    run = Run()
    run.summary = {}
    finish_wandb(run, {"status": "completed", "eval": {"retention": {"difference": 0.2, "ci": [0.1, 0.3]}}})
    assert (run.summary["retention_loss"], run.summary["retention_ci_low"], run.summary["retention_ci_high"]) == \
        (0.2, 0.1, 0.3)
    assert run.summary["eval.retention.difference"] == 0.2
    finished = []
    run.summary, run.finish = {}, lambda: finished.append(True)
    finish_wandb(run, {"status": "completed", "eval": {"retention": {"lm_eval": {"tasks": {}}}}})
    assert "retention_loss" not in run.summary and finished == [True]
    assert sweep_retention_summary([{"cell": "full", "retention_loss": 0.35, "retention_ci_low": 0.1,
                                     "retention_ci_high": 0.6, "mmbench_gain": 1.0},
                                    {"cell": "none", "retention_loss": None, "mmbench_gain": None}]) == {
        "retention_loss/full": 0.35, "retention_ci_low/full": 0.1, "retention_ci_high/full": 0.6,
        "mmbench_gain/full": 1.0}


def test_retention_settings_leave_the_config_hash_alone():
    """Stage-1 caches and finished cells made before retention existed are still found."""
    from vlmablate.config import config_hash
    from vlmablate.train.stages import learning_config

    base, other = compose_run()[1], compose_run("eval.retention.n_world=50", "eval.retention.enabled=false")[1]
    assert config_hash(learning_config(base)) == config_hash(learning_config(other))
    assert "retention" not in learning_config(base)["eval"]


def test_a_bad_retention_file_fails_the_run_before_anything_loads(run_cell, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "t0", "conversations": [{"from": "human", "value": "hi"},
                                                               {"from": "gpt", "value": "hello"}]},
                               {"id": "t1", "image": "cat.png", "conversations": []}]))
    with pytest.raises(RetentionDataError, match=r"bad.json: record 1 \(id t1\): has an image"):
        run_cell("eval=none", "eval.retention.enabled=true", f"eval.retention.data={bad}", name="bad")
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert summary["status"] == "failed" and "params" not in summary and "record 1 (id t1)" in summary["error"]


def test_the_base_is_scored_with_lora_switched_off():
    from peft import LoraConfig, get_peft_model

    model = _tiny_lm()
    plain, _ = item_losses(model, ITEMS, pad_id=0)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    base, _ = item_losses(wrapped, ITEMS, pad_id=0, base=True)
    trained, _ = item_losses(wrapped, ITEMS, pad_id=0)
    assert base.tolist() == plain.tolist()  # bitwise: the adapters are off, not merely small
    assert np.abs(trained - plain).max() > 1e-4


def test_the_reading_probe_scores_the_trained_lm_and_caches_the_base(tmp_path):
    # The main job's composed model (shipped components, fresh projector): through it, the base reads as the
    # shipped LM does on its own. A head of zeros after the base was scored makes every greedy answer token 0,
    # never an answer: each kind's after is 0.0 and its difference minus its before, to the digit.
    from vlmablate.eval.retention import ReadingProbe
    from vlmablate.model.load import load_model
    from vlmablate.model.plan import resolve_plan
    from vlmablate.train.runner import prepare_model
    from vlmablate.world.components import components_config, ensure_components

    cfg, _ = compose_run("train.progress=false")
    plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage, lr_scale=cfg.train.lr_scale)
    loaded = load_model(prepare_model(cfg, plan), projector_type=plan.projector_type, quant=cfg.quant,
                        skip_modules=[], compute_dtype=torch.float32)
    model = loaded.model.train()

    folder, recipe = ensure_components(cfg.world), components_config(cfg.world)

    def start():
        return ReadingProbe.start(model, loaded.processor.tokenizer, folder, recipe, per_kind=4,
                                  identity={"base": "test"}, cache_dir=tmp_path)

    probe = start()
    assert not probe.cached and probe.before == _shipped_lm_reading(per_kind=4, folder=folder, recipe=recipe)
    assert sum(probe.before.values()) > 0.5 * len(probe.before)  # it reads, so a loss of everything shows
    assert model.training and all(m.training for m in model.modules())  # modes as they were
    with torch.no_grad():
        model.lm_head.weight.zero_()
    result = probe.measure(model)
    assert set(result["after"].values()) == {0.0}
    assert result["difference"] == {k: round(-v, 4) for k, v in probe.before.items()}
    assert result["mean_after"] == 0.0 and result["mean_difference"] == -result["mean_before"]
    again = start()  # the base comes from the cache, not from the changed model
    assert again.cached and again.before == probe.before
