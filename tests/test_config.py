"""Composition of every config option, typed schemas, and the cross-field rules with their messages."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from vlmablate.config import ConfigError, RunConfig, validate

from conftest import CONF, compose_run

GROUPS = ["model", "vision", "projector", "freeze", "quant", "data", "stage", "train", "eval", "logger", "world"]

def make(*overrides: str) -> RunConfig:
    return compose_run(*overrides)[0]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_the_designed_options():
    assert options("model") == ["llava15_7b", "llava16_mistral_7b", "llava_llama31_8b", "llava_phi2", "tiny_random",
                                "tiny_world"]
    assert options("vision") == ["frozen", "last_n", "lora", "unfrozen"]
    assert options("projector") == ["linear", "mlp2x_gelu"]
    assert options("freeze") == ["frozen_llm", "full_llm", "lora_llm"]
    assert options("quant") == ["int8", "nf4", "none"]
    assert options("stage") == ["align", "instruct", "single"]
    assert {"cpu_tiny", "rtx4090_qlora", "a100x8_zero3"} <= set(options("train"))
    assert options("logger") == ["none", "wandb"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group):
    for option in options(group):
        cfg = make(f"{group}={option}")
        assert isinstance(cfg, RunConfig)
        picked = getattr(cfg, group)
        assert getattr(picked, "name", None) in (option, None) or group in ("vision", "projector", "quant")


def test_design_card_command_composes_verbatim():
    cfg = make("freeze=lora_llm", "vision=unfrozen")
    assert (cfg.freeze.policy, cfg.vision.policy, cfg.stage.name, cfg.model.name) == ("lora", "unfrozen", "instruct", "tiny_world")
    assert cfg.freeze.lora.r == 16 and cfg.freeze.lr == 2e-4
    validate(cfg)


def test_stage_align_sets_llava_stage_one_defaults_but_the_command_line_wins():
    cfg = make("stage=align")
    assert (cfg.freeze.policy, cfg.vision.policy, cfg.data.name, cfg.stage.template, cfg.stage.lr) == (
        "frozen", "frozen", "tiny_world_caption", "plain", 1e-3)
    cfg = make("stage=align", "freeze=full_llm")
    assert cfg.freeze.policy == "full"


def test_wrong_key_or_type_fails_at_compose_time():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        make("freeze.bogus=1")
    with pytest.raises(ConfigKeyError):
        make("++freeze.bogus=1")
    with pytest.raises((ConfigCompositionException, ValidationError)):
        make("train.max_steps=abc")


def test_real_presets_point_at_the_published_checkpoints():
    assert make("model=llava15_7b").model.checkpoint == "llava-hf/llava-1.5-7b-hf"
    assert make("model=llava16_mistral_7b").model.checkpoint == "llava-hf/llava-v1.6-mistral-7b-hf"
    phi = make("model=llava_phi2").model
    assert (phi.source, phi.vision_checkpoint, phi.llm_checkpoint) == (
        "compose", "openai/clip-vit-large-patch14-336", "microsoft/phi-2")
    assert make("model=llava_llama31_8b").model.llm_checkpoint == "meta-llama/Llama-3.1-8B-Instruct"
    qlora = make("train=rtx4090_qlora", "quant=nf4").train
    assert (qlora.bf16, qlora.gradient_checkpointing, qlora.optim) == (True, True, "paged_adamw_8bit")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["freeze=frozen_llm", "vision=frozen", "projector.trainable=false"], "nothing is trainable"),
        (["quant=nf4", "freeze=full_llm"], "cannot be fully fine-tuned"),
        (["quant=int8", "freeze=full_llm"], "cannot be fully fine-tuned"),
        (["freeze=full_llm", "freeze.lora.r=64"], "freeze.lora.r is set but freeze=full_llm has no LoRA"),
        (["vision=frozen", "vision.lora.alpha=8"], "vision.lora.alpha is set but vision=frozen has no LoRA"),
        (["freeze.lora.r=0"], "r must be >= 1"),
        (["vision=last_n", "vision.last_n=0"], "vision.last_n >= 1"),
        (["model=llava_phi2", "stage=instruct"], "needs stage-1 projector weights"),
        (["model=llava_phi2", "model.pretrained_projector=auto"], "needs model.stage1_data"),
        (["stage=instruct", "model.pretrained_projector=/nonexistent/projector"], "does not exist"),
        (["stage=align", "model.pretrained_projector=/x"], "drop model.pretrained_projector"),
        (["model=tiny_random", "projector=linear"], "needs a composed model"),
        (["model=llava15_7b", "projector=linear"], "needs a composed model"),
        (["train.bf16=true", "train.fp16=true"], "pick one"),
        (["quant.mode=fp8"], "quant.mode='fp8' is not one of"),
        (["data=llava_json", "data.max_bad_in_a_row=-1"], "data.max_bad_in_a_row=-1 must be >= 0"),
    ],
)
def test_invalid_configs_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make(*overrides), overrides)


def test_tiny_world_is_the_default_and_finds_its_own_stage_one():
    cfg = make()
    assert (cfg.model.source, cfg.model.pretrained_projector, cfg.model.stage1_data) == (
        "tiny_world", "auto", "tiny_world_caption")
    assert (cfg.data.name, cfg.train.name, cfg.world.name, cfg.freeze.name, cfg.vision.policy) == (
        "tiny_world_instruct", "cpu_world", "default", "lora_llm", "frozen")
    validate(cfg)
    validate(make("stage=align"))  # `auto` means nothing to load in stage 1


def test_single_stage_on_a_composed_model_needs_no_projector():
    validate(make("model=llava_phi2", "stage=single", "eval=none"))


def test_real_models_need_their_benchmark_files():
    with pytest.raises(ConfigError, match="eval=tiny_world on llava15_7b needs eval.tsv=FILE"):
        validate(make("model=llava15_7b"))
    validate(make("model=llava15_7b", "eval=mmbench", "eval.tsv=/data/MMBench_DEV_EN.tsv"))
