"""Optimizer parameter groups: one learning rate per component, no weight decay on biases and norms.

LLaVA's trainer builds four groups when `mm_projector_lr` is set (LLM and projector, each with and
without weight decay); LLaVA-OneVision adds a vision-tower LR. Here every component gets its own
pair of groups with the plan's learning rate, and only trainable parameters are handed over.
"""

from __future__ import annotations

from torch import nn

from vlmablate.model.plan import COMPONENTS, FreezePlan, component_of


def parameter_groups(model: nn.Module, plan: FreezePlan, *, decay_names: set[str], weight_decay: float) -> list[dict]:
    """Groups named `<component>/decay` and `<component>/no_decay`, each with its component's LR.

    Every trainable parameter lands in exactly one group (asserted); frozen ones in none.
    """
    buckets: dict[tuple[str, bool], list] = {(c, d): [] for c in COMPONENTS for d in (True, False)}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets[(component_of(name), name in decay_names)].append(param)
    groups = []
    for (component, decay), params in buckets.items():
        if not params:
            continue
        lr = plan.component(component).lr
        assert lr is not None, f"{component} has trainable parameters but no learning rate in the plan"
        groups.append({
            "name": f"{component}/{'decay' if decay else 'no_decay'}",
            "params": params,
            "lr": lr,
            "weight_decay": weight_decay if decay else 0.0,
        })
    n_grouped = sum(len(g["params"]) for g in groups)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert n_grouped == n_trainable == len({id(p) for g in groups for p in g["params"]}), \
        "every trainable parameter must be in exactly one optimizer group"
    return groups
