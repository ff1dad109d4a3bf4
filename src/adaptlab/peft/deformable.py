"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021) in plain PyTorch.

Hand-written: the reference implementation is a CUDA extension (``MultiScaleDeformableAttention``) with a pure
PyTorch fallback (``ms_deform_attn_core_pytorch``) that lives inside research repositories; no well-kept pip
library ships a pure-PyTorch MSDeformAttn, so the ~40 lines are written here, following that fallback.

Each query attends to ``n_points`` sampled locations per head and level around its reference point. The four
Linear layers keep Deformable DETR's names, so LoRA targets them by name (peft ``target_modules``):
``sampling_offsets`` d→H·L·P·2, ``attention_weights`` d→H·L·P, ``value_proj`` d→d, ``output_proj`` d→d.
Sampling uses ``grid_sample(2·loc − 1, align_corners=False)`` with zero padding, so a location in [0, 1]² is
the normalised image coordinate (pixel centres at (i + 0.5) / W).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def ms_deform_attn_core(value: torch.Tensor, shapes: list[tuple[int, int]], loc: torch.Tensor,
                        weights: torch.Tensor) -> torch.Tensor:
    """value (B, S, H, dh) over the flattened levels; loc (B, Q, H, L, P, 2) in [0, 1] as (x, y);
    weights (B, Q, H, L, P). Returns (B, Q, H·dh)."""
    B, _, H, dh = value.shape
    _, Q, _, L, P, _ = loc.shape
    grids = 2 * loc - 1
    samples, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(B * H, dh, h, w)
        start += h * w
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(B * H, Q, P, 2)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))  # (BH, dh, Q, P)
    stacked = torch.stack(samples, dim=-2).flatten(-2)  # (BH, dh, Q, L·P)
    w = weights.transpose(1, 2).reshape(B * H, 1, Q, L * P)
    # contiguous, not the transposed view: a Linear on a non-contiguous 3-D input goes through matmul, which folds
    # it to one mm (after a copy) only when the weight requires grad and runs bmm on the strided view otherwise;
    # the two gemm layouts round differently (~1 ulp, MKL on CPU), so freezing output_proj (as LoRA does) would
    # change the forward. With one layout the result does not depend on requires_grad.
    return (stacked * w).sum(-1).view(B, H * dh, Q).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int = 64, n_levels: int = 2, n_heads: int = 4, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"MSDeformAttn: d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: zero offset weights with a radial bias (point i at distance i + 1 along one of
        H directions), uniform attention (zero weights and bias), xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query (B, Q, d); reference_points (B, Q, L, 2) in [0, 1]; value (B, S, d) with S = Σ h·w."""
        B, Q, _ = query.shape
        H, L, P = self.n_heads, self.n_levels, self.n_points
        if len(shapes) != L or sum(h * w for h, w in shapes) != value.shape[1]:
            raise ValueError(f"MSDeformAttn: shapes {shapes} do not fit {L} levels and {value.shape[1]} values")
        v = self.value_proj(value).view(B, value.shape[1], H, self.d_model // H)
        offsets = self.sampling_offsets(query).view(B, Q, H, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, H, L * P).softmax(-1).view(B, Q, H, L, P)
        # offsets are in units of the level's cells: divide by (w, h) to get normalised coordinates
        norm = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
        loc = reference_points[:, :, None, :, None, :] + offsets / norm[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn_core(v, shapes, loc, weights))
