"""Sequential bottleneck adapters (Pfeiffer-style block, placed after every attention sublayer), peft house style.

Hand-written: HF peft (checked: 0.21, ``peft/tuners/*``) ships LoRA and its relatives, IA3, prompt methods and
others, but no sequential bottleneck adapter of the form ``h + W_up σ(W_down h)``; AdapterHub's ``adapters`` has
one but is wired into Hugging Face transformer classes, not into timm or our deformable head.

Method = ``AdapterConfig`` (dataclass) + ``BottleneckAdapter``/``AdapterStack`` (layers) + ``inject_adapters``
(the injector). The injector wraps every attention module (timm ``Attention`` in the ViT blocks and the dense
head's decoder self-attention, ``MSDeformAttn`` in the dense head) so that its output passes through N chained
adapters before the caller's residual add::

    x_0 = attn(...);  x_k = x_{k-1} + W_up,k ReLU(W_down,k x_{k-1} + b_down,k) + b_up,k   (k = 1..N)

With ``init="zero"`` (the default) W_up and b_up are 0, so the adapted model equals the base model bit for bit at
step 0. ``init="bert"`` is the authors' setting (adapter-transformers "pfeiffer": every weight ~ N(0, 0.02), zero
biases), only approximately the identity. The released code's wiring quirk (the residual added twice, see
shared/papers/peft.md §1a) is not reproduced: the canonical form above is the method.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ADAPTER_PREFIX = "adapters"


@dataclass(frozen=True)
class AdapterConfig:
    n_adapters: int = 1  # N adapters chained at each insertion point
    reduction: int = 4  # bottleneck m = d // reduction
    init: str = "zero"  # "zero": zero up-projection (identity at step 0) | "bert": N(0, 0.02) weights (paper)

    def __post_init__(self):
        if self.n_adapters < 1 or self.reduction < 1:
            raise ValueError(f"AdapterConfig: n_adapters and reduction must be >= 1, got {self}")
        if self.init not in ("zero", "bert"):
            raise ValueError(f"AdapterConfig.init: unknown {self.init!r} (zero, bert)")


class BottleneckAdapter(nn.Module):
    """x + up(ReLU(down(x))); 2·d·m + m + d parameters."""

    def __init__(self, dim: int, bottleneck: int, init: str = "zero"):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)
        if init == "zero":
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.zeros_(self.up.weight)
        else:  # "bert"
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.normal_(self.up.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.relu(self.down(x)))


class AdapterStack(nn.Module):
    """N adapters applied in sequence to the output of the wrapped attention module."""

    def __init__(self, base: nn.Module, dim: int, cfg: AdapterConfig):
        super().__init__()
        self.base_layer = base
        m = max(1, dim // cfg.reduction)
        self.adapters = nn.ModuleList(BottleneckAdapter(dim, m, cfg.init) for _ in range(cfg.n_adapters))

    def forward(self, *args, **kwargs):
        x = self.base_layer(*args, **kwargs)
        for adapter in self.adapters:
            x = adapter(x)
        return x


def adapter_params(dim: int, cfg: AdapterConfig) -> int:
    """Parameters added at one insertion point of width ``dim``: N·(2·d·m + m + d)."""
    m = max(1, dim // cfg.reduction)
    return cfg.n_adapters * (2 * dim * m + m + dim)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(name, module, width) of every attention sublayer an adapter follows."""
    from timm.models.vision_transformer import Attention

    from adaptlab.peft.deformable import MSDeformAttn

    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, Attention):
            out.append((name, mod, mod.qkv.in_features))
        elif isinstance(mod, MSDeformAttn):
            out.append((name, mod, mod.d_model))
    return out


def inject_adapters(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Wrap every attention sublayer of ``model`` in place; return the wrapped module names.

    Only the adapters are made trainable here (``requires_grad``); the caller re-enables the task heads.
    """
    targets = attention_modules(model)
    if not targets:
        raise ValueError("inject_adapters: the model has no attention module to adapt")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod, dim in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, AdapterStack(mod, dim, cfg))
    for name, p in model.named_parameters():
        if f".{ADAPTER_PREFIX}." in f".{name}":
            p.requires_grad_(True)
    return [n for n, _, _ in targets]
