"""The arms of the PEFT grid: which parameters train, and the trainable-only checkpoints.

``apply_method(model, arm, kind)`` freezes/adapts a task model in place and returns the module to train:

- ``full``: everything trains.
- ``linear``: only the task heads (classification ``head``; segmentation ``head.class_embed``/``head.mask_embed``).
- ``partial`` ("traditional" finetuning in the paper): task heads + the whole dense head + the last
  ``last_blocks`` ViT blocks and the final norm; patch embedding and earlier blocks stay frozen.
- ``adapter``: bottleneck adapters after every attention sublayer (``adaptlab.peft.adapters``) + task heads.
- ``lora``: peft LoRA on the named targets (``adaptlab.peft.lora``) + task heads.

In every PEFT arm the task heads train (the paper's whitelist). Trainable % counts the added parameters in the
total (peft's ``print_trainable_parameters`` convention). LayerNorm statistics are parameters, not running
buffers, so a frozen LayerNorm stays exactly frozen.
"""
from __future__ import annotations

import json
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adaptlab.peft.adapters import AdapterConfig, inject_adapters
from adaptlab.peft.lora import LoraSpec, inject_lora

METHODS = ("full", "linear", "partial", "adapter", "lora")

# per task kind: the task heads (always train), the dense head (trains in partial), the backbone's prefix
TASK_PARTS = {
    "classification": {"heads": ["head.*"], "dense": [], "backbone": ""},
    "segmentation": {"heads": ["head.class_embed.*", "head.mask_embed.*"], "dense": ["head.*"], "backbone": "backbone."},
}


def adapter_config(arm: dict) -> AdapterConfig:
    return AdapterConfig(n_adapters=arm["n_adapters"], reduction=arm["reduction"], init=arm.get("init", "zero"))


def lora_spec(arm: dict) -> LoraSpec:
    return LoraSpec(targets=arm["targets"], r=arm["rank"], alpha=arm["alpha"], dropout=arm.get("dropout", 0.0))


def _set_trainable(model: nn.Module, patterns: list[str], only: bool) -> None:
    """Enable the parameters matching ``patterns``; with ``only``, disable every other one."""
    for name, p in model.named_parameters():
        hit = any(fnmatchcase(name, pat) for pat in patterns)
        if hit:
            p.requires_grad_(True)
        elif only:
            p.requires_grad_(False)


def _depth(model: nn.Module, prefix: str) -> int:
    return len(model.get_submodule(prefix + "blocks"))


def apply_method(model: nn.Module, arm: dict, kind: str, extra_trainable: list[str] | None = None) -> nn.Module:
    """Adapt ``model`` in place for ``arm``; return the module to train (a peft ``LoraModel`` for LoRA)."""
    method = arm["method"]
    parts = TASK_PARTS[kind]
    heads = parts["heads"] + list(extra_trainable or [])
    if method == "full":
        _set_trainable(model, ["*"], only=True)
        return model
    if method == "linear":
        _set_trainable(model, heads, only=True)
        return model
    if method == "partial":
        k, depth = arm["last_blocks"], _depth(model, parts["backbone"])
        if not 0 <= k <= depth:
            raise ValueError(f"partial: last_blocks {k} outside [0, {depth}]")
        pre = parts["backbone"]
        blocks = [f"{pre}blocks.{i}.*" for i in range(depth - k, depth)] + ([f"{pre}norm.*"] if k else [])
        _set_trainable(model, heads + parts["dense"] + blocks, only=True)
        return model
    if method == "adapter":
        inject_adapters(model, adapter_config(arm))
        _set_trainable(model, heads, only=False)
        return model
    if method == "lora":
        wrapped = inject_lora(model, lora_spec(arm))
        _set_trainable(model, heads, only=False)  # names of the inner model: heads are not LoRA targets
        return wrapped
    raise ValueError(f"method: unknown {method!r} (known: {METHODS})")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, path: str | Path, arm: dict) -> int:
    """Write only the trainable tensors (adapters / LoRA matrices + task heads); return their element count."""
    state = trainable_state(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"arm": json.dumps(arm, sort_keys=True)})
    return sum(t.numel() for t in state.values())


def load_trainable(model: nn.Module, path: str | Path) -> None:
    """Load a trainable-only checkpoint into a model adapted with the same arm; every key must fit."""
    state = load_file(str(path))
    missing_trainable = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    _, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing_trainable:
        raise ValueError(f"{path}: checkpoint does not fit the adapted model (unexpected {unexpected[:5]}, "
                         f"missing trainable {missing_trainable[:5]})")
