"""End to end on the tiny random Llava: both stages, LoRA, QLoRA, int8, full fine-tuning, outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlmablate.data.dataset import DataError
from vlmablate.model.projector_io import projector_state_dict

FAST = ("train.max_steps=12", "train.save_steps=6", "train.logging_steps=4")


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_two_stage_run_align_then_instruct_from_its_projector(run_cell, tmp_path):
    align = run_cell("stage=align", *FAST, name="align")
    assert align["status"] == "completed"
    assert align["params"]["trainable"] == {"vision": 0, "projector": 6272, "llm": 0, "total": 6272}
    assert align["train"]["final_loss"] < align["train"]["first_loss"]
    # Stage 1 keeps the projector only, at every checkpoint as well as at the end.
    final = tmp_path / "align" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["projector", "vlmablate_plan.json"]
    for ckpt in ("checkpoint-6", "checkpoint-12"):
        assert (tmp_path / "align" / "checkpoints" / ckpt / "projector" / "mm_projector.safetensors").exists()
        assert not (tmp_path / "align" / "checkpoints" / ckpt / "adapter").exists()

    projector = align["artifacts"]["projector"]
    instruct = run_cell("stage=instruct", "freeze=lora_llm", "freeze.lr=2e-3", f"model.pretrained_projector={projector}", *FAST,
                        name="instruct")
    assert instruct["status"] == "completed"
    sha = json.loads((Path(projector) / "projector.json").read_text())["sha256"]
    assert instruct["lineage"]["pretrained_projector"] == {"path": projector, "sha256": sha}
    assert instruct["train"]["final_loss"] < instruct["train"]["first_loss"]
    assert instruct["train"]["gradient_audit"]["checked_step"] == 1
    assert instruct["data"]["preflight"]["fully_masked"] == 0


@pytest.mark.slow
def test_lora_run_saves_adapter_and_projector_and_exports_a_merged_model(run_cell, tmp_path):
    s = run_cell("freeze=lora_llm", "vision=unfrozen", "train.export_merged=true", *FAST, name="lora")
    assert s["status"] == "completed"
    ckpt = tmp_path / "lora" / "checkpoints" / "checkpoint-6"
    non_lora = load_file(ckpt / "non_lora_trainables.safetensors")
    # The projector and the vision blocks that trained travel with the adapter, at every checkpoint.
    assert any(k.startswith("model.multi_modal_projector.") for k in non_lora)
    assert any(k.startswith("model.vision_tower.") for k in non_lora)
    assert not any("language_model" in k for k in non_lora)
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists()
    plan = json.loads((ckpt / "vlmablate_plan.json").read_text())
    assert plan["plan"]["llm"]["mode"] == "lora" and plan["params"]["trainable"]["total"] == s["params"]["trainable"]["total"]

    merged_dir = Path(s["artifacts"]["merged"])
    merged = LlavaForConditionalGeneration.from_pretrained(merged_dir)
    processor = AutoProcessor.from_pretrained(merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    final_proj = load_file(tmp_path / "lora" / "final" / "projector" / "mm_projector.safetensors")
    for name, tensor in projector_state_dict(merged).items():
        assert torch.equal(tensor, final_proj[name]), name
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == merged.config.image_token_index


@pytest.mark.slow
def test_qlora_nf4_trains_on_cpu(run_cell):
    s = run_cell("quant=nf4", "freeze=lora_llm", *FAST, name="qlora")
    assert s["status"] == "completed"
    llm = s["params"]["components"]["llm"]
    # Every LLM linear is 4-bit; embeddings, norms and lm_head stay in full precision.
    assert llm["quantized"] > 0 and llm["quantized"] < llm["total"]
    assert s["params"]["components"]["vision"]["quantized"] == 0
    assert s["params"]["components"]["projector"]["quantized"] == 0
    assert s["train"]["final_loss"] < s["train"]["first_loss"]


@pytest.mark.slow
def test_int8_lora_trains_on_cpu(run_cell):
    s = run_cell("quant=int8", "freeze=lora_llm", "train.max_steps=4", name="int8")
    assert s["status"] == "completed"
    assert s["params"]["components"]["llm"]["quantized"] > 0


@pytest.mark.slow
def test_full_fine_tune_saves_a_loadable_model(run_cell, tmp_path):
    s = run_cell("freeze=full_llm", "vision=unfrozen", "train.max_steps=4", "train.save_steps=100", name="full")
    assert s["status"] == "completed"
    assert s["params"]["trainable"]["llm"] == s["params"]["components"]["llm"]["total"]
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "full" / "final" / "model")
    assert sum(p.numel() for p in model.parameters()) == s["params"]["total"]


def test_fully_masked_data_stops_before_training(run_cell, tmp_path):
    # 66 tokens hold the system prompt, the image and most questions but no answer: the length scan names
    # every such record a bad one (answer_truncated) before any training, under the default on_bad_sample=error.
    with pytest.raises(DataError, match=r"bad record \(answer_truncated\): max_length cuts off every token"):
        run_cell("freeze=lora_llm", "model.max_length=66", "train.max_steps=2", name="masked")
    summary = read_summary(tmp_path / "masked")
    assert summary["status"] == "failed" and "answer_truncated" in summary["error"]


def test_invalid_config_fails_before_loading_and_writes_a_failed_summary(run_cell, tmp_path):
    from vlmablate.config import ConfigError

    with pytest.raises(ConfigError, match="cannot be fully fine-tuned"):
        run_cell("quant=nf4", "freeze=full_llm", name="bad")
    summary = read_summary(tmp_path / "bad")
    assert summary == {"status": "failed", "run_dir": str(tmp_path / "bad"), "error": summary["error"],
                       "config_hash": summary["config_hash"], "seed": 42, "cell": {"name": "none", "label": ""},
                       "world_size": 1}
    assert len(summary["config_hash"]) == 12


@pytest.mark.slow
def test_wandb_offline_logs_flat_config_and_summary(run_cell, tmp_path, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: the run must go offline by itself
    from wandb.sdk.wandb_run import Run
    from wandb.sdk.wandb_summary import Summary

    seen = {"init": None, "logged": set(), "summary": {}}
    real_init, real_log, real_update = wandb.init, Run.log, Summary.update

    def recording_init(**kwargs):
        seen["init"] = kwargs
        return real_init(**kwargs)

    def recording_log(self, data, *args, **kwargs):
        seen["logged"].update(data)
        return real_log(self, data, *args, **kwargs)

    def recording_update(self, data=None, *args, **kwargs):
        seen["summary"].update(data or {})
        return real_update(self, data, *args, **kwargs)

    monkeypatch.setattr(wandb, "init", recording_init)
    monkeypatch.setattr(Run, "log", recording_log)
    monkeypatch.setattr(Summary, "update", recording_update)
    s = run_cell("logger=wandb", "freeze=lora_llm", "train.max_steps=3", "train.logging_steps=1", name="wb")
    assert s["status"] == "completed"
    init = seen["init"]
    assert init["mode"] == "offline" and init["job_type"] == "instruct"
    assert {"freeze:lora_llm", "vision:frozen", "quant:none", "stage:instruct"} <= set(init["tags"])
    assert init["config"]["freeze.name"] == "lora_llm" and init["config"]["vision.policy"] == "frozen"
    assert {"train/loss", "train/lr/llm", "train/lr/projector"} <= seen["logged"]
    assert seen["summary"]["params.trainable.total"] == s["params"]["trainable"]["total"]
    assert seen["summary"]["train.final_loss"] == s["train"]["final_loss"]
    assert len(list((tmp_path / "wb" / "wandb").glob("offline-run-*"))) == 1
    assert "resume" not in init  # offline: each attempt is its own run (online, a resumed run continues its own)


def test_a_run_directory_keeps_one_wandb_run_online(tmp_path, monkeypatch):
    from vlmablate.report.wandb_log import _resume_kwargs

    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    first = _resume_kwargs(tmp_path, "online")
    assert first == {"id": (tmp_path / "wandb_run_id").read_text(), "resume": "allow"} and len(first["id"]) == 12
    assert _resume_kwargs(tmp_path, "online") == first  # the resumed attempt continues the same W&B run
    assert _resume_kwargs(tmp_path, "offline") == {}
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc")  # under a sweep agent, the agent names the run
    assert _resume_kwargs(tmp_path, "online") == {}


def test_cli_prints_the_composed_config():
    out = subprocess.run([sys.executable, "-m", "vlmablate", "--cfg", "job", "freeze=full_llm", "vision=unfrozen"],
                         capture_output=True, text=True, check=True).stdout
    assert "policy: full" in out and "policy: unfrozen" in out and "name: full_llm" in out


@pytest.mark.slow
def test_cli_design_card_command_trains(tmp_path):
    run_dir = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "vlmablate", "model=tiny_random", "freeze=lora_llm", "vision=unfrozen",
                    "train.max_steps=6", f"hydra.run.dir={run_dir}"], check=True, capture_output=True, text=True)
    s = read_summary(run_dir)
    assert s["status"] == "completed" and s["train"]["steps"] == 6
    assert s["params"]["trainable"]["vision"] > 0
    assert (run_dir / ".hydra" / "config.yaml").exists()


@pytest.mark.slow
def test_stage_one_projector_of_another_shape_is_rejected_before_weights_load(run_cell, tmp_path, monkeypatch):
    from vlmablate.config import ConfigError

    align = run_cell("stage=align", "train.max_steps=2", name="align64")
    loads = []
    monkeypatch.setattr("vlmablate.train.runner.load_model", lambda *a, **k: loads.append(a))
    with pytest.raises(ConfigError, match="text hidden"):
        run_cell("stage=instruct", "model.tiny.text_hidden=32",
                 f"model.pretrained_projector={align['artifacts']['projector']}", name="mismatch")
    assert loads == []
    with pytest.raises(ConfigError, match="holds a mlp2x_gelu projector"):
        from conftest import compose_run

        from vlmablate.config import validate

        validate(compose_run("model=llava_phi2", "projector=linear", "stage=instruct",
                             f"model.pretrained_projector={align['artifacts']['projector']}")[0])


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides,trains",
    [
        (("model.tiny.arch=llava_next", "freeze=lora_llm", "vision=unfrozen"), {"vision", "projector", "llm"}),
        (("vision=lora", "freeze=frozen_llm"), {"vision", "projector"}),
        (("vision=last_n", "vision.last_n=1", "freeze=full_llm", "projector.trainable=false"), {"vision", "llm"}),
        (("quant=nf4", "vision=unfrozen", "train.gradient_checkpointing=true"), {"vision", "projector", "llm"}),
    ],
)
def test_policy_cells_train_and_pass_the_gradient_audit(run_cell, overrides, trains):
    s = run_cell(*overrides, "train.max_steps=3", "train.save_steps=100")
    assert s["status"] == "completed"
    assert {c for c in ("vision", "projector", "llm") if s["params"]["trainable"][c]} == trains
    n_trainable_tensors = s["train"]["gradient_audit"]["trainable_tensors_with_grad"]
    assert n_trainable_tensors > 0


@pytest.mark.slow
def test_gradient_audit_stops_a_vision_tower_run_under_no_grad(run_cell, monkeypatch):
    """The known failure elsewhere: 'unfrozen' vision whose forward runs under no_grad never learns."""
    from transformers.models.clip.modeling_clip import CLIPEncoder

    from vlmablate.train.audit import PlanViolation

    forward = CLIPEncoder.forward

    def no_grad_forward(self, *args, **kwargs):
        with torch.no_grad():
            return forward(self, *args, **kwargs)

    monkeypatch.setattr(CLIPEncoder, "forward", no_grad_forward)
    with pytest.raises(PlanViolation, match=r"received no gradient.*vision_tower"):
        run_cell("vision=unfrozen", "freeze=frozen_llm", "train.max_steps=2")


@pytest.mark.slow
def test_grouped_samplers_pad_less_than_random_batches(run_cell):
    efficiency = {}
    for sampler in ("random", "length", "modality_length"):
        s = run_cell(f"stage.sampler={sampler}", "freeze=lora_llm", "train.max_steps=6", "train.save_steps=100",
                     "eval=none", name=sampler)
        efficiency[sampler] = s["train"]["padding_efficiency"]
    assert efficiency["modality_length"] > efficiency["random"]
    assert efficiency["length"] > efficiency["random"]


@pytest.mark.slow
def test_a_frozen_llm_leaves_text_only_samples_out(run_cell):
    # With the LLM frozen, a text-only batch reaches no trainable parameter (no gradient at all).
    summary = run_cell("freeze=frozen_llm", "train.max_steps=-1", "train.num_train_epochs=1", "train.save_steps=1000",
                       "eval=none", name="frozen_llm")
    data = summary["data"]
    assert summary["status"] == "completed" and data["text_only_left_out"] > 0
    assert data["records_in_mix"] == data["in_mix"] - data["text_only_left_out"]
    assert summary["train"]["samples_seen"] == data["records_in_mix"]
