"""ViT factory: a timm ``VisionTransformer`` of configurable size, or a named timm architecture.

Weights only ever come from local files: ``.safetensors`` (read with safetensors, remapped with timm's own
``checkpoint_filter_fn``) or the original ``.npz`` releases (read by timm with ``allow_pickle=False``).
Pickled ``.pth`` files are refused on purpose: unpickling a user-supplied file can execute code.
"""
from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from adaptlab.config import ATTENTION_DEFAULTS
from adaptlab.models.precond_attention import preconditioned_attention
from adaptlab.train.trainable import count_parameters, is_head  # noqa: F401 - part of this module's surface


# model.attention.kind -> the attn_layer it builds from the attention config (None: timm's own Attention)
ATTENTION_KINDS = {
    "timm": lambda a: None,
    "preconditioned": lambda a: preconditioned_attention(form=a["form"], eps=a["eps"], detach=a["detach"]),
}


def attention_layer(attention: dict | None) -> type[torch.nn.Module] | None:
    """The ``attn_layer`` of a ``model.attention`` config: None (timm's own) for kind ``timm`` or absent."""
    attention = {**ATTENTION_DEFAULTS, **(attention or {})}
    if attention["kind"] not in ATTENTION_KINDS:
        raise ValueError(f"model.attention.kind: unknown {attention['kind']!r}")
    return ATTENTION_KINDS[attention["kind"]](attention)


def create_vit(model_cfg: dict, num_classes: int, **kwargs) -> VisionTransformer:
    """Build the backbone of ``model_cfg`` with a fresh ``num_classes`` head (extra kwargs go to timm, e.g. attn_layer).

    ``model_cfg["attention"]`` picks the attention layer; an explicit ``attn_layer`` kwarg wins over it.
    """
    layer = attention_layer(model_cfg.get("attention"))
    if layer is not None:
        kwargs.setdefault("attn_layer", layer)
    name = model_cfg.get("timm_name")
    if name:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    return VisionTransformer(
        img_size=model_cfg["img_size"], patch_size=model_cfg["patch_size"], in_chans=3, num_classes=num_classes,
        embed_dim=model_cfg["embed_dim"], depth=model_cfg["depth"], num_heads=model_cfg["num_heads"],
        mlp_ratio=model_cfg["mlp_ratio"], qkv_bias=True, class_token=True, global_pool="token", **kwargs,
    )


def load_pretrained_weights(model: VisionTransformer, path: str | Path) -> list[str]:
    """Load a timm checkpoint from a local file into ``model``, skipping the classifier head.

    Returns the names that kept their fresh initialisation (the head). Any other mismatch is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrain.weights: {path} does not exist")
    if path.suffix == ".npz":
        head = {k: v.clone() for k, v in model.state_dict().items() if is_head(k)}
        model.load_pretrained(str(path))
        model.load_state_dict(head, strict=False)  # keep the fresh head sized for the source task
        return sorted(head)
    if path.suffix != ".safetensors":
        raise ValueError(f"pretrain.weights: {path} must be .safetensors or .npz (pickled checkpoints are not loaded)")
    state = checkpoint_filter_fn(load_file(str(path)), model)
    state = {k: v for k, v in state.items() if not is_head(k)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if not is_head(k)]
    if bad_missing or unexpected:
        raise ValueError(f"pretrain.weights: {path} does not fit model.timm_name: missing {bad_missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return sorted(missing)


def save_model_weights(model: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_model_weights(model: torch.nn.Module, path: str | Path, skip_head: bool = False) -> None:
    state = load_file(str(path))
    if skip_head:
        state = {k: v for k, v in state.items() if not is_head(k)}
    missing, unexpected = model.load_state_dict(state, strict=not skip_head)
    if unexpected or [k for k in missing if not is_head(k)]:
        raise ValueError(f"{path}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
