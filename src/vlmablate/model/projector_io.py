"""Save and load the projector alone: the stage-1 (align) artifact that stage 2 starts from.

A projector folder holds `mm_projector.safetensors` (tensor names relative to the projector:
`linear_1.weight`, ...) and `projector.json` (type, shapes, sha256 of the weights file, and whatever
lineage the caller adds). Loading checks the type, every shape and the checksum before a single
weight is copied, so a projector from another model fails with a message naming both shapes instead
of a size-mismatch traceback (or, worse, a silent partial load). `check_projector_shapes` runs the
same check from `model_dims()` output alone, before any model is built.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlmablate.errors import ConfigError

PROJECTOR_WEIGHTS = "mm_projector.safetensors"
PROJECTOR_META = "projector.json"
PROJECTOR_MODULE = "multi_modal_projector"
_RESERVED_META = ("projector_type", "shapes", "sha256")


def projector_module(model: torch.nn.Module) -> torch.nn.Module:
    """The projector inside a Llava model, also when PEFT (or DDP) wraps the model or the projector."""
    found = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == PROJECTOR_MODULE]
    if len(found) != 1:
        raise ConfigError(
            f"expected one module named {PROJECTOR_MODULE!r} in {type(model).__name__}, found {len(found)}"
        )
    module = found[0]
    # PEFT `modules_to_save` wraps the projector: the active adapter's copy is the trained one.
    if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
        adapters = [] if module.disable_adapters else module.active_adapters
        module = module.modules_to_save[adapters[0]] if adapters else module.original_module
    return module


def projector_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The projector's tensors, named relative to the projector, cloned to CPU and contiguous."""
    module = projector_module(model)
    with _gathered(module, modify=False):
        state = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in module.state_dict().items()}
    bad = [name for name, t in state.items() if "lora_" in name or "base_layer" in name or not t.is_floating_point()]
    if bad:
        # LoRA on the projector or a bitsandbytes-quantized projector (a skip list that missed it)
        # would save tensors no plain projector can load.
        raise ConfigError(
            f"the projector holds LoRA or quantized tensors ({', '.join(bad[:4])}); train it in full precision "
            "without LoRA and keep 'model.multi_modal_projector' in the quantization skip list"
        )
    return state


def save_projector(model: torch.nn.Module, folder: str | os.PathLike, *, projector_type: str,
                   extra: dict | None = None) -> dict:
    """Write the projector's weights and metadata into `folder` (each file atomically); return the metadata."""
    return write_projector(projector_state_dict(model), folder, projector_type=projector_type, extra=extra)


def projector_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The projector's tensors out of a whole model's state dict (an engine's gathered one), named
    relative to the projector as `projector_state_dict` names them."""
    marker = PROJECTOR_MODULE + "."
    return {k.split(marker, 1)[1]: t.detach().to("cpu", copy=True).contiguous()
            for k, t in state_dict.items() if marker in k}


def write_projector(state: dict[str, torch.Tensor], folder: str | os.PathLike, *, projector_type: str,
                    extra: dict | None = None) -> dict:
    """Write projector tensors (relative names) and their metadata into `folder`, each file atomically."""
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED_META))
    if clash:
        raise ValueError(f"extra metadata may not set {clash}")
    if not state:
        raise ConfigError(f"no projector tensors to write into {folder}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / PROJECTOR_WEIGHTS
    _atomic(weights, lambda tmp: save_file(state, str(tmp), metadata={"projector_type": projector_type}))
    meta = {
        "projector_type": projector_type,
        "shapes": {name: list(t.shape) for name, t in sorted(state.items())},
        "sha256": _sha256(weights),
        **extra,
    }
    # The metadata goes last: a folder with projector.json is complete.
    _atomic(folder / PROJECTOR_META, lambda tmp: tmp.write_text(json.dumps(meta, indent=2, default=str)))
    return meta


def read_projector_meta(folder: str | os.PathLike) -> dict:
    """The folder's projector.json; ConfigError when the folder is not a saved projector."""
    path = Path(folder) / PROJECTOR_META
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"not a projector folder: {folder} ({PROJECTOR_META} is missing or unreadable: {err})"
        ) from err
    missing = [key for key in _RESERVED_META if key not in meta] if isinstance(meta, dict) else list(_RESERVED_META)
    if missing:
        raise ConfigError(f"not a projector folder: {folder} ({PROJECTOR_META} lacks {missing})")
    return meta


def load_projector(model: torch.nn.Module, folder: str | os.PathLike, *, projector_type: str) -> dict:
    """Copy a saved projector into `model` after checking type, shapes and checksum; return its metadata."""
    meta = read_projector_meta(folder)
    _check_type(meta, folder, projector_type)
    module = projector_module(model)
    with _gathered(module, modify=False):
        expected = {name: list(t.shape) for name, t in module.state_dict().items()}
    _check_shapes(folder, meta["shapes"], expected, exact=True)
    weights = Path(folder) / PROJECTOR_WEIGHTS
    digest = _sha256(weights)
    if digest != meta["sha256"]:
        raise ConfigError(
            f"{weights} does not match its checksum in {PROJECTOR_META} (sha256 {digest[:12]}..., recorded "
            f"{meta['sha256'][:12]}...): the file was changed or is corrupt"
        )
    state = load_file(str(weights))
    with _gathered(module, modify=True), torch.no_grad():
        # load_state_dict copies in place, casting to each parameter's dtype and device.
        module.load_state_dict(state, strict=True)
    return meta


def check_projector_shapes(folder: str | os.PathLike, dims: dict, projector_type: str) -> None:
    """The load-time type and shape check, from `model_dims()` output alone (no model, no weights)."""
    meta = read_projector_meta(folder)
    _check_type(meta, folder, projector_type)
    text, proj_in = dims["text_hidden"], dims["projector_in"]
    expected = {"linear_1.weight": [text, proj_in], "linear_1.bias": [text],
                "linear_2.weight": [text, text], "linear_2.bias": [text]}
    # Whether the projector has biases is a config flag dims do not carry, so only the weights must exist.
    _check_shapes(folder, meta["shapes"], expected, exact=False)


# --- helpers ----------------------------------------------------------------------------------------


def _check_type(meta: dict, folder, projector_type: str) -> None:
    if meta["projector_type"] != projector_type:
        raise ConfigError(
            f"{folder} holds a {meta['projector_type']} projector but this run builds a {projector_type} one; "
            f"set projector={meta['projector_type']} or train a new projector"
        )


def _check_shapes(folder, found: dict, expected: dict, *, exact: bool) -> None:
    """Every tensor in the folder has the shape the model expects (and, if `exact`, the same names)."""
    required = set(expected) if exact else {"linear_1.weight", "linear_2.weight"}
    for name in sorted(set(found) | required):
        if name not in found or name not in expected:
            where = "the folder" if name not in found else "the model"
            raise ConfigError(f"projector in {folder} does not fit this model: {name} is missing from {where}")
    for name in sorted(found):
        if list(found[name]) != list(expected[name]):
            raise ConfigError(
                f"projector in {folder} does not fit this model: {name} has shape {list(found[name])} there but the "
                f"model expects {list(expected[name])}. It was trained for a model with "
                f"{_describe(found)}; this model has {_describe(expected)}."
            )


def _describe(shapes: dict) -> str:
    text_hidden, vision_in = shapes["linear_1.weight"]
    # linear_1's input is the vision hidden size times the number of vision feature layers.
    return f"vision hidden {vision_in} / text hidden {text_hidden}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic(path: Path, write) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written file at `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _gathered(module: torch.nn.Module, *, modify: bool):
    """Gather DeepSpeed ZeRO-3 shards (parameters of shape [0] otherwise); a no-op without ZeRO-3.

    Parameters an enclosing GatheredParameters already holds (the trainer's ZeRO-3 save gathers every
    trainable one) are left to it: DeepSpeed refuses nested contexts over the same parameters.
    """
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # only reached when ZeRO-3 partitioned the parameters, so DeepSpeed is installed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if not params:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)
