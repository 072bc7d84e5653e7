"""Training FLOPs of one sample under a freeze plan, per component (vision tower, projector, LLM).

What is counted: every weight matmul — linear layers, LoRA's A and B, lm_head, and the patch embedding's
convolution (a linear over non-overlapping patches) — and attention's two matmuls (QK^T and AV) at the
real sequence length. Not counted: elementwise work (norms, activations, softmax, the loss), embedding
lookups (the input embedding tables, CLIP's position embeddings), and the rotary embedding's product of
positions and frequencies.

A matmul of a (tokens x in) input with an (in x out) weight costs 2·tokens·in·out forward. Backward it
costs the same again for the input's gradient when the input requires grad — something trainable lies
upstream of it in data-flow order (vision tower -> projector -> LLM layers -> lm_head; inside a block,
norm -> q/k/v -> attention -> output projection -> norm -> MLP) — and the same again for the weight's
gradient when the weight trains. LoRA's B always passes a gradient back to its A. Attention's matmuls
cost 2·2·seq²·(heads·head_dim) per layer forward, and backward one such matmul for each of dQ, dK, dP and
dV that autograd needs. This is exactly what autograd runs with eager attention, so
`torch.utils.flop_counter.FlopCounterMode` agrees with the count to the FLOP (tests/test_flops.py).

Hence the property that matters for the freeze grid: a frozen tower under a trainable projector costs
nothing backward; a frozen LLM under a trainable projector costs the activation gradients (the gradient
must reach the projector through it) but no weight gradients.

Two entry points share one count: `training_flops(model, seq_len=...)` reads shapes and `requires_grad`
from a Llava / LlavaNext model after `apply_plan` (the meta device will do), and
`flops_from_config(config, plan, seq_len=...)` derives both from the config and the plan alone.

Not modelled: gradient checkpointing (it recomputes the forward of checkpointed layers, and the input-grad
hook apply_plan installs with it makes the LLM's layers below the first LoRA layer compute activation
gradients too); causal masking (attention is counted at the full seq², as FlopCounterMode and the usual
6N rule do); sliding-window attention; fused attention kernels computing dQ, dK and dV together (they
differ from the count only where some but not all of q, k, v require grad — LoRA on some of them in the
first trainable layer with nothing trainable below).
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass, fields
from typing import Optional, Sequence

from torch import nn

from vlmablate.model.load import VISION_TOWERS
from vlmablate.model.plan import COMPONENTS, FreezePlan, unwrap, used_vision_layers

# Language models whose blocks are Llama-shaped: q, k, v, o; a gated MLP (gate, up, down); two norms.
GATED_LLMS = ("llama", "mistral", "qwen2")
# ... and whose blocks run attention and the MLP in parallel on one norm's output (fc1, fc2, dense).
PARALLEL_LLMS = ("phi",)


@dataclass(frozen=True)
class ComponentFlops:
    """FLOPs of one component for one sample (or per token, after `scaled`)."""

    forward: float = 0  # weight matmuls, LoRA included
    attention: float = 0  # QK^T and AV, forward
    backward_activations: float = 0  # input gradients of the weight matmuls
    backward_attention: float = 0  # gradients through QK^T and AV
    backward_weights: float = 0  # weight gradients: trainable weights and LoRA A / B

    def __add__(self, other: ComponentFlops) -> ComponentFlops:
        return ComponentFlops(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def scaled(self, factor: float) -> ComponentFlops:
        return ComponentFlops(*(a * factor for a in astuple(self)))

    @property
    def forward_total(self) -> float:
        return self.forward + self.attention

    @property
    def backward_total(self) -> float:
        return self.backward_activations + self.backward_attention + self.backward_weights

    @property
    def total(self) -> float:
        return self.forward_total + self.backward_total


@dataclass(frozen=True)
class FlopsBreakdown:
    """Training FLOPs (one forward and one backward) of one sample: `seq_len` LLM tokens, `crops` images."""

    vision: ComponentFlops
    projector: ComponentFlops
    llm: ComponentFlops
    seq_len: int
    crops: int

    def component(self, name: str) -> ComponentFlops:
        return getattr(self, name)

    @property
    def total(self) -> ComponentFlops:
        return self.vision + self.projector + self.llm

    def per_token(self, tokens: Optional[int] = None) -> dict[str, ComponentFlops]:
        """Each component's FLOPs (and "total") divided by `tokens`: the sequence length unless given
        (pass the supervised token count for FLOPs per token the loss trains on)."""
        scale = 1 / (tokens or self.seq_len)
        return {**{c: self.component(c).scaled(scale) for c in COMPONENTS}, "total": self.total.scaled(scale)}


# --- the shapes the count needs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Matmul:
    """One weight matmul: a linear layer, or the patch convolution as the linear it is."""

    fan_in: int
    fan_out: int
    trainable: bool = False  # the weight itself trains
    lora_r: int = 0  # LoRA rank on it (summed over adapters); 0: none


@dataclass(frozen=True)
class Block:
    """A pre-norm transformer block: norm -> q, k, v -> attention -> out, then norm -> MLP in -> MLP out."""

    qkv: tuple[Matmul, Matmul, Matmul]
    attn_out: Matmul
    mlp_in: tuple[Matmul, ...]  # (gate, up) or (fc1,)
    mlp_out: Matmul
    norms_trainable: tuple[bool, ...]  # (before attention, before MLP); a parallel block has one norm
    parallel: bool = False  # Phi: attention and MLP both read the one norm's output


@dataclass(frozen=True)
class ModelShapes:
    """Every matmul of a Llava step in data-flow order, with what trains; vision blocks are those used."""

    patch: Matmul
    vision_embeddings_trainable: bool  # class / position embeddings, patch bias, pre-layernorm
    vision_blocks: tuple[Block, ...]
    patches: int  # per crop
    prefix_tokens: int  # tokens the tower prepends (CLIP's CLS)
    feature_tokens: int  # tokens per crop the projector reads
    projector: tuple[Matmul, ...]
    connector_trainable: bool  # LlavaNext's image_newline
    llm_embeddings_trainable: bool
    llm_blocks: tuple[Block, ...]
    final_norm_trainable: bool
    lm_head: Matmul


# --- the count --------------------------------------------------------------------------------------------


def _matmul(m: Matmul, tokens: int, grad_in: bool) -> tuple[ComponentFlops, bool]:
    """A weight matmul over `tokens` rows whose input requires grad iff `grad_in`; and whether its output does."""
    w, a, b = m.fan_in * m.fan_out, m.lora_r * m.fan_in, m.lora_r * m.fan_out  # base, LoRA A, LoRA B
    flops = ComponentFlops(
        forward=2 * tokens * (w + a + b),
        # B's input is A's output, which requires grad because A trains
        backward_activations=2 * tokens * ((w + a if grad_in else 0) + b),
        backward_weights=2 * tokens * ((w if m.trainable else 0) + a + b),
    )
    return flops, grad_in or m.trainable or m.lora_r > 0


def _attention(seq: int, dim: int, grad_q: bool, grad_k: bool, grad_v: bool) -> ComponentFlops:
    one = 2 * seq * seq * dim  # QK^T or AV over one sequence
    # matmul's backward computes an operand's gradient only where that operand requires grad: dQ, dK from
    # QK^T; dP (the probabilities, needing grad when Q or K does) and dV from AV
    grads = int(grad_q) + int(grad_k) + int(grad_q or grad_k) + int(grad_v)
    return ComponentFlops(attention=2 * one, backward_attention=grads * one)


def _block(block: Block, seq: int, grad_in: bool) -> tuple[ComponentFlops, bool]:
    """One self-attention block over a sequence of `seq` tokens."""
    grad_norm = grad_in or block.norms_trainable[0]
    qkv = [_matmul(m, seq, grad_norm) for m in block.qkv]
    (_, grad_q), (_, grad_k), (_, grad_v) = qkv
    attn = _attention(seq, block.qkv[0].fan_out, grad_q, grad_k, grad_v)
    out, grad_out = _matmul(block.attn_out, seq, grad_q or grad_k or grad_v)
    grad_mlp = grad_norm if block.parallel else grad_in or grad_out or block.norms_trainable[1]
    mlp_in = [_matmul(m, seq, grad_mlp) for m in block.mlp_in]
    mlp_out, grad_down = _matmul(block.mlp_out, seq, any(g for _, g in mlp_in))
    flops = sum((f for f, _ in (*qkv, *mlp_in)), attn + out + mlp_out)
    return flops, grad_in or grad_out or grad_down


def _chain(items: Sequence[Matmul | Block], seq: int, grad_in: bool) -> tuple[ComponentFlops, bool]:
    """Matmuls and blocks one after the other, each reading the previous one's output."""
    flops = ComponentFlops()
    for item in items:
        step = _block if isinstance(item, Block) else _matmul
        f, grad_in = step(item, seq, grad_in)
        flops += f
    return flops, grad_in


def count_flops(shapes: ModelShapes, *, seq_len: int, crops: int = 1) -> FlopsBreakdown:
    """Training FLOPs of one sample: `seq_len` LLM tokens (image tokens included) and `crops` images through
    the tower (LlavaNext's anyres: the base image plus its tiles; 0 for a text-only sample)."""
    if seq_len < 1 or crops < 0:
        raise ValueError(f"seq_len must be positive and crops not negative; got seq_len={seq_len}, crops={crops}")
    tower_tokens = shapes.patches + shapes.prefix_tokens
    patch, grad = _matmul(shapes.patch, shapes.patches, False)  # the pixels need no gradient
    blocks, grad = _chain(shapes.vision_blocks, tower_tokens, grad or shapes.vision_embeddings_trainable)
    projector, grad = _chain(shapes.projector, shapes.feature_tokens, grad)
    image_grad = crops > 0 and (grad or shapes.connector_trainable)
    llm, grad = _chain(shapes.llm_blocks, seq_len, image_grad or shapes.llm_embeddings_trainable)
    head, _ = _matmul(shapes.lm_head, seq_len, grad or shapes.final_norm_trainable)
    return FlopsBreakdown(vision=(patch + blocks).scaled(crops), projector=projector.scaled(crops),
                          llm=llm + head, seq_len=seq_len, crops=crops)


# --- shapes from a model -----------------------------------------------------------------------------------


def _trains(module: Optional[nn.Module]) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def _first(module: nn.Module, names: tuple[str, ...]) -> Optional[nn.Module]:
    return next((getattr(module, n) for n in names if hasattr(module, n)), None)


def _linear(module: nn.Module) -> Matmul:
    base = getattr(module, "base_layer", module)  # a PEFT LoRA layer wraps the original linear
    rank = sum(a.out_features for a in getattr(module, "lora_A", {}).values())
    return Matmul(base.in_features, base.out_features, base.weight.requires_grad, rank)


def _block_of(layer: nn.Module) -> Block:
    attn, mlp = layer.self_attn, layer.mlp
    gated = hasattr(mlp, "gate_proj")
    norm2 = _first(layer, ("post_attention_layernorm", "layer_norm2"))
    return Block(
        qkv=(_linear(attn.q_proj), _linear(attn.k_proj), _linear(attn.v_proj)),
        attn_out=_linear(_first(attn, ("o_proj", "out_proj", "dense"))),
        mlp_in=(_linear(mlp.gate_proj), _linear(mlp.up_proj)) if gated else (_linear(mlp.fc1),),
        mlp_out=_linear(mlp.down_proj if gated else mlp.fc2),
        norms_trainable=(_trains(_first(layer, ("input_layernorm", "layer_norm1"))),)
        + (() if norm2 is None else (_trains(norm2),)),
        parallel=norm2 is None,
    )


def shapes_from_model(model: nn.Module) -> ModelShapes:
    """The matmuls of a (PEFT-wrapped) Llava / LlavaNext model, trainability read from `requires_grad`."""
    base = unwrap(model)
    tower = base.model.vision_tower
    tower = getattr(tower, "vision_model", tower)  # older transformers nest the transformer one level down
    embeddings = tower.embeddings
    conv = embeddings.patch_embedding
    prefix = embeddings.num_positions - embeddings.num_patches
    strategy = base.config.vision_feature_select_strategy
    projector = base.model.multi_modal_projector
    newline = getattr(base.model, "image_newline", None)
    lm = base.model.language_model
    return ModelShapes(
        patch=Matmul(conv.in_channels * math.prod(conv.kernel_size), conv.out_channels, conv.weight.requires_grad),
        vision_embeddings_trainable=any(p.requires_grad for n, p in embeddings.named_parameters()
                                        if n != "patch_embedding.weight") or _trains(_first(tower, ("pre_layrnorm",))),
        vision_blocks=tuple(_block_of(layer) for layer in tower.encoder.layers[: used_vision_layers(model)]),
        patches=embeddings.num_patches,
        prefix_tokens=prefix,
        feature_tokens=embeddings.num_patches + prefix - (1 if strategy == "default" else 0),
        projector=(_linear(projector.linear_1), _linear(projector.linear_2)),
        connector_trainable=newline is not None and newline.requires_grad,
        llm_embeddings_trainable=_trains(lm.embed_tokens),
        llm_blocks=tuple(_block_of(layer) for layer in lm.layers),
        final_norm_trainable=_trains(_first(lm, ("norm", "final_layernorm"))),
        lm_head=_linear(base.lm_head),
    )


def training_flops(model: nn.Module, *, seq_len: int, crops: int = 1) -> FlopsBreakdown:
    """Training FLOPs of one sample on `model` as `apply_plan` left it (what trains is read from it)."""
    return count_flops(shapes_from_model(model), seq_len=seq_len, crops=crops)


# --- shapes from a config and a plan --------------------------------------------------------------------------


def _used_vision_layers(config) -> int:
    """As `plan.used_vision_layers`, from the config alone."""
    n_layers = config.vision_config.num_hidden_layers
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    return max(h if h >= 0 else n_layers + 1 + h for h in layers)


def _lora_targets(lora, leaves: tuple[str, ...]) -> set[str]:
    return set(leaves) if lora.targets == "all-linear" else set(lora.targets)


def _config_block(shape: dict[str, tuple[int, int]], names: tuple[tuple[str, ...], ...], *, trains: bool,
                  lora_r: int, targets: set[str], parallel: bool) -> Block:
    """A block from leaf name -> (in, out); `names` lists (q, k, v), (out,), MLP in, (MLP out,)."""

    def linear(name: str) -> Matmul:
        return Matmul(*shape[name], trainable=trains, lora_r=lora_r if name in targets else 0)

    qkv, (out,), mlp_in, (mlp_out,) = names
    return Block(qkv=tuple(map(linear, qkv)), attn_out=linear(out), mlp_in=tuple(map(linear, mlp_in)),
                 mlp_out=linear(mlp_out), norms_trainable=(trains,) * (1 if parallel else 2), parallel=parallel)


def _vision_blocks(config, plan: FreezePlan) -> tuple[Block, ...]:
    v, policy = config.vision_config, plan.vision
    h, i = v.hidden_size, v.intermediate_size
    shape = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "out_proj": (h, h), "fc1": (h, i), "fc2": (i, h)}
    names = (("q_proj", "k_proj", "v_proj"), ("out_proj",), ("fc1",), ("fc2",))
    used = _used_vision_layers(config)
    lora_r = policy.lora.r if policy.mode == "lora" else 0
    targets = _lora_targets(policy.lora, tuple(shape)) if lora_r else set()
    first_trained = {"full": 0, "last_n": used - policy.last_n}.get(policy.mode, used)  # frozen, lora: none
    return tuple(_config_block(shape, names, trains=layer >= first_trained, lora_r=lora_r, targets=targets,
                               parallel=False) for layer in range(used))


def _llm_blocks(config, plan: FreezePlan) -> tuple[Block, ...]:
    t, policy = config.text_config, plan.llm
    if t.model_type not in GATED_LLMS + PARALLEL_LLMS:
        raise ValueError(f"no FLOPs model for a {t.model_type!r} LLM; known: {', '.join(GATED_LLMS + PARALLEL_LLMS)}")
    if policy.mode not in ("frozen", "lora", "full"):
        raise ValueError(f"LLM mode {policy.mode!r} is not frozen, lora or full")
    h, i, heads = t.hidden_size, t.intermediate_size, t.num_attention_heads
    head_dim = getattr(t, "head_dim", None) or h // heads
    q, kv = heads * head_dim, (getattr(t, "num_key_value_heads", None) or heads) * head_dim  # GQA: kv < q
    shape = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv)}
    parallel = t.model_type in PARALLEL_LLMS
    if parallel:
        shape |= {"dense": (q, h), "fc1": (h, i), "fc2": (i, h)}
        names = (("q_proj", "k_proj", "v_proj"), ("dense",), ("fc1",), ("fc2",))
    else:
        shape |= {"o_proj": (q, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        names = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
    lora_r = policy.lora.r if policy.mode == "lora" else 0
    targets = _lora_targets(policy.lora, tuple(shape)) if lora_r else set()
    return tuple(_config_block(shape, names, trains=policy.mode == "full", lora_r=lora_r, targets=targets,
                               parallel=parallel) for _ in range(t.num_hidden_layers))


def shapes_from_config(config, plan: FreezePlan) -> ModelShapes:
    """The matmuls a Llava / LlavaNext `config` builds, and what `apply_plan` would make trainable."""
    v, t = config.vision_config, config.text_config
    if v.model_type not in VISION_TOWERS:
        raise ValueError(f"no FLOPs model for a {v.model_type!r} vision tower; known: {', '.join(VISION_TOWERS)}")
    patches, prefix = (v.image_size // v.patch_size) ** 2, VISION_TOWERS[v.model_type]
    n_features = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
    vision_full, llm_full = plan.vision.mode == "full", plan.llm.mode == "full"
    projector = plan.projector.trainable
    return ModelShapes(
        patch=Matmul(getattr(v, "num_channels", 3) * v.patch_size**2, v.hidden_size, vision_full),
        vision_embeddings_trainable=vision_full,
        vision_blocks=_vision_blocks(config, plan),
        patches=patches,
        prefix_tokens=prefix,
        feature_tokens=patches + prefix - (1 if config.vision_feature_select_strategy == "default" else 0),
        # a `linear` projector's linear_2 is a fixed identity that never trains
        projector=(Matmul(v.hidden_size * n_features, t.hidden_size, projector),
                   Matmul(t.hidden_size, t.hidden_size, projector and plan.projector_type != "linear")),
        connector_trainable=projector and config.model_type == "llava_next",
        llm_embeddings_trainable=llm_full,
        llm_blocks=_llm_blocks(config, plan),
        final_norm_trainable=llm_full,
        lm_head=Matmul(t.hidden_size, t.vocab_size, llm_full),
    )


def flops_from_config(config, plan: FreezePlan, *, seq_len: int, crops: int = 1) -> FlopsBreakdown:
    """Training FLOPs of one sample from a LlavaConfig / LlavaNextConfig and the plan, without weights."""
    return count_flops(shapes_from_config(config, plan), seq_len=seq_len, crops=crops)


# --- reporting -------------------------------------------------------------------------------------------------


def _si(x: float) -> str:
    for value, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= value:
            return f"{x / value:.3g}{suffix}"
    return f"{x:.3g}"


def format_flops(breakdown: FlopsBreakdown, tokens: Optional[int] = None) -> str:
    """A per-component table of training FLOPs per token (see `FlopsBreakdown.per_token`)."""
    per_token = breakdown.per_token(tokens)
    columns = [f.name for f in fields(ComponentFlops)] + ["total"]
    header = f"{'per token':<10}" + "".join(f"{c.replace('backward_', 'bwd ').replace('_', ' '):>16}" for c in columns)
    lines = [header, "-" * len(header)]
    for name, row in per_token.items():
        values = [*astuple(row), row.total]
        lines.append(f"{name:<10}" + "".join(f"{_si(x):>16}" for x in values))
    return "\n".join(lines)
