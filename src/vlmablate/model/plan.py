"""The freeze policy resolved once into a plan, applied to a model, and accounted for.

Everything that other tools decide in different places — `requires_grad`, LoRA targets, the
quantization skip list, optimizer learning rates, what gets saved — is derived here from one
`FreezePlan`, so those settings cannot drift apart.
"""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from vlmablate.config import FreezeConfig, LoraConfig, ProjectorConfig, QuantConfig, StageConfig, VisionConfig

COMPONENTS = ("vision", "projector", "llm")
# Module paths of Llava / LlavaNext in transformers >= 5. The quantization skip list must use these
# full paths: bare names ("vision_tower") are silently ignored and the vision tower gets quantized.
COMPONENT_PREFIXES = {
    "vision": ("model.vision_tower",),
    # LlavaNext's learned `image_newline` separates image rows: it belongs to the connector.
    "projector": ("model.multi_modal_projector", "model.image_newline"),
    "llm": ("model.language_model", "lm_head"),
}
_PEFT_PREFIX = "base_model.model."
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")


@dataclass(frozen=True)
class ComponentPlan:
    """How one component trains: mode frozen | full | lora | last_n, its learning rate, quantization."""

    name: str
    mode: str
    lr: Optional[float]
    quantized: bool = False
    last_n: int = 0
    lora: Optional[LoraConfig] = None

    @property
    def trainable(self) -> bool:
        return self.mode != "frozen"


@dataclass(frozen=True)
class FreezePlan:
    vision: ComponentPlan
    projector: ComponentPlan
    llm: ComponentPlan
    quant: str
    projector_type: str

    def components(self) -> tuple[ComponentPlan, ComponentPlan, ComponentPlan]:
        return (self.vision, self.projector, self.llm)

    def component(self, name: str) -> ComponentPlan:
        return getattr(self, name)

    @property
    def uses_lora(self) -> bool:
        return any(c.mode == "lora" for c in self.components())

    @property
    def projector_only(self) -> bool:
        """LLaVA's stage 1: only the projector trains, so only the projector is saved."""
        return self.projector.trainable and not self.vision.trainable and not self.llm.trainable

    def skip_modules(self) -> list[str]:
        """Full module paths bitsandbytes must leave unquantized: everything but the LLM's body."""
        return [*COMPONENT_PREFIXES["vision"][:1], *COMPONENT_PREFIXES["projector"][:1], "lm_head"]

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_plan(
    vision: VisionConfig, projector: ProjectorConfig, freeze: FreezeConfig, quant: QuantConfig, stage: StageConfig,
    *, lr_scale: float = 1.0,
) -> FreezePlan:
    """Turn the four policy groups and the stage into one plan (learning rates fall back to the stage's).

    `lr_scale` multiplies every component's LR, keeping the recipe's ratios (projector vs LLM vs vision):
    the recipe's LRs are tuned for 7B models, and a tiny model learns nothing at them in a CPU budget.
    """

    def lr(trainable: bool, own: Optional[float]) -> Optional[float]:
        return (own if own is not None else stage.lr) * lr_scale if trainable else None

    vision_mode = {"frozen": "frozen", "unfrozen": "full", "lora": "lora", "last_n": "last_n"}[vision.policy]
    return FreezePlan(
        vision=ComponentPlan("vision", vision_mode, lr(vision_mode != "frozen", vision.lr),
                             last_n=vision.last_n, lora=vision.lora if vision_mode == "lora" else None),
        projector=ComponentPlan("projector", "full" if projector.trainable else "frozen",
                                lr(projector.trainable, projector.lr)),
        llm=ComponentPlan("llm", freeze.policy, lr(freeze.policy != "frozen", freeze.lr),
                          quantized=quant.mode != "none", lora=freeze.lora if freeze.policy == "lora" else None),
        quant=quant.mode,
        projector_type=projector.type,
    )


# --- names → components ----------------------------------------------------------------------------

def base_name(name: str) -> str:
    """A parameter or module name as in the unwrapped HF model (PEFT adds `base_model.model.`)."""
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def component_of(name: str) -> str:
    """The component a parameter belongs to; every Llava parameter belongs to exactly one."""
    name = base_name(name)
    for component, prefixes in COMPONENT_PREFIXES.items():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return component
    raise ValueError(f"parameter {name!r} belongs to no component (vision / projector / llm)")


def is_lora_param(name: str) -> bool:
    return any(marker in name for marker in _LORA_MARKERS)


# --- which vision blocks feed the projector ----------------------------------------------------------

def _vision_encoder_layers(model: nn.Module) -> int:
    return unwrap(model).config.vision_config.num_hidden_layers


def used_vision_layers(model: nn.Module) -> int:
    """How many encoder blocks produce the features the projector reads.

    Llava takes `hidden_states[vision_feature_layer]`; with the usual -2 the last block and the
    post-layernorm compute something nobody reads, so they get no gradient (and crash DDP with
    unused parameters). Such blocks stay frozen whatever the policy says, and are reported.
    """
    config = unwrap(model).config
    n_layers = _vision_encoder_layers(model)
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    # hidden_states has n_layers + 1 entries (embeddings first), so index h is the output of block h - 1.
    return max(h if h >= 0 else n_layers + 1 + h for h in layers)


def unused_vision_parameters(model: nn.Module) -> list[str]:
    """Base names of vision parameters that cannot receive a gradient with this feature layer."""
    n_used = used_vision_layers(model)
    unused = []
    for name, _ in model.named_parameters():
        name = base_name(name)
        if not name.startswith("model.vision_tower."):
            continue
        match = re.search(r"\.encoder\.layers\.(\d+)\.", name)
        if (match and int(match.group(1)) >= n_used) or ".post_layernorm." in name or ".head." in name:
            unused.append(name)
    return unused


# --- applying the plan --------------------------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    """The HF Llava model under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    # A model holds bitsandbytes layers only if bitsandbytes was imported to quantize it. Importing it for a
    # run that quantizes nothing would load its kernels (and, on some CPUs, look one up on the Hub) for nothing.
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:
        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    return tuple(types)


def lora_target_pattern(model: nn.Module, component: str, targets) -> str:
    """A regex that PEFT full-matches against module names, anchored to one component's path.

    Matching by suffix (`q_proj`) would also hit CLIP's q/k/v projections; anchoring the pattern to
    `model.language_model.` (or `model.vision_tower.`) is what keeps LoRA where the policy says. In the
    vision tower only the blocks that feed the projector get LoRA (the others would get no gradient).
    """
    prefix = COMPONENT_PREFIXES[component][0]
    linear_types = _linear_types()
    linears = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name.startswith(prefix + ".") and isinstance(module, linear_types)
    }
    if targets == "all-linear":
        leaves = sorted(linears)
    else:
        leaves = sorted(targets)
        missing = [leaf for leaf in leaves if leaf not in linears]
        if missing:
            raise ValueError(
                f"LoRA targets {missing} match no linear layer in {prefix}; its linear layers are {sorted(linears)}"
            )
    if not leaves:
        raise ValueError(f"no linear layers under {prefix} to put LoRA on")
    middle = r"\..*\."
    if component == "vision":
        n_used = used_vision_layers(model)
        middle = rf"\.(?:.*\.)?encoder\.layers\.(?:{'|'.join(map(str, range(n_used)))})\..*\."
    return rf"{re.escape(prefix)}{middle}(?:{'|'.join(map(re.escape, leaves))})"


@contextmanager
def peft_without_bitsandbytes():
    """PEFT offers its bitsandbytes LoRA layers by importing bitsandbytes whenever it is installed. Where
    bitsandbytes is not imported yet, the model holds none of its layers (nothing was quantized), and that import
    would only load kernels the run never calls (on CPUs with AVX-512 BF16 it also looks one up on the Hub and
    warns about its publisher); so while LoRA layers are made (added, or loaded from a saved adapter) PEFT is told
    bitsandbytes is absent."""
    from peft.tuners.lora import model as lora_model

    checks = () if "bitsandbytes" in sys.modules else ("is_bnb_available", "is_bnb_4bit_available")
    saved = {name: getattr(lora_model, name) for name in checks if hasattr(lora_model, name)}
    for name in saved:
        setattr(lora_model, name, lambda: False)
    try:
        yield
    finally:
        for name, check in saved.items():
            setattr(lora_model, name, check)


def _add_lora(model: nn.Module, plan: FreezePlan) -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lora_components = [c for c in plan.components() if c.mode == "lora"]
    patterns = {c.name: lora_target_pattern(model, c.name, c.lora.targets) for c in lora_components}
    main = lora_components[-1]  # the LLM's settings when it has LoRA; the vision ones otherwise
    rank_pattern = {patterns[c.name]: c.lora.r for c in lora_components if c.lora.r != main.lora.r}
    alpha_pattern = {patterns[c.name]: c.lora.alpha for c in lora_components if c.lora.alpha != main.lora.alpha}
    config = PeftLoraConfig(
        r=main.lora.r,
        lora_alpha=main.lora.alpha,
        lora_dropout=main.lora.dropout,
        target_modules="|".join(f"(?:{p})" for p in patterns.values()),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        bias="none",
    )
    with peft_without_bitsandbytes():
        return get_peft_model(model, config)


def _wants_grad(name: str, plan: FreezePlan, n_used_vision: int, unused: set[str]) -> bool:
    """Whether a base (non-LoRA) parameter trains under the plan."""
    component = component_of(name)
    policy = plan.component(component)
    name = base_name(name)
    if component == "vision":
        if name in unused or policy.mode in ("frozen", "lora"):
            return False
        if policy.mode == "last_n":
            match = re.search(r"\.encoder\.layers\.(\d+)\.", name)
            return bool(match) and n_used_vision - policy.last_n <= int(match.group(1)) < n_used_vision
        return True
    if component == "projector":
        # A `linear` projector is linear_1 alone; linear_2 is a fixed identity that never trains.
        fixed = plan.projector_type == "linear" and ".linear_2." in name
        return policy.trainable and not fixed
    return policy.mode == "full"


def apply_plan(model: nn.Module, plan: FreezePlan, *, gradient_checkpointing: bool = False,
               sharded: bool = False) -> nn.Module:
    """Set trainability as the plan says (PEFT-wrapping for LoRA); return the model to train.

    `sharded` (FSDP): the k-bit preparation's fp32 upcast is left out, since FSDP flattens a unit's
    weights together only when they share one dtype (FSDP-QLoRA keeps everything in bf16).
    """
    if plan.quant != "none" and not sharded:
        from peft import prepare_model_for_kbit_training

        # PEFT's k-bit preparation: freeze, upcast the non-quantized fp16/bf16 weights, enable input grads.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    n_used = used_vision_layers(model)
    if plan.vision.mode == "last_n" and plan.vision.last_n > n_used:
        raise ValueError(
            f"vision.last_n={plan.vision.last_n} but only {n_used} encoder blocks feed the projector"
        )
    unused = set(unused_vision_parameters(model))
    if plan.uses_lora:
        model = _add_lora(model, plan)
    for name, param in model.named_parameters():
        if is_lora_param(name):
            param.requires_grad_(True)  # PEFT only adds LoRA where the plan asked for it
        else:
            param.requires_grad_(_wants_grad(name, plan, n_used, unused))
    if gradient_checkpointing and (plan.quant == "none" or sharded) and plan.llm.mode != "full":
        # With frozen input embeddings, reentrant checkpointed blocks see inputs without grad and
        # drop the gradient of everything inside them; this hook makes the embeddings' output require it.
        unwrap(model).enable_input_require_grads()
    return model


# --- accounting -----------------------------------------------------------------------------------------

def logical_numel(param: torch.Tensor) -> int:
    """Element count of the weight a parameter stands for (4-bit parameters are packed two per byte; a
    DeepSpeed ZeRO-3 parameter is a shape-[0] placeholder for `ds_numel` elements)."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and hasattr(quant_state, "shape"):
        return int(torch.Size(quant_state.shape).numel())
    return int(getattr(param, "ds_numel", param.numel()))


def _is_quantized(param: torch.Tensor) -> bool:
    return type(param).__name__ in ("Params4bit", "Int8Params")


def parameter_table(model: nn.Module, plan: FreezePlan) -> dict:
    """Per-component counts: total (base weights), trainable, lora, quantized, unused, fixed.

    Every parameter is counted exactly once (an unknown one raises), and the totals are checked.
    """
    rows = {c: {"total": 0, "trainable": 0, "lora": 0, "quantized": 0, "unused": 0, "fixed": 0} for c in COMPONENTS}
    unused = set(unused_vision_parameters(model))
    seen: set[int] = set()
    for name, param in model.named_parameters():
        assert id(param) not in seen, f"parameter {name} appears twice"
        seen.add(id(param))
        row = rows[component_of(name)]
        n = logical_numel(param)
        if is_lora_param(name):
            row["lora"] += n
        else:
            row["total"] += n
            row["quantized"] += n if _is_quantized(param) else 0
            row["unused"] += n if base_name(name) in unused else 0
            if plan.projector_type == "linear" and ".multi_modal_projector.linear_2." in name:
                row["fixed"] += n
        row["trainable"] += n if param.requires_grad else 0
    everything = sum(logical_numel(p) for p in model.parameters())
    assert everything == sum(r["total"] + r["lora"] for r in rows.values()), "parameter accounting does not add up"
    return {
        "components": rows,
        "total": sum(r["total"] for r in rows.values()),
        "trainable": {**{c: rows[c]["trainable"] for c in COMPONENTS},
                      "total": sum(r["trainable"] for r in rows.values())},
    }


def format_table(table: dict, plan: FreezePlan) -> str:
    """The per-component table logged at start ([TRAINABLE] / [Frozen] per component)."""
    header = f"{'component':<10} {'state':<11} {'mode':<7} {'lr':>9} {'total':>14} {'trainable':>13} " \
             f"{'lora':>11} {'quantized':>14} {'unused':>10}"
    lines = [header, "-" * len(header)]
    for c in plan.components():
        row = table["components"][c.name]
        state = "[TRAINABLE]" if row["trainable"] else "[Frozen]"
        lr = f"{c.lr:.1e}" if c.lr is not None else "-"
        lines.append(f"{c.name:<10} {state:<11} {c.mode:<7} {lr:>9} {row['total']:>14,} {row['trainable']:>13,} "
                     f"{row['lora']:>11,} {row['quantized']:>14,} {row['unused']:>10,}")
    total, trainable = table["total"], table["trainable"]["total"]
    lines.append(f"{'all':<10} {'':<11} {'':<7} {'':>9} {total:>14,} {trainable:>13,}  "
                 f"({100 * trainable / max(total, 1):.2f}% trainable)")
    return "\n".join(lines)
