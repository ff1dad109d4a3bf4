"""Per-layer theoretical upper bounds on plasticity (reconstructed from the official code's theory.py).

- Linear x -> xW^T + b (FC1, FC2): sigma_max(W); the bias cancels.
- LayerNorm: max_i |gamma_i|, the official plots' value. It is NOT a strict bound: LN's local gain is about
  max|gamma| sqrt(d) / ||x - mean(x)||, so it only holds for tokens of norm >= ~sqrt(d) (tests check the others).
- MHA: sum_h ||W_O^h||_2 ||W_V^h||_2 sqrt(3n + (12n + 3) r^4 ||A_h||_2^2), A_h = W_Q^h^T W_K^h / sqrt(d_h), with n the
  number of tokens and r the token-norm radius measured on the data. Heads are sliced correctly: OUTPUT ROWS of W_Q,
  W_K, W_V (nn.Linear weights are (out, in)) and INPUT COLUMNS of W_O; the official code slices Q/K/V by input
  columns, which is the bug its note records. ``head_weights`` is tested against the fused forward.

Hand-written: no library provides these bounds.
"""
from __future__ import annotations

import math

import torch


def spectral_norm(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach().double(), ord=2))


def head_weights(attn: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """Per-head (W_Q, b_Q, W_K, b_K, W_V, b_V, W_O) of a timm Attention with fused qkv, in float64."""
    h, dh, d = attn.num_heads, attn.head_dim, attn.qkv.in_features
    w = attn.qkv.weight.detach().double().view(3, h, dh, d)  # output rows: [q | k | v], each head-major
    b = (attn.qkv.bias.detach().double() if attn.qkv.bias is not None else torch.zeros(3 * h * dh, dtype=torch.float64)).view(3, h, dh)
    wo = attn.proj.weight.detach().double()
    return [{"wq": w[0, i], "bq": b[0, i], "wk": w[1, i], "bk": b[1, i], "wv": w[2, i], "bv": b[2, i],
             "wo": wo[:, i * dh:(i + 1) * dh]} for i in range(h)]


def per_head_attention(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention output recomputed head by head from ``head_weights`` (float64): proj(concat_h head_h) as a sum."""
    x = x.double()
    out = attn.proj.bias.detach().double().expand(*x.shape[:-1], -1).clone() if attn.proj.bias is not None else 0
    for hw in head_weights(attn):
        q, k, v = x @ hw["wq"].T + hw["bq"], x @ hw["wk"].T + hw["bk"], x @ hw["wv"].T + hw["bv"]
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        out = out + (a @ v) @ hw["wo"].T
    return out


def mha_bound(attn: torch.nn.Module, n_tokens: int, radius: float) -> float:
    total = 0.0
    for hw in head_weights(attn):
        a = hw["wq"].T @ hw["wk"] / math.sqrt(hw["wq"].shape[0])
        total += spectral_norm(hw["wo"]) * spectral_norm(hw["wv"]) * math.sqrt(
            3 * n_tokens + (12 * n_tokens + 3) * radius ** 4 * spectral_norm(a) ** 2)
    return total


def component_bound(block: torch.nn.Module, component: str, n_tokens: int, radius: float) -> float:
    if component == "attn_norm":
        return float(block.norm1.weight.detach().abs().max())
    if component == "ffn_norm":
        return float(block.norm2.weight.detach().abs().max())
    if component == "ffn_fc1":
        return spectral_norm(block.mlp.fc1.weight)
    if component == "ffn_fc2":
        return spectral_norm(block.mlp.fc2.weight)
    if component == "mha":
        return mha_bound(block.attn, n_tokens, radius)
    raise ValueError(f"component: unknown {component!r}")
