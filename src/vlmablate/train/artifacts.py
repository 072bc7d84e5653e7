"""What a checkpoint holds, derived from the plan (LLaVA's selective saving, without its gaps).

- projector trainable → `projector/` (mm_projector.safetensors + projector.json), at every
  checkpoint, so a stage-2 run or a resume always finds it;
- any LoRA → `adapter/` (PEFT adapter) + `non_lora_trainables.safetensors` (projector, unfrozen
  vision blocks: the weights LoRA checkpoints elsewhere forget);
- a fully trained LLM → `model/`, a complete HF checkpoint with its processor;
- otherwise trainable vision blocks → `trainables.safetensors`.
Every checkpoint also carries `vlmablate_plan.json`: the resolved config, the plan and the
parameter table (what was trainable).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlmablate.model.plan import FreezePlan, base_name, component_of, is_lora_param, peft_without_bitsandbytes, unwrap
from vlmablate.model.projector_io import projector_from_state_dict, save_projector, write_projector

log = logging.getLogger(__name__)

PLAN_FILE = "vlmablate_plan.json"
NON_LORA_FILE = "non_lora_trainables.safetensors"
TRAINABLES_FILE = "trainables.safetensors"


_ENGINE_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def engine_free(name: str) -> str:
    """A state-dict key without the wrappers FSDP, activation checkpointing or compile put in it."""
    for prefix in _ENGINE_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _trainable_state(model: nn.Module, *, exclude_projector: bool, state_dict: dict | None = None,
                     trainable: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Trainable non-LoRA weights by their base (unwrapped HF) names, on the CPU.

    With `state_dict` (an engine's gathered one) the tensors come from it, and `trainable` names
    the parameters that train (an engine's own parameters are shards, or flat).
    """
    if state_dict is None:
        tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    else:
        tensors = {n: t for n, t in state_dict.items() if n in trainable}  # keys already engine_free
    return {
        base_name(n): t.detach().to("cpu").contiguous().clone()
        for n, t in tensors.items()
        if not is_lora_param(n) and not (exclude_projector and component_of(n) == "projector")
    }


def write_json_atomic(path: Path, data: dict) -> None:
    """Through a temporary file and a rename: a reader never sees a half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def save_artifacts(model: nn.Module, plan: FreezePlan, folder: str | os.PathLike, *, processor=None,
                   plan_record: dict, state_dict: dict | None = None,
                   trainable: set[str] | None = None) -> dict[str, str]:
    """Write what the plan says is worth keeping into `folder`; return {artifact: path}.

    `state_dict` and `trainable`: under FSDP the parameters are shards, so Trainer hands over the
    gathered full state dict, and the names of the trainable parameters come from before wrapping.
    """
    if state_dict is not None:
        if trainable is None:
            raise ValueError("save_artifacts with a state_dict needs the names of the trainable parameters")
        state_dict = {engine_free(k): v for k, v in state_dict.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    if plan.projector.trainable:
        extra = {"lineage": plan_record.get("lineage")}
        if state_dict is None:
            save_projector(model, folder / "projector", projector_type=plan.projector_type, extra=extra)
        else:
            write_projector(projector_from_state_dict(state_dict), folder / "projector",
                            projector_type=plan.projector_type, extra=extra)
        written["projector"] = str(folder / "projector")
    if plan.uses_lora:
        model.save_pretrained(folder / "adapter", state_dict=state_dict)  # PEFT keeps the adapter's keys
        non_lora = _trainable_state(model, exclude_projector=False, state_dict=state_dict, trainable=trainable)
        if non_lora:
            save_file(non_lora, folder / NON_LORA_FILE)
            written["non_lora_trainables"] = str(folder / NON_LORA_FILE)
        written["adapter"] = str(folder / "adapter")
    elif plan.llm.mode == "full":
        full = None if state_dict is None else {base_name(k): v for k, v in state_dict.items()}
        unwrap(model).save_pretrained(folder / "model", state_dict=full)
        if processor is not None:
            processor.save_pretrained(folder / "model")
        written["model"] = str(folder / "model")
    else:
        rest = _trainable_state(model, exclude_projector=True, state_dict=state_dict, trainable=trainable)
        if rest:
            save_file(rest, folder / TRAINABLES_FILE)
            written["trainables"] = str(folder / TRAINABLES_FILE)
    write_json_atomic(folder / PLAN_FILE, {**plan_record, "artifacts": written})
    return written


def load_trainables(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Copy a `non_lora_trainables` / `trainables` file into a model (base names); return the names."""
    state = load_file(str(path))
    params = {base_name(n): p for n, p in model.named_parameters()}
    missing = [n for n in state if n not in params]
    if missing:
        raise KeyError(f"{path}: {len(missing)} tensors have no parameter in the model, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return list(state)


def load_artifacts(model: nn.Module, plan: FreezePlan, folder: str | os.PathLike) -> list[str]:
    """Put what `save_artifacts` wrote back into `model` (a resume); return the files read.

    The inverse of `save_artifacts`, tensor for tensor: a resumed run continues from the very weights
    its checkpoint holds.
    """
    folder = Path(folder)
    read: list[str] = []
    if plan.uses_lora:
        from peft import set_peft_model_state_dict

        adapter = folder / "adapter"
        result = set_peft_model_state_dict(model, load_file(str(adapter / "adapter_model.safetensors")))
        if result.unexpected_keys:
            raise KeyError(f"{adapter}: {len(result.unexpected_keys)} tensors fit no adapter weight of the model, "
                           f"e.g. {result.unexpected_keys[:3]}")
        read.append(str(adapter))
        if (folder / NON_LORA_FILE).exists():
            load_trainables(model, folder / NON_LORA_FILE)
            read.append(str(folder / NON_LORA_FILE))
        return read
    if plan.projector.trainable:
        from vlmablate.model.projector_io import load_projector

        load_projector(model, folder / "projector", projector_type=plan.projector_type)
        read.append(str(folder / "projector"))
    if plan.llm.mode == "full":
        _load_full(unwrap(model), folder / "model")
        read.append(str(folder / "model"))
    elif (folder / TRAINABLES_FILE).exists():
        load_trainables(model, folder / TRAINABLES_FILE)
        read.append(str(folder / TRAINABLES_FILE))
    return read


def _load_full(model: nn.Module, folder: Path) -> None:
    """A `save_pretrained` folder back into `model`, in place.

    transformers names tensors on disk in the hub layout, not by the live model's attributes, so the
    folder is read by `from_pretrained` (which maps the names) and its weights copied across.
    """
    saved = type(model).from_pretrained(str(folder), dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        model.load_state_dict(saved.state_dict(), strict=True)
    del saved


def export_merged(checkpoint: str, folder: str | os.PathLike, artifacts_dir: str | os.PathLike,
                  *, dtype: torch.dtype = torch.float32) -> str:
    """A merged Llava checkpoint (base + LoRA + non-LoRA trainables) loadable by `from_pretrained`.

    The base is reloaded unquantized: merging into 4-bit weights would round the LoRA update away.
    """
    from peft import PeftModel
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    artifacts_dir = Path(artifacts_dir)
    model_type = AutoConfig.from_pretrained(checkpoint).model_type
    cls = LlavaNextForConditionalGeneration if model_type == "llava_next" else LlavaForConditionalGeneration
    base = cls.from_pretrained(checkpoint, dtype=dtype)
    with peft_without_bitsandbytes():  # the base is unquantized: no bitsandbytes layer to make
        merged = PeftModel.from_pretrained(base, artifacts_dir / "adapter").merge_and_unload()
    if (artifacts_dir / NON_LORA_FILE).exists():
        load_trainables(merged, artifacts_dir / NON_LORA_FILE)
    merged.save_pretrained(folder)
    AutoProcessor.from_pretrained(checkpoint).save_pretrained(folder)
    return str(folder)
