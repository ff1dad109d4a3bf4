"""The small decoder of the ICL testbed (shared/papers/icl.md §2), in timm-like small modules.

Hand-written because it is not a stock architecture: no token embedding (the input vectors are the residual
stream), pre-norm blocks h = x + Attn(RMSNorm(x)), y = h + MLP(RMSNorm(h)), a final RMSNorm and a bias-free
readout of the L label logits at the last position only.

* ``pos``: ``ape`` concatenates a one-hot of size 2·n_max+1 to every token, the block starting at the batch's
  random ``pos_offset`` (Reddy's scheme, width D + 2·n_max + 1); ``rope`` rotates q and k by a true rotation
  (pairs (2i, 2i+1) by angle p·θ^(-2i/head_dim)); ``none`` uses no position at all.
* ``mlp``: ``official`` is fc3(SiLU(fc1 x ⊙ fc2 x)) as written in the official code (SiLU after the product, the
  default); ``swiglu`` is fc3(SiLU(fc1 x) ⊙ fc2 x). Three d×d linears with bias; PyTorch's default init (the
  official init function is never called).
* W_q, W_k, W_v (and W_o, present only with more than one head) and the head are N(0, 0.02²), no bias.
* Multimodal: a ``Projector`` (Linear D2→D, GELU, Linear D→D, no bias, N(0, 0.02²)) writes the secondary items
  into the M2 slots (3i+1 and the last position) before positions are added.

Attention probabilities are kept in ``attn.last_attn`` when ``record_attn`` is set, for the progress measures.
Otherwise the last block runs for the last position only (``last_query``): the readout reads nothing else, so
it is the same function with a third less arithmetic in the 2-layer model (tests/test_icl.py compares both).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import RmsNorm
from timm.layers.fast_norm import rms_norm

from adaptlab.train import grouped


def rope_angles(seq_len: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(T, head_dim/2) rotation angles p·θ^(-2i/head_dim)."""
    if head_dim % 2:
        raise ValueError(f"icl.model: RoPE needs an even head dimension, got {head_dim}")
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (torch.arange(seq_len, dtype=torch.float64)[:, None] * inv[None]).float()


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate each consecutive pair (x_{2i}, x_{2i+1}) of the last dim by the angle of its position (dim -2):
    one complex product with ``rot`` = e^{i·angle} (``torch.polar`` of ``rope_angles``), half the time of
    rotating the even and odd halves separately and interleaving them. Computed in float32 at least (complex
    bf16 does not exist), returned in x's dtype."""
    pairs = torch.view_as_complex(x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rot).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 1, rope: bool = False, rope_base: float = 10000.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"icl.model: width {dim} is not divisible by n_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False) if num_heads > 1 else nn.Identity()
        self.rope, self.rope_base = rope, rope_base
        self.record_attn = False
        self.last_attn: torch.Tensor | None = None
        self._cache: dict = {}  # constant tensors per sequence length (not state: never saved)

    def forward(self, x: torch.Tensor, last_query: bool = False) -> torch.Tensor:
        """(B, T, C) → (B, T, C); with ``last_query`` only the last position's query: (B, 1, C)."""
        B, T, C = x.shape
        split = lambda t: t.view(B, -1, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q = split(self.q(x[:, -1:] if last_query else x))
        k, v = split(self.k(x)), split(self.v(x))
        if self.rope:
            rot = self._rotation(T, k.device)
            q, k = apply_rope(q, rot[-q.shape[2]:]), apply_rope(k, rot)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if not last_query:  # the last position sees every position: no mask
            att = att.masked_fill(self._future(T, x.device), float("-inf"))
        att = att.softmax(-1)
        if self.record_attn:
            self.last_attn = att.detach()
        y = (att @ v).transpose(1, 2).reshape(B, -1, C)
        return self.proj(y)

    def _rotation(self, T: int, device) -> torch.Tensor:
        """e^{i·angle} of the RoPE angles for T positions (complex64), computed once per (T, device)."""
        key = ("rope", T, device)
        if key not in self._cache:
            ang = rope_angles(T, self.head_dim, self.rope_base).to(device)
            self._cache[key] = torch.polar(torch.ones_like(ang), ang)
        return self._cache[key]

    def _future(self, T: int, device) -> torch.Tensor:
        """The causal mask's (T, T) True-above-the-diagonal, computed once per (T, device)."""
        key = ("mask", T, device)
        if key not in self._cache:
            self._cache[key] = torch.ones(T, T, dtype=torch.bool, device=device).triu(1)
        return self._cache[key]


class Mlp(nn.Module):
    def __init__(self, dim: int, kind: str = "official"):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.kind = kind

    def forward(self, x):
        if self.kind == "official":
            return self.fc3(F.silu(self.fc1(x) * self.fc2(x)))
        return self.fc3(F.silu(self.fc1(x)) * self.fc2(x))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, rope: bool, mlp: str, rope_base: float):
        super().__init__()
        self.norm1 = RmsNorm(dim, eps=1e-5)
        self.attn = Attention(dim, num_heads, rope, rope_base)
        self.norm2 = RmsNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, mlp)

    def forward(self, x, last_query: bool = False):
        """With ``last_query`` only the last position goes on: (B, 1, C), the same values as the full block's."""
        x = (x[:, -1:] if last_query else x) + self.attn(self.norm1(x), last_query)
        return x + self.mlp(self.norm2(x))


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(in_dim, out_dim, bias=False), nn.GELU(), nn.Linear(out_dim, out_dim, bias=False)
        for m in (self.fc1, self.fc2):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _with_m2(x: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """(..., T, D) tokens with the projected secondary items written into the M2 slots: 3i+1 for the N context pairs
    and the last position (the query's secondary item)."""
    T = x.shape[-2]
    slots = torch.cat([torch.arange(1, T - 2, 3, device=x.device), torch.tensor([T - 1], device=x.device)])
    return x.index_copy(-2, slots, items.to(x.dtype))


def _with_positions(x: torch.Tensor, offsets: torch.Tensor, pos_dim: int) -> torch.Tensor:
    """(..., T, D) tokens with the APE one-hot of each position appended, each sequence's block starting at its
    offset (offsets: x's leading dims): (..., T, D + pos_dim)."""
    T = x.shape[-2]
    if T > pos_dim:
        raise ValueError(f"icl.model: sequence of {T} tokens exceeds the APE block of {pos_dim}")
    hot = F.one_hot(offsets.long()[..., None] + torch.arange(T, device=x.device), pos_dim).to(x.dtype)
    return torch.cat([x, hot], dim=-1)


class ICLTransformer(nn.Module):
    """Decoder over (n, T, D) input vectors → (n, L) logits at the last position."""

    def __init__(self, in_dim: int, num_labels: int, *, pos: str = "rope", n_layers: int = 2, n_heads: int = 1,
                 n_max: int = 32, mlp: str = "official", rope_base: float = 10000.0, m2_dim: int | None = None):
        super().__init__()
        if pos not in ("ape", "rope", "none"):
            raise ValueError(f"icl.model: unknown positional scheme {pos!r} (ape, rope, none)")
        self.pos, self.in_dim, self.n_max = pos, in_dim, n_max
        self.pos_dim = 2 * n_max + 1 if pos == "ape" else 0
        self.width = in_dim + self.pos_dim
        self.blocks = nn.ModuleList(Block(self.width, n_heads, pos == "rope", mlp, rope_base) for _ in range(n_layers))
        self.norm = RmsNorm(self.width, eps=1e-5)
        self.head = nn.Linear(self.width, num_labels, bias=False)
        self.projector = Projector(m2_dim, in_dim) if m2_dim else None
        for blk in self.blocks:
            for m in (blk.attn.q, blk.attn.k, blk.attn.v, blk.attn.proj):
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)

    def _require_projector(self) -> None:
        if self.projector is None:
            raise ValueError("icl.model: secondary-modality input given to a model without a projector")

    def set_record_attn(self, on: bool) -> None:
        for blk in self.blocks:
            blk.attn.record_attn = on
            blk.attn.last_attn = None

    def attention_maps(self) -> list[torch.Tensor]:
        """Per layer (n, heads, T, T) attention of the last recorded forward pass."""
        return [blk.attn.last_attn for blk in self.blocks]

    def forward(self, x: torch.Tensor, pos_offset: torch.Tensor | None = None, m2: torch.Tensor | None = None):
        if m2 is not None:
            self._require_projector()
            x = _with_m2(x, self.projector(m2))
        if self.pos_dim:
            off = torch.zeros(len(x), dtype=torch.long, device=x.device) if pos_offset is None else pos_offset
            x = _with_positions(x, off, self.pos_dim)
        # The readout sees the last position only, so the last block computes only its query row and its MLP
        # (a third less arithmetic in a 2-layer model, the same function). Recorded attention keeps every row:
        # the progress measures read the previous-token strength over all positions.
        *early, last = self.blocks
        for blk in early:
            x = blk(x)
        x = last(x, last_query=not last.attn.record_attn)
        return self.head(self.norm(x[:, -1]))


# ----------------------------------------------------------------------------------------------------------
# A fused ICL pack (train.fused): the decoder over R runs' stacked weights, one op per layer for all runs. The
# same formulas as the modules above, batched over runs. vmap over functional_call saved next to nothing here;
# this does (benchmarks/bench_fused_preset.py, a group of 6 per run: APE 10.4 ms against 11.3 vmapped and 12.1
# alone, RoPE 4.3 against 4.7 and 6.1).


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """timm's RmsNorm per run: weight (R, C), x (R, ..., C)."""
    return rms_norm(x, x.shape[-1:], weight.view(len(weight), *([1] * (x.dim() - 2)), -1), eps)


def _grouped_attention(attn: Attention, p: dict, pre: str, x: torch.Tensor, last_query: bool) -> torch.Tensor:
    R, B, T, C = x.shape
    H, hd = attn.num_heads, attn.head_dim

    def heads(t: torch.Tensor) -> torch.Tensor:  # (R, B, n, C) → (R·B·H, n, hd)
        return t.reshape(R * B, -1, H, hd).transpose(1, 2).reshape(R * B * H, -1, hd)

    q = heads(grouped.linear(x[:, :, -1:] if last_query else x, p[pre + "q.weight"], None))
    k, v = heads(grouped.linear(x, p[pre + "k.weight"], None)), heads(grouped.linear(x, p[pre + "v.weight"], None))
    if attn.rope:
        rot = attn._rotation(T, x.device)
        q, k = apply_rope(q, rot[-q.shape[1]:]), apply_rope(k, rot)
    att = torch.bmm(q, k.mT) / math.sqrt(hd)
    if not last_query:
        att = att.masked_fill(attn._future(T, x.device), float("-inf"))
    y = torch.bmm(att.softmax(-1), v).view(R * B, H, -1, hd).transpose(1, 2).reshape(R, B, -1, C)
    return grouped.linear(y, p[pre + "proj.weight"], None) if H > 1 else y


def _grouped_mlp(mlp: Mlp, p: dict, pre: str, x: torch.Tensor) -> torch.Tensor:
    a, b = (grouped.linear(x, p[f"{pre}{fc}.weight"], p[f"{pre}{fc}.bias"]) for fc in ("fc1", "fc2"))
    h = F.silu(a * b) if mlp.kind == "official" else F.silu(a) * b
    return grouped.linear(h, p[pre + "fc3.weight"], p[pre + "fc3.bias"])


@grouped.register(ICLTransformer)
def icl_forward(model: ICLTransformer, p: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
    """Logits (R, B, L) of R stacked decoders on their batches (``x`` (R, B, T, D), ``pos_offset`` (R, B), ``m2``):
    ``ICLTransformer.forward`` per run, its last block trimmed to the last position."""
    x = batch["x"]
    if batch.get("m2") is not None:
        model._require_projector()
        x = _with_m2(x, grouped.linear(F.gelu(grouped.linear(batch["m2"], p["projector.fc1.weight"], None)),
                                       p["projector.fc2.weight"], None))
    if model.pos_dim:
        x = _with_positions(x, batch["pos_offset"], model.pos_dim)
    for i, blk in enumerate(model.blocks):
        pre, last = f"blocks.{i}.", i == len(model.blocks) - 1
        y = _rms_norm(x, p[pre + "norm1.weight"], blk.norm1.eps)
        x = (x[:, :, -1:] if last else x) + _grouped_attention(blk.attn, p, pre + "attn.", y, last)
        x = x + _grouped_mlp(blk.mlp, p, pre + "mlp.", _rms_norm(x, p[pre + "norm2.weight"], blk.norm2.eps))
    return grouped.linear(_rms_norm(x[:, :, -1], p["norm.weight"], model.norm.eps), p["head.weight"], None)
