"""The paper's decomposition of a timm ViT block into components, and their probes on the embedding output.

Components (Odonnat et al., official code ``vit-plasticity``): ``emb`` (patch embedding + CLS + positions, the
reference), and per block ``attn_norm`` (norm1), ``mha`` (attn: qkv + proj), ``ffn_norm`` (norm2), ``ffn_fc1``
(mlp.fc1), ``ffn_fc2`` (mlp.fc2). As in the official code, every component of every block is probed on the
SAME embedding output E(x), not on the block's real residual-stream input; MHA is probed without its LayerNorm,
FC1 without its activation, and FC2 on the zero-padded input [X, 0, 0, 0] (``fc2_input="padded"``, the default)
or, as a documented alternative reading, on its real input GELU(FC1(X)) (``fc2_input="fc1_output"``).

Hand-written: timm has no per-component probe of a block, and no library computes this decomposition.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

# Theoretical plasticity rank (1 = most plastic), from explicit names, never from dict order.
THEORETICAL_RANK = {"mha": 1, "ffn_fc1": 2, "ffn_fc2": 3, "ffn_norm": 4, "attn_norm": 5}
COMPONENTS = tuple(THEORETICAL_RANK)

# Parameters of each component type (fnmatch over timm names). The head (final LayerNorm `norm` + the new
# Linear `head`) trains in every configuration, as in the paper, so it is in none of these.
COMPONENT_PATTERNS = {
    "emb": ("patch_embed.*", "cls_token", "pos_embed"),
    "attn_norm": ("blocks.*.norm1.*",),
    "mha": ("blocks.*.attn.*",),
    "ffn_norm": ("blocks.*.norm2.*",),
    "ffn_fc1": ("blocks.*.mlp.fc1.*",),
    "ffn_fc2": ("blocks.*.mlp.fc2.*",),
}
HEAD_PATTERNS = ("norm.*", "head.*")


def embed(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """E(x): patch embedding, CLS token prepended, position embedding added -> (B, n, d)."""
    return model.norm_pre(model._pos_embed(model.patch_embed(x)))


def probe(block: torch.nn.Module, component: str, x: torch.Tensor, fc2_input: str = "padded") -> torch.Tensor:
    """One component of ``block`` applied in isolation to the embedding output ``x`` (B, n, d)."""
    if component == "attn_norm":
        return block.norm1(x)
    if component == "ffn_norm":
        return block.norm2(x)
    if component == "mha":
        return block.attn(x)
    if component == "ffn_fc1":
        return block.mlp.fc1(x)
    if component == "ffn_fc2":
        fc2 = block.mlp.fc2
        if fc2_input == "padded":
            if fc2.in_features % x.shape[-1]:
                raise ValueError(f"fc2_input 'padded' needs the FFN width ({fc2.in_features}) to be a multiple of d "
                                 f"({x.shape[-1]})")
            return F.pad(x, (0, fc2.in_features - x.shape[-1])) @ fc2.weight.T + fc2.bias
        if fc2_input == "fc1_output":
            return fc2(block.mlp.act(block.mlp.fc1(x)))
        raise ValueError(f"fc2_input: unknown {fc2_input!r} (padded | fc1_output)")
    raise ValueError(f"component: unknown {component!r} (one of {COMPONENTS})")
