"""Which parameters train: named sets of fnmatch patterns over parameter names, declared in the config.

The classification head always trains in finetuning (it is new). Freezing is ``requires_grad = False``; the
optimizer then only ever sees the trainable tensors (see optim.build_optimizer).
"""
from __future__ import annotations

from fnmatch import fnmatchcase

import torch

from adaptlab.models.vit import is_head


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
