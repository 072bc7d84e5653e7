"""`python -m vlmablate.plan model=... quant=... train=... [freeze=... vision=...] [plan.gpu_gb=24]`

What a cell will train and whether it fits a GPU, before any weights are downloaded: the model is
built on the meta device from its config alone (shipped copies for the preset models, see
`model/hub_configs/`), the freeze plan is applied with the very code the runner uses, and the
per-component table is counted the same way. Then peak GPU memory is estimated term by term:

- weights: quantized LLM linear layers at 4 or 8 bits (plus their quantization constants); the other
  weights in the compute dtype, or in fp32 when quantized (PEFT's k-bit preparation upcasts them);
- LoRA weights, gradients and optimizer states of what trains (8-bit optimizers: 2 bytes a parameter,
  torch AdamW: two states in the parameter's dtype);
- activations of the LLM: 34·hidden bytes per token and layer without gradient checkpointing (Korthikanti
  et al. 2022, with the attention matrix never stored, as SDPA does); with it, each layer's input
  plus one layer recomputed; the logits in the compute dtype and in fp32 for the loss, on the labelled
  tokens only (`plan.labelled_tokens` a sample, as `train.labelled_logits_only` runs the LM head; every
  position with it off);
- activations of a vision tower that trains, per image token the same way (LLaVA-NeXT: up to 5 tiles);
- a fixed 1 GiB for the CUDA context and allocator slack.

The sequence length is `plan.seq_len` (null: `model.max_length`, the worst case) at the preset's
per-device batch. Besides the chosen cell, the four cells of the reference freeze grid are listed, and
the decision per budget (`report.budgets`) the report would end with, from these estimates: accuracy is
unknown before any run, so the cells that fit are ranked by cost alone (`report/decision.py`).

Compute: the training FLOPs per token of each cell (`model.flops.flops_from_config`: forward, activation
and weight gradients, attention), for a sample of that same sequence length carrying one image (LlavaNext:
its largest anyres grid, the base image plus every tile). At `plan.mfu` of `plan.gpu`'s bf16 dense peak
(`train.mfu.GPU_PEAKS`) that gives tokens/s, the time per 1M tokens and, where the data config declares its
`size`, the time per epoch with every sample that long (at `model.max_length`, an upper bound).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from vlmablate.config import ConfigError, ModelConfig, RunConfig, register_configs, to_run_config, validate
from vlmablate.model.flops import flops_from_config
from vlmablate.model.plan import COMPONENTS, apply_plan, parameter_table, resolve_plan, unwrap
from vlmablate.report.decision import Budget, decide, decision_text, duration, parse_budgets
from vlmablate.train.mfu import GPU_PEAKS

register_configs()
log = logging.getLogger(__name__)

HUB_CONFIGS = Path(__file__).parent / "model" / "hub_configs"
GIB = 2**30
# The reference freeze table: (name, vision option, freeze option)
REFERENCE_GRID = (("frozen vision + frozen LLM", "frozen", "frozen_llm"),
                  ("frozen vision + LoRA LLM", "frozen", "lora_llm"),
                  ("unfrozen vision + LoRA LLM", "unfrozen", "lora_llm"),
                  ("full fine-tune", "unfrozen", "full_llm"))
QUANT_BYTES = {"nf4": 0.5, "int8": 1.0}
ACTIVATION_FACTOR = 34  # bytes per token, layer and hidden unit in 16-bit (no stored attention matrix)
RUNTIME_GIB = 1.0
EIGHT_BIT_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "adamw_bnb_8bit", "paged_lion_8bit", "lion_8bit")


# --- configs without weights ---------------------------------------------------------------------------


def _shipped(checkpoint: str) -> Path | None:
    folder = HUB_CONFIGS / checkpoint.replace("/", "--")
    return folder if folder.is_dir() else None


def load_config_dict(checkpoint: str) -> dict:
    """config.json of a local folder, else the shipped copy, else the hub (needs a network or HF cache)."""
    local = Path(checkpoint).expanduser()
    if (local / "config.json").exists():
        return json.loads((local / "config.json").read_text())
    shipped = _shipped(checkpoint)
    if shipped is not None:
        return json.loads((shipped / "config.json").read_text())
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(checkpoint).to_dict()
    except OSError as err:
        raise ConfigError(f"{checkpoint}: no local folder, no shipped config and the hub is unreachable "
                          f"({err}); pass a local folder") from err


def _config_from_dict(data: dict):
    from transformers import AutoConfig

    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def _tokenizer_size(checkpoint: str) -> tuple[int, bool]:
    """(tokenizer length, whether <image> is in it) of an LLM: local tokenizer, else shipped facts."""
    local = Path(checkpoint).expanduser()
    if local.is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(local)
        return len(tokenizer), "<image>" in tokenizer.get_vocab()
    shipped = _shipped(checkpoint)
    if shipped is not None and (shipped / "tokenizer_facts.json").exists():
        facts = json.loads((shipped / "tokenizer_facts.json").read_text())
        return facts["tokenizer_size"], facts["has_image_token"]
    raise ConfigError(f"{checkpoint}: the composed vocabulary needs the tokenizer; pass a local folder")


def model_config(cfg: ModelConfig, projector_type: str):
    """The Llava / LlavaNext config a run of `cfg` would build, from configs alone."""
    from vlmablate.model.load import DUAL_ENCODERS, VISION_TOWERS, composed_llava_config, resolve_checkpoint

    if cfg.source in ("pretrained", "tiny_random"):
        checkpoint = resolve_checkpoint(cfg, projector_type=projector_type)
        return _config_from_dict(load_config_dict(checkpoint))
    if cfg.source != "compose":
        raise ConfigError(f"model.source={cfg.source!r} cannot be planned; resolve it first")
    vision = load_config_dict(cfg.vision_checkpoint)
    vision = vision["vision_config"] | {"model_type": vision["model_type"] + "_vision_model"} \
        if vision["model_type"] in DUAL_ENCODERS else vision
    if vision["model_type"] not in VISION_TOWERS:
        raise ConfigError(f"{cfg.vision_checkpoint}: {vision['model_type']!r} is not a vision tower compose takes")
    text = _config_from_dict(load_config_dict(cfg.llm_checkpoint))
    size, has_image = _tokenizer_size(cfg.llm_checkpoint)
    text.vocab_size = max(size + (0 if has_image else 1), text.vocab_size)  # compose's resize rule
    vision_config = _config_from_dict(vision)
    # the image token's id does not change any parameter shape: the last row of the vocabulary stands in
    return composed_llava_config(vision_config, text, text.vocab_size - 1, cfg, projector_type,
                                 VISION_TOWERS[vision_config.model_type])


def meta_model(config) -> nn.Module:
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    cls = LlavaNextForConditionalGeneration if config.model_type == "llava_next" else LlavaForConditionalGeneration
    with torch.device("meta"):
        model = cls(config)
    return model


def _quantizable(model: nn.Module, skip: list[str]) -> int:
    """Weights bitsandbytes would quantize: the LLM's linear layers outside the skip list."""
    base = unwrap(model)
    total = 0
    for name, module in base.named_modules():
        if type(module) is nn.Linear and name.startswith("model.language_model.") and ".lora_" not in name \
                and not any(name == s or name.startswith(s + ".") for s in skip):
            total += module.weight.numel()
    return total


def count_cell(cfg: RunConfig) -> tuple[dict, object]:
    """The runner's parameter table for `cfg`, computed on the meta device; and the model config."""
    from vlmablate.train.runner import resolve_model

    plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage, lr_scale=cfg.train.lr_scale)
    config = model_config(resolve_model(cfg), plan.projector_type)
    model = apply_plan(meta_model(config), replace(plan, quant="none"))  # k-bit preparation needs real weights
    table = parameter_table(model, plan)
    if plan.quant != "none":
        table["components"]["llm"]["quantized"] = _quantizable(model, plan.skip_modules())
    return table, config


# --- memory -----------------------------------------------------------------------------------------------


def _dtype_bytes(cfg: RunConfig) -> int:
    if cfg.train.bf16 or cfg.train.fp16:
        return 2
    return 4 if cfg.model.torch_dtype in ("float32", "auto") else 2


def logit_rows(cfg: RunConfig, seq: int) -> int:
    """Positions a sample runs the LM head on: its labelled tokens (`plan.labelled_tokens`, at most `seq`) under
    `train.labelled_logits_only`, else every position."""
    if cfg.plan.labelled_tokens < 1:
        raise ConfigError(f"plan.labelled_tokens={cfg.plan.labelled_tokens}: assistant tokens a sample, >= 1")
    return min(cfg.plan.labelled_tokens, seq) if cfg.train.labelled_logits_only else seq


def estimate_memory(cfg: RunConfig, table: dict, config) -> dict:
    """Peak GPU memory by term, in GiB (see the module docstring for the model)."""
    rows, quant = table["components"], cfg.quant.mode
    dtype = _dtype_bytes(cfg)
    quantized = rows["llm"]["quantized"]
    base = table["total"]
    constants = 0.0
    if quant == "nf4":  # one absmax per 64 weights: fp32, or 8-bit plus fp32 per 256 blocks with double quant
        constants = quantized * ((1 + 4 / 256) / 64 if cfg.quant.double_quant else 4 / 64)
    elif quant == "int8":
        constants = quantized * 4 / max(1, config.text_config.hidden_size)
    other_bytes = 4 if quant != "none" else dtype  # PEFT upcasts what is not quantized to fp32
    weights = quantized * QUANT_BYTES.get(quant, 0) + constants + (base - quantized) * other_bytes
    lora = sum(r["lora"] for r in rows.values())
    lora_bytes = 4 if quant != "none" else dtype
    trainable = table["trainable"]["total"]
    trainable_base = trainable - lora
    param_bytes = lora * lora_bytes + trainable_base * other_bytes
    grads = param_bytes
    if cfg.train.optim in EIGHT_BIT_OPTIMIZERS:
        optimizer = 2.0 * trainable
    else:
        optimizer = 2.0 * param_bytes
    text = config.text_config
    batch = cfg.train.per_device_train_batch_size
    seq = cfg.plan.seq_len or cfg.model.max_length
    tokens = batch * seq
    per_layer = ACTIVATION_FACTOR * text.hidden_size * tokens
    if cfg.train.gradient_checkpointing:
        llm_act = text.num_hidden_layers * 2 * text.hidden_size * tokens + per_layer
    else:
        llm_act = text.num_hidden_layers * per_layer
    logits = batch * logit_rows(cfg, seq) * text.vocab_size * (dtype + 4)
    vision_act = 0.0
    if rows["vision"]["trainable"]:
        v = config.vision_config
        tiles = 5 if config.model_type == "llava_next" else 1  # base image + the 2x2 tiles of 672x672
        image_tokens = ((v.image_size // v.patch_size) ** 2 + 1) * tiles * batch
        vision_act = v.num_hidden_layers * ACTIVATION_FACTOR * v.hidden_size * image_tokens
        if cfg.train.gradient_checkpointing:
            vision_act = v.num_hidden_layers * 2 * v.hidden_size * image_tokens + vision_act / v.num_hidden_layers
    terms = {"weights": weights, "lora_and_grads": lora * lora_bytes + grads, "optimizer": optimizer,
             "activations_llm": llm_act, "logits": logits, "activations_vision": vision_act}
    gib = {k: round(v / GIB, 2) for k, v in terms.items()}
    gib["runtime"] = RUNTIME_GIB
    gib["total"] = round(sum(terms.values()) / GIB + RUNTIME_GIB, 2)
    gib["batch"], gib["seq_len"] = batch, seq
    gib["logit_rows"], gib["labelled_logits_only"] = logit_rows(cfg, seq), cfg.train.labelled_logits_only
    gib["fits"] = gib["total"] <= cfg.plan.gpu_gb
    return gib


# --- compute ----------------------------------------------------------------------------------------------


def largest_image_crops(config) -> int:
    """Crops of one image through the tower: LlavaNext's largest anyres grid plus the base image; Llava's one."""
    if config.model_type != "llava_next":
        return 1
    tile = config.vision_config.image_size
    return 1 + max(h // tile * (w // tile) for h, w in config.image_grid_pinpoints)


def estimate_compute(cfg: RunConfig, config) -> dict:
    """Training FLOPs per token of the cell, and the time they take on `plan.gpu` at `plan.mfu`."""
    if cfg.plan.gpu not in GPU_PEAKS:
        raise ConfigError(f"plan.gpu={cfg.plan.gpu!r} is not one of {', '.join(GPU_PEAKS)}")
    if not 0 < cfg.plan.mfu <= 1:
        raise ConfigError(f"plan.mfu={cfg.plan.mfu} must lie in (0, 1]")
    plan = resolve_plan(cfg.vision, cfg.projector, cfg.freeze, cfg.quant, cfg.stage, lr_scale=cfg.train.lr_scale)
    seq, crops = cfg.plan.seq_len or cfg.model.max_length, largest_image_crops(config)
    per_token = flops_from_config(config, plan, seq_len=seq, crops=crops).per_token()
    gpu = GPU_PEAKS[cfg.plan.gpu]
    tokens_per_s = gpu.tflops * 1e12 * cfg.plan.mfu / per_token["total"].total
    samples = cfg.data.size
    return {"flops_per_token": per_token["total"].total,
            "by_component": {c: per_token[c].total for c in COMPONENTS},
            "seq_len": seq, "seq_len_from": "plan.seq_len" if cfg.plan.seq_len else "model.max_length",
            "crops": crops, "gpu": gpu.label, "peak_tflops": gpu.tflops, "mfu": cfg.plan.mfu,
            "tokens_per_s": tokens_per_s, "seconds_per_1m_tokens": 1e6 / tokens_per_s,
            "data": cfg.data.name, "samples": samples,
            "epoch_seconds": samples * seq / tokens_per_s if samples else None}


def format_compute(compute: dict) -> str:
    c = compute
    parts = ", ".join(f"{k} {v:.3g}" for k, v in c["by_component"].items())
    length = f"{c['seq_len']} tokens ({c['seq_len_from']}" + (": the worst case; plan.seq_len=N plans N)"
                                                               if c["seq_len_from"] == "model.max_length" else ")")
    lines = [f"training FLOPs per token ≈ {c['flops_per_token']:.4g} ({parts}), assuming every sample is {length} "
             f"with one image of {c['crops']} crop(s)",
             f"on {c['gpu']} ({c['peak_tflops']:g} TFLOP/s bf16 dense) at MFU {c['mfu']:g} (plan.mfu): "
             f"{c['tokens_per_s']:,.0f} tokens/s, {duration(c['seconds_per_1m_tokens'])} per 1M tokens"]
    if c["epoch_seconds"] is not None:
        lines.append(f"one epoch of data={c['data']} ({c['samples']:,} samples × {c['seq_len']} tokens) ≈ "
                     f"{duration(c['epoch_seconds'])}")
    else:
        lines.append(f"data={c['data']} declares no size (data.size): no time per epoch, only per 1M tokens")
    return "\n".join(lines)


# --- the command ------------------------------------------------------------------------------------------


def plan_cell(cfg: RunConfig) -> dict:
    validate(replace(cfg, eval=replace(cfg.eval, tasks=[])))  # the cell's rules; evaluation is not planned
    table, config = count_cell(cfg)
    return {"vision": cfg.vision.policy, "freeze": cfg.freeze.name, "quant": cfg.quant.mode, "params": table,
            "memory_gib": estimate_memory(cfg, table, config), "model_type": config.model_type,
            "compute": estimate_compute(cfg, config)}


def grid_cells(cfg: RunConfig, compose) -> list[tuple[str, dict | str]]:
    """The reference freeze table's four cells on this model, train preset and quantization (none for full
    fine-tuning)."""
    out = []
    for name, vision, freeze in REFERENCE_GRID:
        quant = "none" if freeze == "full_llm" else cfg.quant.mode
        cell_cfg = compose([f"vision={vision}", f"freeze={freeze}", f"quant={quant}"])
        try:
            out.append((name, plan_cell(cell_cfg)))
        except ConfigError as err:
            out.append((name, str(err)))
    return out


def format_plan(result: dict, gpu_gb: float) -> str:
    rows = result["params"]["components"]
    lines = [f"{'component':<10} {'total':>15} {'trainable':>14} {'lora':>12} {'quantized':>15} {'unused':>12}"]
    for c in COMPONENTS:
        r = rows[c]
        lines.append(f"{c:<10} {r['total']:>15,} {r['trainable']:>14,} {r['lora']:>12,} {r['quantized']:>15,} "
                     f"{r['unused']:>12,}")
    total, trainable = result["params"]["total"], result["params"]["trainable"]["total"]
    lines.append(f"{'all':<10} {total:>15,} {trainable:>14,}  ({100 * trainable / max(1, total):.2f}% trainable)")
    mem = result["memory_gib"]
    terms = ", ".join(f"{k} {mem[k]:.2f}" for k in ("weights", "lora_and_grads", "optimizer", "activations_llm",
                                                     "logits", "activations_vision", "runtime"))
    verdict = "fits" if mem["fits"] else "does NOT fit"
    lines.append(f"peak GPU memory ≈ {mem['total']:.1f} GiB at batch {mem['batch']} × {mem['seq_len']} tokens "
                 f"({terms}): {verdict} in {gpu_gb:g} GiB")
    if mem["labelled_logits_only"]:
        lines.append(f"logits on the labelled tokens only (train.labelled_logits_only): assistant tokens ≈ "
                     f"{mem['logit_rows']} per sample; plan.labelled_tokens=N changes it")
    else:
        lines.append(f"logits on all {mem['seq_len']} tokens of a sample (train.labelled_logits_only=false)")
    return "\n".join(lines)


def format_grid(cells: list[tuple[str, dict | str]], gpu_gb: float) -> str:
    computed = next((c["compute"] for _, c in cells if isinstance(c, dict)), None)
    per_epoch = computed is not None and computed["epoch_seconds"] is not None
    time_header = "epoch" if per_epoch else "per 1M tok"
    header = (f"{'cell':<28} {'quant':<6} {'trainable':>15} {'% of total':>10} {'peak GiB':>9}  fits {gpu_gb:g} GiB"
              f" {'FLOPs/token':>12} {time_header:>10}")
    lines = [header, "-" * len(header)]
    for name, cell in cells:
        if isinstance(cell, str):
            lines.append(f"{name:<28} invalid: {cell}")
            continue
        p, mem, c = cell["params"], cell["memory_gib"], cell["compute"]
        share = 100 * p["trainable"]["total"] / max(1, p["total"])
        time = duration(c["epoch_seconds"] if per_epoch else c["seconds_per_1m_tokens"])
        lines.append(f"{name:<28} {cell['quant']:<6} {p['trainable']['total']:>15,} {share:>9.2f}% "
                     f"{mem['total']:>9.1f}  {'yes' if mem['fits'] else 'NO':<{len(f'fits {gpu_gb:g} GiB')}} "
                     f"{c['flops_per_token']:>12.4g} {time:>10}")
    if computed is not None:
        lines.append(f"(FLOPs and time as above: {computed['seq_len']} tokens and {computed['crops']} crop(s) a "
                     f"sample, {computed['gpu']} at MFU {computed['mfu']:g})")
    return "\n".join(lines)


def estimated_peak_gib(config: dict) -> float | None:
    """The peak GPU memory estimate (GiB) for a finished run's composed config: the report's stand-in where the
    runs measured none (CPU runs). None where the config cannot be planned (a schema it predates, a model
    whose config is out of reach)."""
    from omegaconf import OmegaConf

    try:
        return plan_cell(to_run_config(OmegaConf.create(config)))["memory_gib"]["total"]
    except Exception as err:  # a fallback only: without it the decision says the budget cannot be checked
        log.info("no memory estimate for a run of this config: %s", err)
        return None


def grid_decision(cells: list[tuple[str, dict | str]], budgets: list[Budget]) -> dict:
    """The report's decision per budget over the grid's estimates: memory, and wall-clock as one epoch (where
    the data declares its size); no accuracy, so the cells are ranked by cost alone."""
    rows = []
    for name, cell in cells:
        if isinstance(cell, str):
            rows.append({"cell": name, "status": "invalid", "error": cell})
            continue
        rows.append({"cell": name, "status": "planned", "peak_mem_estimated_gib": cell["memory_gib"]["total"],
                     "wall_clock_estimated_s": cell["compute"]["epoch_seconds"],
                     "trainable_params": cell["params"]["trainable"]["total"]})
    return decide(rows, [], budgets)


def format_decision(decision: dict, mfu: float) -> str:
    timed = any(d["kind"] == "time" for d in decision["budgets"])
    time = f", wall-clock as one epoch at MFU {mfu:g}" if timed else ""
    return decision_text(decision, f"the decision per budget (report.budgets) from these estimates{time}; accuracy is "
                                   "unknown before any run, so the cells that fit are ranked by cost alone:")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra import compose as hydra_compose
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    run_cfg = to_run_config(cfg)

    def compose(extra: list[str]) -> RunConfig:
        kept = [o for o in overrides if o.split("=")[0].lstrip("+~") not in ("vision", "freeze", "quant")]
        return to_run_config(hydra_compose(config_name="config", overrides=[*kept, *extra]))

    result = plan_cell(run_cfg)
    print(f"plan: model={run_cfg.model.name} vision={run_cfg.vision.policy} freeze={run_cfg.freeze.name} "
          f"quant={run_cfg.quant.mode} train={run_cfg.train.name}")
    print(format_plan(result, run_cfg.plan.gpu_gb))
    print(format_compute(result["compute"]))
    cells = grid_cells(run_cfg, compose) if run_cfg.plan.grid else []
    decision = grid_decision(cells, parse_budgets(run_cfg.report.budgets)) if cells else None
    if cells:
        print(f"\nthe reference freeze grid on {run_cfg.model.name} (train={run_cfg.train.name}):")
        print(format_grid(cells, run_cfg.plan.gpu_gb))
        print("\n" + format_decision(decision, run_cfg.plan.mfu))
    out = Path(HydraConfig.get().runtime.output_dir) / "plan.json"
    out.write_text(json.dumps({"cell": result, "grid": [{"cell": n, **(c if isinstance(c, dict) else {"error": c})}
                                                        for n, c in cells], "decision": decision}, indent=2))
    print(f"plan written to {out}")


if __name__ == "__main__":
    main()
