"""The arms of the PEFT grid: which parameters train, and the trainable-only checkpoints.

A registry (``METHODS``), as peft and timm do: one ``Method`` entry per method name holds how a config arm
expands into grid points, how it adapts a model, the analytic count of what it adds, which tasks it fits and
its plot colour. ``apply_method(model, arm, kind)`` freezes/adapts a task model in place and returns the
module to train:

- ``full``: everything trains.
- ``linear``: only the task heads (classification ``head``; segmentation ``head.class_embed``/``head.mask_embed``).
- ``partial`` ("traditional" finetuning in the paper): task heads + the whole dense head + the last
  ``last_blocks`` ViT blocks and the final norm; patch embedding and earlier blocks stay frozen.
- ``adapter``: bottleneck adapters after every attention sublayer (``adaptlab.peft.adapters``) + task heads.
- ``lora``: peft LoRA on the named targets (``adaptlab.peft.lora``) + task heads.

In every PEFT arm the task heads train (the paper's whitelist). Trainable % counts the added parameters in the
total (peft's ``print_trainable_parameters`` convention). LayerNorm statistics are parameters, not running
buffers, so a frozen LayerNorm stays exactly frozen.

The registry imports no torch at module level (adapters and peft are imported when a method is applied): the
Snakefile expands the grid through it.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Callable

from adaptlab.peft.lora import DEFORMABLE_TARGETS, LoraSpec

# per task kind: the task heads (always train), the dense head (trains in partial), the backbone's prefix
TASK_PARTS = {
    "classification": {"heads": ["head.*"], "dense": [], "backbone": ""},
    "segmentation": {"heads": ["head.class_embed.*", "head.mask_embed.*"], "dense": ["head.*"], "backbone": "backbone."},
}


def adapter_config(arm: dict):
    from adaptlab.peft.adapters import AdapterConfig

    return AdapterConfig(n_adapters=arm["n_adapters"], reduction=arm["reduction"], init=arm.get("init", "zero"))


def lora_spec(arm: dict) -> LoraSpec:
    return LoraSpec(targets=arm["targets"], r=arm["rank"], alpha=arm["alpha"], dropout=arm.get("dropout", 0.0))


def _set_trainable(model, patterns: list[str], only: bool) -> None:
    """Enable the parameters matching ``patterns``; with ``only``, disable every other one."""
    for name, p in model.named_parameters():
        hit = any(fnmatchcase(name, pat) for pat in patterns)
        if hit:
            p.requires_grad_(True)
        elif only:
            p.requires_grad_(False)


# ------------------------------------------------------------------------------------------- the methods
# expand(name, arm config) -> grid points; apply(model, arm, parts, heads) -> the module to train;
# added(model, arm) -> parameters the method adds, by its analytic formula on the un-adapted model


def _single(name: str, arm: dict, base: dict) -> list[dict]:
    return [{**base, "label": name}]


def _apply_full(model, arm, parts, heads):
    _set_trainable(model, ["*"], only=True)
    return model


def _apply_linear(model, arm, parts, heads):
    _set_trainable(model, heads, only=True)
    return model


def _expand_partial(name: str, arm: dict, base: dict) -> list[dict]:
    return [{**base, "label": name, "last_blocks": arm["last_blocks"]}]


def _apply_partial(model, arm, parts, heads):
    pre = parts["backbone"]
    k, depth = arm["last_blocks"], len(model.get_submodule(pre + "blocks"))
    if not 0 <= k <= depth:
        raise ValueError(f"partial: last_blocks {k} outside [0, {depth}]")
    blocks = [f"{pre}blocks.{i}.*" for i in range(depth - k, depth)] + ([f"{pre}norm.*"] if k else [])
    _set_trainable(model, heads + parts["dense"] + blocks, only=True)
    return model


def _expand_adapter(name: str, arm: dict, base: dict) -> list[dict]:
    return [{**base, "label": f"{name}-n{n}-rf{red}", "n_adapters": n, "reduction": red, "init": arm["init"]}
            for n, red in itertools.product(arm["n_adapters"], arm["reduction"])]


def _apply_adapter(model, arm, parts, heads):
    from adaptlab.peft.adapters import inject_adapters

    inject_adapters(model, adapter_config(arm))
    _set_trainable(model, heads, only=False)
    return model


def _added_adapter(model, arm) -> int:
    from adaptlab.peft.adapters import adapter_params, attention_modules

    return sum(adapter_params(dim, adapter_config(arm)) for _, _, dim in attention_modules(model))


def _expand_lora(name: str, arm: dict, base: dict) -> list[dict]:
    out = []
    for targets, r, scale in itertools.product(arm["targets"], arm["rank"], arm["alpha_scale"]):
        alpha = float(scale * r)
        out.append({**base, "label": f"{name}-{targets}-r{r}-a{alpha:g}", "targets": targets, "rank": r,
                    "alpha": alpha, "dropout": arm["dropout"]})
    return out


def _apply_lora(model, arm, parts, heads):
    from adaptlab.peft.lora import inject_lora

    wrapped = inject_lora(model, lora_spec(arm))
    _set_trainable(model, heads, only=False)  # names of the inner model: heads are not LoRA targets
    return wrapped


def _added_lora(model, arm) -> int:
    from adaptlab.peft.lora import lora_params

    return lora_params(model, lora_spec(arm))


def _lora_fits(arm: dict, kind: str) -> bool:
    """LoRA on the deformable head's layers needs the segmentation model."""
    return kind != "classification" or not any(t in DEFORMABLE_TARGETS for t in arm["targets"].split("+"))


@dataclass(frozen=True)
class Method:
    expand: Callable[[str, dict, dict], list[dict]]
    apply: Callable
    colour: str  # in the Pareto figure
    added: Callable = lambda model, arm: 0
    fits: Callable[[dict, str], bool] = lambda arm, kind: True


METHODS: dict[str, Method] = {
    "full": Method(_single, _apply_full, "k"),
    "linear": Method(_single, _apply_linear, "tab:brown"),
    "partial": Method(_expand_partial, _apply_partial, "tab:grey"),
    "adapter": Method(_expand_adapter, _apply_adapter, "tab:blue", added=_added_adapter),
    "lora": Method(_expand_lora, _apply_lora, "tab:orange", added=_added_lora, fits=_lora_fits),
}


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method: unknown {name!r} (known: {tuple(METHODS)})")
    return METHODS[name]


def expand_arms(name: str, arm: dict) -> list[dict]:
    """One dict per grid point of an arm: method options fixed, with a unique path-safe label."""
    base = {"name": name, "method": arm["method"], "train": arm.get("train") or {}}
    return method(arm["method"]).expand(name, arm, base)


def arm_fits(arm: dict, kind: str) -> bool:
    return method(arm["method"]).fits(arm, kind)


def added_params_formula(model, arm: dict) -> int:
    """What adapters / LoRA add by the analytic formulas, counted on the un-adapted model."""
    return method(arm["method"]).added(model, arm)


def apply_method(model, arm: dict, kind: str, extra_trainable: list[str] | None = None):
    """Adapt ``model`` in place for ``arm``; return the module to train (a peft ``LoraModel`` for LoRA)."""
    parts = TASK_PARTS[kind]
    return method(arm["method"]).apply(model, arm, parts, parts["heads"] + list(extra_trainable or []))


# ------------------------------------------------------------------------------------------- checkpoints


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(model, path: str | Path, arm: dict) -> int:
    """Write only the trainable tensors (adapters / LoRA matrices + task heads); return their element count."""
    from safetensors.torch import save_file

    state = trainable_state(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"arm": json.dumps(arm, sort_keys=True)})
    return sum(t.numel() for t in state.values())


def load_trainable(model, path: str | Path) -> None:
    """Load a trainable-only checkpoint into a model adapted with the same arm; every key must fit."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing_trainable = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    _, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing_trainable:
        raise ValueError(f"{path}: checkpoint does not fit the adapted model (unexpected {unexpected[:5]}, "
                         f"missing trainable {missing_trainable[:5]})")
