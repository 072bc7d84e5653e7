"""GPU presets (DeepSpeed ZeRO-2/3, FSDP, FSDP-QLoRA) and the accelerate launch configs, checked without a GPU.

Each preset is composed as the command line composes it and turned into TrainingArguments by the runner;
the DeepSpeed JSON is then filled by transformers' own HfTrainerDeepSpeedConfig, the FSDP settings by
TrainingArguments and accelerate's FSDP plugin, and the launch configs by accelerate's launcher (up to the
point where it would start processes). The ZeRO-3 projector round trip runs for real: DeepSpeed
partitions a tiny Llava on the CPU in a one-process gloo group, in a subprocess so that the process group
does not outlive the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import CONF, compose_run
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
)

from vlmablate.config import ConfigError, validate
from vlmablate.model.load import bnb_config
from vlmablate.model.plan import resolve_plan
from vlmablate.train.runner import PACKAGE_CONF, compute_dtype, deepspeed_config, training_arguments

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = CONF / "accelerate"
GPU_PRESETS = ["a100x8_zero2", "a100x8_zero3", "a100x8_fsdp", "rtx4090x2_qlora_fsdp"]
QLORA_FSDP = ("train=rtx4090x2_qlora_fsdp", "model=llava16_mistral_7b", "quant=nf4", "quant.storage=bfloat16",
              "model.torch_dtype=bfloat16", "freeze=lora_llm", "eval=none")


@pytest.fixture
def gpu_args(monkeypatch, tmp_path):
    """TrainingArguments of a GPU preset, built on this CPU machine with WORLD_SIZE as given.

    The presets ask for bf16, which TrainingArguments accepts only on a bf16 GPU: that probe answers yes
    here, as on the A100s the presets are for. WORLD_SIZE alone (no LOCAL_RANK) starts no process group.
    """
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # TrainingArguments sets it; restored after

    def build(*overrides: str, world_size: int = 1):
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        cfg, _ = compose_run(*overrides)
        return cfg, training_arguments(cfg, tmp_path)

    yield build
    # DeepSpeed arguments register themselves globally (is_deepspeed_zero3_enabled reads that weakref).
    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_llava_config(text: str = "llama", hidden: int = 64) -> LlavaConfig:
    """A tiny Llava config with a Llama or Mistral language model."""
    text_cls = {"llama": LlamaConfig, "mistral": MistralConfig}[text]
    text_config = text_cls(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     image_size=32, patch_size=8)
    return LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=127)


def tiny_llava(text: str = "llama") -> LlavaForConditionalGeneration:
    """A tiny Llava (only its module classes matter here). Never built while ZeRO-3 arguments exist: it
    would be partitioned as it is constructed."""
    return LlavaForConditionalGeneration(tiny_llava_config(text))


# --- the presets ------------------------------------------------------------------------------------


def test_every_preset_file_says_what_it_reproduces():
    paths = sorted((CONF / "train").glob("*.yaml"))
    assert set(GPU_PRESETS) <= {p.stem for p in paths}
    for path in paths:
        assert path.read_text().startswith("# "), f"{path.name} does not open with a comment line"


@pytest.mark.parametrize(
    "preset,stage,world,batch,accumulation",
    [
        ("a100x8_zero2", "align", 8, 32, 1),  # LLaVA stage 1: 32 × 8 × 1 = 256
        ("a100x8_zero2", "align", 1, 32, 8),  # the same global batch on one GPU
        ("a100x8_zero3", "instruct", 8, 16, 1),  # LLaVA stage 2: 16 × 8 × 1 = 128
        ("a100x8_zero3", "instruct", 1, 16, 8),
        ("a100x8_fsdp", "instruct", 8, 16, 1),
        ("rtx4090x2_qlora_fsdp", "instruct", 2, 4, 16),  # 4 × 2 × 16 = 128
    ],
)
def test_presets_keep_the_stage_global_batch(gpu_args, preset, stage, world, batch, accumulation):
    if "zero" in preset:
        pytest.importorskip("deepspeed")
    cfg, args = gpu_args(f"train={preset}", f"stage={stage}", world_size=world)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (batch, accumulation)
    assert batch * world * accumulation == cfg.stage.global_batch_size == {"align": 256, "instruct": 128}[stage]
    assert (args.bf16, args.fp16, args.mixed_precision) == (True, False, "bf16")


@pytest.mark.parametrize("preset,checkpointing", [("a100x8_zero2", True), ("a100x8_zero3", True),
                                                   ("a100x8_fsdp", False), ("rtx4090x2_qlora_fsdp", True)])
def test_activation_checkpointing_is_on_once(gpu_args, preset, checkpointing):
    if "zero" in preset:
        pytest.importorskip("deepspeed")
    _, args = gpu_args(f"train={preset}")
    # a100x8_fsdp checkpoints inside FSDP instead (Trainer's own would all-gather every layer twice).
    fsdp_checkpointing = bool(args.fsdp_config and args.fsdp_config.get("activation_checkpointing"))
    assert (args.gradient_checkpointing, fsdp_checkpointing) == (checkpointing, not checkpointing)


def test_deepspeed_names_resolve_to_packaged_files(tmp_path):
    for name in ("zero2", "zero3", "zero3_offload"):
        assert deepspeed_config(name) == str(PACKAGE_CONF / "deepspeed" / f"{name}.json")
        assert Path(deepspeed_config(name)).is_file()
    own = tmp_path / "mine.json"
    assert deepspeed_config(str(own)) == str(own)  # anything else is a path of the user's
    assert deepspeed_config(None) is None


def test_packaged_files_cover_every_config():
    """pyproject's package-data globs take every YAML and JSON under conf/ into the wheel."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["vlmablate"]
    package = REPO / "src" / "vlmablate"
    packaged = {p for pattern in patterns for p in package.glob(pattern)}
    configs = {p for p in CONF.rglob("*") if p.suffix in (".yaml", ".json")}
    assert {p.name for p in configs if p.parent.name in ("deepspeed", "accelerate")} == {
        "zero2.json", "zero3.json", "zero3_offload.json", "ddp.yaml", "deepspeed.yaml", "fsdp.yaml",
        "fsdp_qlora.yaml"}
    assert configs <= packaged


# --- DeepSpeed: the JSON as transformers fills it ---------------------------------------------------------


@pytest.mark.parametrize("preset,stage,micro,accumulation,zero", [("a100x8_zero2", "align", 32, 8, 2),
                                                                   ("a100x8_zero3", "instruct", 16, 8, 3)])
def test_deepspeed_json_is_filled_from_the_preset(gpu_args, preset, stage, micro, accumulation, zero):
    pytest.importorskip("deepspeed")
    from transformers.integrations import is_deepspeed_zero3_enabled

    cfg, args = gpu_args(f"train={preset}", f"stage={stage}", world_size=1)
    assert args.deepspeed == str(PACKAGE_CONF / "deepspeed" / f"zero{zero}.json")
    ds = args.hf_deepspeed_config
    # TrainingArguments ran trainer_config_process: the batch and precision "auto" fields are numbers now.
    assert (ds.config["train_micro_batch_size_per_gpu"], ds.config["gradient_accumulation_steps"],
            ds.config["train_batch_size"]) == (micro, accumulation, cfg.stage.global_batch_size)
    assert (ds.config["bf16"]["enabled"], ds.config["fp16"]["enabled"]) == (True, False)
    assert ds.get_value("zero_optimization.stage") == zero
    assert is_deepspeed_zero3_enabled() is (zero == 3)
    assert ds.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save") is (True if zero == 3 else None)
    assert "optimizer" not in ds.config and "scheduler" not in ds.config  # Trainer builds vlmablate's LR groups

    # Trainer finishes the rest once the model is known: bucket sizes from the LLM's hidden size (Llava's
    # config has none of its own), here LLaVA-1.5-7B's. Finalizing reads the model's config only.
    hidden = 4096
    ds.trainer_config_finalize(args, SimpleNamespace(config=tiny_llava_config(hidden=hidden)), num_training_steps=100)
    assert ds.get_value("zero_optimization.reduce_bucket_size") == hidden * hidden
    if zero == 3:
        assert ds.get_value("zero_optimization.stage3_prefetch_bucket_size") == int(0.9 * hidden * hidden)
        assert ds.get_value("zero_optimization.stage3_param_persistence_threshold") == 10 * hidden
    assert "auto" not in json.dumps(ds.config)


def test_zero3_offload_keeps_our_optimizer(gpu_args):
    pytest.importorskip("deepspeed")
    from transformers.integrations import is_deepspeed_zero3_enabled

    _, args = gpu_args("train=a100x8_zero3", "train.deepspeed=zero3_offload", "stage=instruct")
    ds = args.hf_deepspeed_config
    assert ds.is_zero3() and ds.is_offload() and is_deepspeed_zero3_enabled()
    assert (ds.get_value("zero_optimization.offload_optimizer.device"),
            ds.get_value("zero_optimization.offload_param.device")) == ("cpu", "cpu")
    # No DeepSpeed optimizer block: Trainer's AdamW keeps the per-component LR groups, which DeepSpeed
    # accepts with offload only when told so.
    assert "optimizer" not in ds.config and ds.config["zero_force_ds_cpu_optimizer"] is False
    assert ds.config["gradient_clipping"] == 1.0


def test_zero3_flag_does_not_outlive_its_arguments(gpu_args):
    pytest.importorskip("deepspeed")
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    _, zero3 = gpu_args("train=a100x8_zero3")
    assert is_deepspeed_zero3_enabled()
    unset_hf_deepspeed_config()  # what the fixture does after every test
    assert not is_deepspeed_zero3_enabled()
    _, zero2 = gpu_args("train=a100x8_zero2")
    assert zero2.hf_deepspeed_config.get_value("zero_optimization.stage") == 2 and not is_deepspeed_zero3_enabled()


# --- FSDP ---------------------------------------------------------------------------------------------


def test_fsdp2_preset_resolves_for_accelerate(gpu_args):
    _, args = gpu_args("train=a100x8_fsdp", "stage=instruct", world_size=8)
    assert args.fsdp is True and args.deepspeed is None
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    assert args.fsdp_config["min_num_params"] == 0
    assert args.fsdp_plugin_args == {
        "fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_cls_names_to_wrap": "LlamaDecoderLayer,CLIPEncoderLayer", "cpu_ram_efficient_loading": True,
        "state_dict_type": "FULL_STATE_DICT", "activation_checkpointing": True, "reshard_after_forward": True}


def test_fsdp_qlora_preset_follows_the_peft_guide(gpu_args):
    _, args = gpu_args(*QLORA_FSDP, world_size=2)
    assert args.fsdp is True and args.optim == "adamw_torch"
    assert args.fsdp_plugin_args == {
        "fsdp_version": 1, "cpu_offload": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_cls_names_to_wrap": "MistralDecoderLayer,CLIPEncoderLayer", "cpu_ram_efficient_loading": True,
        "state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": "full_shard", "forward_prefetch": False,
        "backward_prefetch": "BACKWARD_PRE", "use_orig_params": False, "sync_module_states": True}
    # accelerate's FSDP1 plugin asks for the current CUDA device as it is built, so it is not built here.


def test_fsdp2_plugin_wraps_one_unit_per_llava_layer(gpu_args, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    _, args = gpu_args("train=a100x8_fsdp")
    model = tiny_llava("llama")
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)  # FSDP2's plugin builds without a GPU
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [type(m).__name__ for m in model.modules() if policy(m)]
    assert wrapped == ["CLIPEncoderLayer"] * 3 + ["LlamaDecoderLayer"] * 2

    # Why the preset names the layers: Llava's _no_split_modules lists a CLIP text class it does not have, and
    # the vision embeddings. accelerate before 1.16 fails on the first; from 1.16 on it skips it and makes the
    # vision embeddings a unit of their own. Either way the default is not one unit per layer.
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    default = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    assert {"CLIPTextEmbeddings", "CLIPVisionEmbeddings"} <= set(model._no_split_modules)
    try:
        default_policy = fsdp2_prepare_auto_wrap_policy(default, model)
    except ValueError as error:
        assert "Could not find the transformer layer class CLIPTextEmbeddings" in str(error)
    else:
        units = [type(m).__name__ for m in model.modules() if default_policy(m)]
        assert units == ["CLIPVisionEmbeddings"] + ["CLIPEncoderLayer"] * 3 + ["LlamaDecoderLayer"] * 2


@pytest.mark.parametrize("config_file,text", [("fsdp.yaml", "llama"), ("fsdp_qlora.yaml", "mistral")])
def test_peft_wrap_policy_finds_the_layers_the_launch_config_names(monkeypatch, config_file, text):
    """Under FSDP, Trainer swaps in PEFT's wrap policy for a LoRA model; it reads FSDP_TRANSFORMER_CLS_TO_WRAP
    (what `accelerate launch` exports from the config) and otherwise Llava's _no_split_modules, which fail."""
    from accelerate.commands.config.config_args import load_config_from_file
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy

    model = get_peft_model(tiny_llava(text), LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj"))
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    with pytest.raises(TypeError, match="Could not find the transformer layer class"):
        fsdp_auto_wrap_policy(model)

    names = load_config_from_file(str(ACCELERATE / config_file)).fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", names)
    policy = fsdp_auto_wrap_policy(model)
    units = {type(m).__name__ for m in model.modules() if policy(module=m, recurse=False, nonwrapped_numel=0)}
    decoder = {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer"}[text]
    assert units == {decoder, "CLIPEncoderLayer", "Linear"}  # Linear: the LoRA A/B matrices, trainable


def test_launch_configs_name_the_presets_layers():
    from accelerate.commands.config.config_args import load_config_from_file

    for config_file, preset in (("fsdp.yaml", "a100x8_fsdp"), ("fsdp_qlora.yaml", "rtx4090x2_qlora_fsdp")):
        launch = load_config_from_file(str(ACCELERATE / config_file)).fsdp_config
        train = compose_run(f"train={preset}")[0].train.fsdp_config
        assert launch["fsdp_transformer_layer_cls_to_wrap"] == ",".join(train["transformer_layer_cls_to_wrap"])
        assert launch["fsdp_version"] == train["version"]


# --- QLoRA under FSDP: the quantization config and its rules -----------------------------------------------


def test_fsdp_qlora_stores_4bit_weights_in_bf16():
    cfg, _ = compose_run(*QLORA_FSDP)
    validate(cfg)
    plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage, lr_scale=cfg.train.lr_scale)
    bnb = bnb_config(cfg.quant, skip_modules=plan.skip_modules(), compute_dtype=compute_dtype(cfg))
    assert (bnb.load_in_4bit, bnb.bnb_4bit_quant_type, bnb.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert (bnb.bnb_4bit_quant_storage, bnb.bnb_4bit_compute_dtype) == (torch.bfloat16, torch.bfloat16)
    assert bnb.llm_int8_skip_modules == ["model.vision_tower", "model.multi_modal_projector", "lm_head"]

    plain, _ = compose_run("train=rtx4090_qlora", "quant=nf4")
    assert bnb_config(plain.quant, skip_modules=[], compute_dtype=torch.bfloat16).bnb_4bit_quant_storage == torch.uint8


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train=rtx4090x2_qlora_fsdp", "quant=nf4"], "FSDP shards only floating-point tensors"),
        (["train=rtx4090x2_qlora_fsdp", "quant=nf4", "quant.storage=bfloat16"], "set model.torch_dtype=bfloat16"),
        (["train=rtx4090x2_qlora_fsdp", "quant=int8"], "8-bit weights are int8"),
        (["quant=none", "quant.storage=bfloat16"], "quant=none has none"),
        (["quant=nf4", "quant.storage=int4"], "quant.storage='int4' is not one of"),
        (["train=a100x8_fsdp", "train.deepspeed=zero3"], "are both set; pick one"),
    ],
)
def test_sharding_rules_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_run("eval=none", *overrides)[0])


# --- accelerate launch configs --------------------------------------------------------------------------


@pytest.mark.parametrize("config_file,distributed_type,processes", [
    ("ddp.yaml", "MULTI_GPU", 8), ("deepspeed.yaml", "DEEPSPEED", 8), ("fsdp.yaml", "FSDP", 8),
    ("fsdp_qlora.yaml", "FSDP", 2)])
def test_launch_configs_load_in_accelerate(config_file, distributed_type, processes):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(ACCELERATE / config_file))
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type.value, config.num_processes) == (distributed_type, processes)
    assert config.num_machines == 1
    assert config.mixed_precision is None  # precision is the train preset's (bf16), never the launcher's


def launch_env(config_file: Path) -> dict[str, str]:
    """The accelerate/FSDP variables `accelerate launch --config_file FILE -m vlmablate` gives each process,
    computed by accelerate's own launcher code up to where it would start them."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "vlmablate"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as launch_command does before handing over to the DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def test_deepspeed_launch_config_leaves_the_json_in_charge(gpu_args, monkeypatch, tmp_path):
    pytest.importorskip("deepspeed")
    env = launch_env(ACCELERATE / "deepspeed.yaml")
    assert (env["ACCELERATE_USE_DEEPSPEED"], env["ACCELERATE_MIXED_PRECISION"]) == ("true", "no")
    assert "ACCELERATE_DEEPSPEED_ZERO_STAGE" not in env
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _, args = gpu_args("train=a100x8_zero3", "stage=instruct", world_size=8)
    assert (args.deepspeed_plugin.zero_stage, args.mixed_precision) == (3, "bf16")

    # A launch config with its own stage or precision is refused beside the preset's JSON.
    clashing = tmp_path / "clash.yaml"
    clashing.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nmixed_precision: bf16\n"
                        "deepspeed_config:\n  zero_stage: 3\nnum_machines: 1\nnum_processes: 8\n")
    for key, value in launch_env(clashing).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="When using `deepspeed_config_file`"):
        gpu_args("train=a100x8_zero3", "stage=instruct", world_size=8)


@pytest.mark.parametrize("config_file,preset,extra", [
    ("fsdp.yaml", "a100x8_fsdp", {"FSDP_USE_ORIG_PARAMS": "true"}),
    ("fsdp_qlora.yaml", "rtx4090x2_qlora_fsdp", {"FSDP_USE_ORIG_PARAMS": "false", "FSDP_OFFLOAD_PARAMS": "true"})])
def test_fsdp_launch_configs_export_the_preset_before_the_model_loads(config_file, preset, extra):
    env = launch_env(ACCELERATE / config_file)
    train = compose_run(f"train={preset}")[0].train.fsdp_config
    # transformers loads rank-0-only (cpu_ram_efficient_loading) when these two are set at load time.
    assert (env["ACCELERATE_USE_FSDP"], env["FSDP_CPU_RAM_EFFICIENT_LOADING"]) == ("true", "true")
    assert env["FSDP_VERSION"] == str(train["version"])
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == ",".join(train["transformer_layer_cls_to_wrap"])
    assert {k: env[k] for k in extra} == extra


def test_ddp_launch_config_is_plain_multi_gpu():
    env = launch_env(ACCELERATE / "ddp.yaml")
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"
    assert not any(k.startswith(("FSDP_", "ACCELERATE_USE_")) for k in env)


# --- ZeRO-3 and the stage-1 projector, for real on the CPU -----------------------------------------------


@pytest.mark.slow
def test_zero3_partitioned_projector_loads_and_saves_through_gathering(tmp_path):
    """LLaVA #1619: copying a stage-1 projector into a ZeRO-3 model fails on shape-[0] parameters.

    The child process loads the tiny Llava under the a100x8_zero3 preset's arguments (from_pretrained
    partitions it), loads and saves a projector through projector_io, and reports what it saw.
    """
    pytest.importorskip("deepspeed")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, __file__, "zero3-child", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = json.loads((tmp_path / "zero3.json").read_text())
    full = {"linear_1.weight": [64, 32], "linear_1.bias": [64], "linear_2.weight": [64, 64], "linear_2.bias": [64]}

    assert seen["zero3_enabled"] is True
    # from_pretrained partitioned the projector: each rank holds a [0] placeholder with a ds_id.
    assert seen["loaded"] == {name: {"shape": [0], "ds_shape": shape, "ds_id": True, "dtype": "torch.bfloat16"}
                              for name, shape in full.items()}
    # The parameter table (summary.json's "params") counts what the placeholders stand for.
    assert seen["table_partitioned"] == seen["table_unpartitioned"]
    assert seen["table_partitioned"]["components"]["projector"]["total"] == 64 * 32 + 64 + 64 * 64 + 64
    assert seen["plain_copy_error"].startswith("Error(s) in loading state_dict")
    assert ("size mismatch for linear_1.weight: copying a param with shape torch.Size([64, 32]) from checkpoint, "
            "the shape in current model is torch.Size([0])") in seen["plain_copy_error"]
    assert seen["differs_before_load"] is True
    assert seen["equal_after_load"] == dict.fromkeys(full, True)  # bitwise, after the cast to bf16
    assert seen["shapes_after_load"] == dict.fromkeys(full, [0])  # partitioned again
    # Saving gathers too; the state dict without gathering would hold [0] tensors only.
    assert seen["ungathered_state_dict"] == dict.fromkeys(full, [0])
    assert seen["saved_shapes"] == full and seen["saved_equal"] == dict.fromkeys(full, True)
    # Inside the trainer's own gather (its ZeRO-3 save_model), saving adds no nested gather and keeps the
    # parameters gathered for the rest of that save.
    assert seen["nested_saved_shapes"] == full and seen["nested_sha256_matches"] is True
    assert seen["shapes_inside_outer_gather_after_save"] == full


def _zero3_child(out: Path) -> None:
    """One rank, gloo, DeepSpeed ZeRO-3 on the CPU: what projector_io does to a partitioned projector."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      LOCAL_WORLD_SIZE="1")
    import deepspeed
    from safetensors.torch import load_file
    from transformers.integrations import is_deepspeed_zero3_enabled

    from vlmablate.model.load import load_model, resolve_checkpoint
    from vlmablate.model.plan import parameter_table
    from vlmablate.model.projector_io import load_projector, projector_module, save_projector

    # DeepSpeed compiles a shared-memory all-reduce kernel for CPU process groups on first use (~45 s, and
    # it needs a C++ compiler); one process never all-reduces through it.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    seen: dict = {}
    try:
        cfg, _ = compose_run("model=tiny_random", "world=test", "train=a100x8_zero3", "stage=instruct", "eval=none",
                             "train.use_cpu=true")
        plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage, lr_scale=1.0)

        def load():
            return load_model(cfg.model, projector_type=plan.projector_type, quant=cfg.quant,
                              skip_modules=plan.skip_modules(), compute_dtype=compute_dtype(cfg)).model

        # Before ZeRO-3 is on: the tiny checkpoint is built here (a model built under ZeRO-3 is partitioned,
        # and saving it would write [0] tensors), and the "stage-1" projector comes from an unpartitioned twin.
        resolve_checkpoint(cfg.model, projector_type=plan.projector_type)
        twin = load()
        with torch.no_grad():
            torch.manual_seed(1)
            for p in projector_module(twin).parameters():
                p.add_(torch.randn_like(p))
        stage1 = out / "stage1"
        save_projector(twin, stage1, projector_type=plan.projector_type)
        saved = load_file(str(stage1 / "mm_projector.safetensors"))
        seen["table_unpartitioned"] = parameter_table(twin, plan)

        args = training_arguments(cfg, out / "run")  # the runner builds them before the model loads
        seen["zero3_enabled"] = is_deepspeed_zero3_enabled()
        model = load()
        module = projector_module(model)
        named = dict(module.named_parameters())
        seen["loaded"] = {n: {"shape": list(p.shape), "ds_shape": list(p.ds_shape), "ds_id": hasattr(p, "ds_id"),
                              "dtype": str(p.dtype)} for n, p in named.items()}
        seen["table_partitioned"] = parameter_table(model, plan)

        def gathered() -> dict:
            with deepspeed.zero.GatheredParameters(list(named.values())):
                return {n: p.detach().clone() for n, p in named.items()}

        try:
            module.load_state_dict(saved)  # what LLaVA does with --pretrain_mm_mlp_adapter
        except RuntimeError as err:
            seen["plain_copy_error"] = str(err)
        seen["differs_before_load"] = any(not torch.equal(t, saved[n].to(t.dtype)) for n, t in gathered().items())

        load_projector(model, stage1, projector_type=plan.projector_type)
        after = gathered()
        seen["equal_after_load"] = {n: torch.equal(t, saved[n].to(t.dtype)) for n, t in after.items()}
        seen["shapes_after_load"] = {n: list(p.shape) for n, p in named.items()}

        seen["ungathered_state_dict"] = {n: list(t.shape) for n, t in module.state_dict().items()}
        meta = save_projector(model, out / "resaved", projector_type=plan.projector_type)
        resaved = load_file(str(out / "resaved" / "mm_projector.safetensors"))
        seen["saved_shapes"] = meta["shapes"]
        seen["saved_equal"] = {n: torch.equal(resaved[n], after[n]) for n in after}

        trainable = [p for p in model.parameters() if p.requires_grad] + list(named.values())
        with deepspeed.zero.GatheredParameters(list({id(p): p for p in trainable}.values())):
            nested = save_projector(model, out / "nested", projector_type=plan.projector_type)
            seen["shapes_inside_outer_gather_after_save"] = {n: list(p.shape) for n, p in named.items()}
        seen["nested_saved_shapes"] = nested["shapes"]
        seen["nested_sha256_matches"] = nested["sha256"] == meta["sha256"]
        del args
    finally:
        torch.distributed.destroy_process_group()
    (out / "zero3.json").write_text(json.dumps(seen, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["zero3-child"]:
        _zero3_child(Path(sys.argv[2]))
