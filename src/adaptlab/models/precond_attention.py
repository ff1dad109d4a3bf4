"""Preconditioned attention (Saratchandran, arXiv 2603.27153) as a drop-in for timm's ``Attention``.

Hand-written: no well-kept library implements it, and only the paper's abstract and Fig. 1 are public. What is
known: every head gets a diagonal conditioning matrix C that depends on Q, K and V and multiplies the attention
computation to lower the condition number of the "attention matrices". The readings implemented here (see
shared/papers/precond_attention.md) take that matrix per head and sample to be the head output
A = softmax(Q K^T / sqrt(d_h)) V, of shape N x d_h, and C a Jacobi (equilibration) scaling of A:

- ``form="col"`` (DEFAULT): A C, C = diag_j( 1 / sqrt(mean_i A[i, j]^2 + eps^2) ), d_h x d_h, i.e.
  sqrt(N) / ||A[:, j]||_2 with eps inside the root. Every head-output channel gets norm sqrt(N) over the tokens
  (unit RMS). Van der Sluis: kappa(A C) <= sqrt(d_h) * kappa(A).
- ``form="row"``: C A, C = diag_i( 1 / sqrt(mean_j A[i, j]^2 + eps^2) ), N x N. Every token's head output gets
  norm sqrt(d_h).

The reciprocal RMS (``rsqrt`` of a mean of squares) rather than sqrt(N) / (||.|| + eps) is for speed: its backward
is a few elementwise ops, where ``vector_norm``'s costs ~3x more (benchmarks/bench_precond.py).

Other unknowns are options: ``eps`` (1e-6), and ``detach`` (False: the gradient flows through C; True: C is
treated as a constant, as an unofficial re-implementation does). C is never materialised: it is a broadcast
multiply on the output of ``F.scaled_dot_product_attention``, so the fused path is kept, and it has no
parameters, so a timm ``Attention`` state_dict loads strictly. Norms are taken in float32 even under autocast.

``head_outputs`` (the per-head A of any timm ``Attention``) and ``condition_number`` (float64 singular values)
serve the condition-number probe of the precond study for the baseline and the preconditioned layers alike.
"""
from __future__ import annotations

from functools import partialmethod
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

FORMS = ("col", "row")
KAPPA_CAP = 1e16  # beyond this a float64 sigma_min is round-off: report the cap, not noise


def head_outputs(attn: Attention, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                 is_causal: bool = False) -> torch.Tensor:
    """A = softmax(q k^T / sqrt(d_h)) v of every head, shape (B, H, N, d_h), exactly as timm's ``Attention``
    computes it before merging the heads (fused SDPA when ``attn.fused_attn``, else explicit with attn_drop)."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              dropout_p=attn.attn_drop.p if attn.training else 0.)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    scores = maybe_add_mask(scores, resolve_self_attn_mask(N, scores, attn_mask, is_causal))
    return attn.attn_drop(scores.softmax(dim=-1)) @ v


def _norm_dtype(o: torch.Tensor) -> torch.dtype:
    return torch.promote_types(o.dtype, torch.float32)  # bf16/fp16 norms overflow or lose digits; keep float64


def conditioner(o: torch.Tensor, form: str = "col", eps: float = 1e-6) -> torch.Tensor:
    """The diagonal of C for head outputs ``o`` (..., N, d_h), in float32 or wider: shape (..., 1, d_h) for
    ``col``, (..., N, 1) for ``row``. Positive and finite for any finite ``o`` (eps guards all-zero channels/tokens)."""
    if form not in FORMS:
        raise ValueError(f"form: unknown {form!r} (one of {FORMS})")
    o32 = o.to(_norm_dtype(o))
    return torch.rsqrt(o32.square().mean(dim=-2 if form == "col" else -1, keepdim=True) + eps * eps)


def precondition(o: torch.Tensor, form: str = "col", eps: float = 1e-6, detach: bool = False) -> torch.Tensor:
    """A C (``col``) or C A (``row``) for head outputs ``o`` (..., N, d_h); same dtype as ``o``."""
    c = conditioner(o, form, eps)
    if detach:
        c = c.detach()
    return (o.to(c.dtype) * c).to(o.dtype)


class PreconditionedAttention(Attention):
    """timm ``Attention`` with a per-head diagonal conditioning matrix C on the head outputs.

    Default reading: ``form="col"`` (channel equilibration, C = sqrt(N) diag(A^T A)^-1/2), ``eps=1e-6``,
    gradient through C (``detach=False``); ``precond=False`` gives timm's ``Attention`` exactly. Same
    constructor and parameters as timm's ``Attention``, so ``VisionTransformer(attn_layer=...)`` takes it;
    ``preconditioned_attention(...)`` binds the options into a class (timm's Block needs a class, not a partial).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, precond: bool = True, form: str = "col", eps: float = 1e-6,
                 detach: bool = False, **kwargs) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        if form not in FORMS:
            raise ValueError(f"form: unknown {form!r} (one of {FORMS})")
        if not eps > 0:
            raise ValueError(f"eps: must be > 0, got {eps}")
        self.precond, self.form, self.eps, self.detach = precond, form, eps, detach

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if self.precond and self.form == "col" and is_causal:
            # column norms pool over all query positions: a causal model would see the future through C
            raise ValueError("form='col' mixes statistics across tokens and leaks future tokens; use 'row' "
                             "with is_causal")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        o = head_outputs(self, x, attn_mask, is_causal)
        if self.precond:
            o = precondition(o, self.form, self.eps, self.detach)
        x = self.norm(o.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"precond={self.precond}, form={self.form!r}, eps={self.eps}, detach={self.detach}"


def preconditioned_attention(form: str = "col", eps: float = 1e-6, detach: bool = False,
                             precond: bool = True) -> type[PreconditionedAttention]:
    """A ``PreconditionedAttention`` subclass with these options bound, for ``VisionTransformer(attn_layer=...)``."""
    if form not in FORMS:
        raise ValueError(f"form: unknown {form!r} (one of {FORMS})")
    init = partialmethod(PreconditionedAttention.__init__, precond=precond, form=form, eps=eps, detach=detach)
    return type("PreconditionedAttention", (PreconditionedAttention,), {"__init__": init})


@torch.no_grad()
def condition_number(m: torch.Tensor, cap: float = KAPPA_CAP) -> torch.Tensor:
    """2-norm condition number sigma_max / sigma_min of the (..., n, p) matrices ``m`` in float64, capped at ``cap``
    (rank-deficient matrices give the cap). Never backpropagated: SVD gradients are unstable at close values."""
    s = torch.linalg.svdvals(m.detach().to(torch.float64))
    kappa = s[..., 0] / s[..., -1].clamp_min(1e-300)
    return torch.where(s[..., -1] > 0, kappa, torch.full_like(kappa, cap)).clamp_max(cap)
