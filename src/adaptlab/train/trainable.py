"""Which parameters train: named sets of fnmatch patterns over parameter names, declared in the config.

The classification head always trains in finetuning (it is new). Freezing is ``requires_grad = False``; the
optimizer then only ever sees the trainable tensors (see optim.build_optimizer). Imports no timm: a job whose
models are not timm's (a continual MLP pack) does not pay its import (``adaptlab.jobstart``).
"""
from __future__ import annotations

from fnmatch import fnmatchcase

import torch


def is_head(name: str) -> bool:
    """The classifier head's parameters (timm's ``head`` module): new in every finetuning run."""
    return name == "head" or name.startswith("head.")


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def select_trainable(model: torch.nn.Module, patterns: list[str] | tuple[str, ...], head: bool = True) -> list[str]:
    """Set ``requires_grad`` from ``patterns`` (plus the head); return the names that train."""
    names = []
    for name, p in model.named_parameters():
        train = (head and is_head(name)) or any(fnmatchcase(name, pat) for pat in patterns)
        p.requires_grad_(train)
        if train:
            names.append(name)
    unmatched = [pat for pat in patterns if not any(fnmatchcase(n, pat) for n, _ in model.named_parameters())]
    if unmatched:
        raise ValueError(f"trainable pattern(s) {unmatched} match no parameter of the model")
    return names
