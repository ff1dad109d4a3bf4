"""Optimizers and the learning-rate schedule of the shared training loop.

Optimizers are a name → factory registry, so a study adds its own with one entry. Only the parameters that
train are handed to the optimizer: frozen ones never enter it, so neither weight decay nor momentum can move
them. A factory registered with ``named=True`` (AdamO, which selects its regularised matrices by name)
receives ``(name, parameter)`` pairs; ``build_optimizer`` accepts either plain parameters or such pairs.

Adam, AdamW and AdamO's Adam part use torch's fused kernel (one call for the whole update) when every parameter
is a floating CUDA tensor: the fastest AdamW on a GPU. On the CPU they keep torch's default per-tensor loop, and
so their results bit for bit, unless the run sets ``train.fused_adam`` (a speed switch for tiny models, whose
step is mostly per-tensor overhead: 0.82 → 0.63 ms for the continual MLP; results change at rounding level).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

OPTIMIZERS: dict[str, Callable[[list, dict], torch.optim.Optimizer]] = {}
NAMED_OPTIMIZERS: set[str] = set()  # factories that take (name, parameter) pairs


def register_optimizer(name: str, named: bool = False):
    def deco(fn):
        OPTIMIZERS[name] = fn
        if named:
            NAMED_OPTIMIZERS.add(name)
        return fn
    return deco


def _fused(params, cfg: dict) -> dict:
    """``{"fused": True}`` when every parameter (plain or in param groups) is a floating-point tensor on one device
    and that device is CUDA, or ``cfg["fused_adam"]`` asks for the fused kernel on the CPU too; else {}."""
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    if not tensors or not all(t.is_floating_point() for t in tensors) or len({t.device for t in tensors}) > 1:
        return {}
    if tensors[0].is_cuda or (cfg.get("fused_adam") and tensors[0].device.type == "cpu"):
        return {"fused": True}
    return {}


@register_optimizer("sgd")
def _sgd(params, cfg):
    return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"],
                           weight_decay=cfg["weight_decay"])


@register_optimizer("adamw")
def _adamw(params, cfg):
    return torch.optim.AdamW(params, lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"],
                             weight_decay=cfg["weight_decay"], **_fused(params, cfg))


@register_optimizer("adam")
def _adam(params, cfg):
    # weight_decay here is the coupled L2 penalty (it goes through the moments), unlike AdamW's
    return torch.optim.Adam(params, lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"],
                            weight_decay=cfg["weight_decay"], **_fused(params, cfg))


@register_optimizer("adamo", named=True)
def _adamo(named_params, cfg):
    from adaptlab.train.adamo import AdamO, isometry_param_groups

    groups = isometry_param_groups(named_params, cfg["isometry_lambda"], cfg["isometry_patterns"],
                                   cfg["isometry_exclude"])
    return AdamO(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"],
                 isometry_scale=cfg["isometry_scale"], isometry_lr_scale=cfg["isometry_lr_scale"], **_fused(groups, cfg))


def build_optimizer(params: Iterable, cfg: dict) -> torch.optim.Optimizer:
    """The optimizer ``cfg["optimizer"]`` over ``params``: parameters or (name, parameter) pairs."""
    items = list(params)
    named = bool(items) and isinstance(items[0], tuple)
    items = [it for it in items if (it[1] if named else it).requires_grad]
    if not items:
        raise ValueError("no trainable parameters: the trainable set selects nothing")
    name = cfg["optimizer"]
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown {name!r} (registered: {sorted(OPTIMIZERS)})")
    if name in NAMED_OPTIMIZERS:
        if not named:
            raise ValueError(f"optimizer {name!r} selects parameters by name: pass model.named_parameters()")
        return OPTIMIZERS[name](items, cfg)
    return OPTIMIZERS[name]([it[1] for it in items] if named else items, cfg)


def warmup_steps(cfg: dict) -> int:
    w = cfg["warmup_steps"]
    return int(round(w * cfg["steps"])) if w < 1 else int(w)


def lr_factor(step: int, cfg: dict) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr_factor."""
    total, warm, floor = cfg["steps"], warmup_steps(cfg), cfg["min_lr_factor"]
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
