"""Optimizers and the learning-rate schedule of the shared training loop.

Optimizers are a name → factory registry, so a study adds its own (e.g. AdamO) with one entry. Only the
parameters that train are handed to the optimizer: frozen ones never enter it, so neither weight decay nor
momentum can move them.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter], dict], torch.optim.Optimizer]] = {}


def register_optimizer(name: str):
    def deco(fn):
        OPTIMIZERS[name] = fn
        return fn
    return deco


@register_optimizer("sgd")
def _sgd(params, cfg):
    return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"],
                           weight_decay=cfg["weight_decay"])


@register_optimizer("adamw")
def _adamw(params, cfg):
    return torch.optim.AdamW(params, lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"],
                             weight_decay=cfg["weight_decay"])


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: dict) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: the trainable set selects nothing")
    name = cfg["optimizer"]
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown {name!r} (registered: {sorted(OPTIMIZERS)})")
    return OPTIMIZERS[name](params, cfg)


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
