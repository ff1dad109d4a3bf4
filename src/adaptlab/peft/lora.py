"""LoRA through HF peft: a named target set → ``peft.LoraConfig`` → ``LoraModel`` (in place), merged for inference.

A thin wrapper, no re-implementation: ``LoraModel`` injects ``lora_A``/``lora_B`` next to each targeted
``nn.Linear`` (kaiming-uniform A, zero B, scaling = lora_alpha / r) and gives ``merge_and_unload`` for merged
inference. Target names follow peft's list matching (exact name or suffix ``.name``):

- ViT: ``qkv`` (the fused q, k, v projection: q, k and v adapt jointly, as peft does on a fused layer; in the
  segmentation model this also hits the decoder's self-attention, which is a timm ``Attention`` too),
  ``proj`` (attention output), ``fc1``/``fc2`` (MLP).
- Deformable head (``MSDeformAttn``): ``sampling_offsets``, ``value_proj``, ``attention_weights``, ``output_proj``.

A target set is written as names joined by ``+``, e.g. ``qkv+proj`` or ``sampling_offsets+value_proj``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

DEFORMABLE_TARGETS = ("sampling_offsets", "value_proj", "attention_weights", "output_proj")
VIT_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclass(frozen=True)
class LoraSpec:
    targets: str = "qkv"  # names joined by "+"
    r: int = 8
    alpha: float = 8.0  # lora_alpha; the paper uses alpha = r (scaling 1)
    dropout: float = 0.0

    @property
    def target_modules(self) -> list[str]:
        names = self.targets.split("+")
        unknown = [n for n in names if n not in VIT_TARGETS + DEFORMABLE_TARGETS]
        if unknown:
            raise ValueError(f"LoRA targets {self.targets!r}: unknown {unknown} (known: {VIT_TARGETS + DEFORMABLE_TARGETS})")
        return names

    @property
    def deformable(self) -> bool:
        return any(n in DEFORMABLE_TARGETS for n in self.target_modules)

    def linear_targets(self, model) -> list[str]:
        """Full names of the ``nn.Linear`` modules a target name matches by suffix. Resolved here, not by peft's own
        suffix match, because ``proj`` would also hit timm's ``patch_embed.proj`` (a Conv2d)."""
        from torch import nn  # lazily: the Snakefile validates target names through this module

        names = self.target_modules
        found = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in names)]
        if not found:
            raise ValueError(f"LoRA targets {self.targets!r} match no Linear layer of the model")
        return found

    def peft_config(self, model):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.linear_targets(model), bias="none")


def inject_lora(model, spec: LoraSpec):
    """Wrap ``model`` in a peft ``LoraModel`` (its targets are replaced in place); only LoRA matrices train.

    Returns the ``LoraModel``: its ``forward`` is the model's, its ``.model`` the adapted module.
    """
    from peft.tuners.lora import LoraModel

    return LoraModel(model, spec.peft_config(model), "default")


def merged_copy(lora_model):
    """A plain copy of the model with W ← W + (alpha / r)·B·A in every target (peft ``merge_and_unload``)."""
    return copy.deepcopy(lora_model).merge_and_unload()


def lora_params(model, spec: LoraSpec) -> int:
    """Analytic count: r·(d_in + d_out) for every Linear whose name matches a target."""
    modules = dict(model.named_modules())
    return sum(spec.r * (modules[n].in_features + modules[n].out_features) for n in spec.linear_targets(model))
