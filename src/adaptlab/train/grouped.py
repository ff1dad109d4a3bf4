"""Grouped forwards (HFTA style): a model's forward over R runs' stacked weights, each op once for all runs.

``train.fused.FusedRuns`` trains same-shape runs as one batched model. Its general path vmaps a functional call of
the template module; for tiny models that is slow on the CPU: every op goes through vmap's batching layer, and
``functional_call`` swaps every parameter in and out on each call. A model whose forward is written here over
stacked weights (``(R, *shape)`` per tensor, the runs' inputs stacked as ``(R, B, ...)``) trains with one op per
layer for the whole group: a Linear is one ``baddbmm``, attention two ``bmm`` per head over the runs × batch, a
LayerNorm one normalisation and one ``addcmul``. The maths is the module's own, so a run trained
grouped matches its one-by-one twin within float rounding (tests/test_fused_continual.py).

Registry: ``register(cls, supports)(forward)``; ``grouped_forward(model)`` is the forward for a model, or None when
its class has none or ``supports(model)`` says this instance uses a feature the grouped form does not implement
(then the group takes the vmap path). Written by hand: HFTA (Wang et al., MLSys 2021) rewrites layers for its own
benchmarks and is not a maintained library; torch.func has no grouped layers.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from adaptlab.train.device import default_float32_matmul

Forward = Callable[[nn.Module, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
_REGISTRY: dict[type, tuple[Callable[[nn.Module], bool], Forward]] = {}


def register(cls: type, supports: Callable[[nn.Module], bool] = lambda m: True):
    """Decorator: ``forward(template, params, x)`` is the grouped forward of ``cls`` instances that ``supports``."""
    def deco(fn: Forward) -> Forward:
        _REGISTRY[cls] = (supports, fn)
        return fn
    return deco


def grouped_forward(model: nn.Module) -> Forward | None:
    if type(model).__module__.startswith("timm."):
        _register_timm()  # here, not at import: timm costs seconds to import and MLP-only jobs never need it
    entry = _REGISTRY.get(type(model))
    if entry is None:
        return None
    try:
        return entry[1] if entry[0](model) else None
    except AttributeError:  # a variant of the class (another attention module, say) the check does not know
        return None


class _Linear(torch.autograd.Function):
    """nn.Linear per run, its weight gradient computed as (R, out, in) directly. Autograd's own formula for
    ``baddbmm(b, x, wᵀ)`` gives the gradient of wᵀ and transposes it, and accumulating that non-contiguous gradient
    into the contiguous stacked weight costs a strided copy per weight per step (30 % of a 12-run MLP group's
    forward and backward in the torch profiler).

    A stacked weight may carry ``grad_runs = (a, b)``: only runs a..b-1 train it (``train.fused.FusedRuns`` sets it
    to the span of the runs whose trainable set holds it), so its gradient and its bias's are computed there and
    are zero elsewhere, where the group would zero them anyway. A pack of mixed trainable sets (a plasticity pack:
    12 full runs beside 16 that train norms or the embedding) skips the weight products of runs that freeze them,
    as each run alone would."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(flat, weight)
        ctx.has_bias = bias is not None
        ctx.runs = getattr(weight, "grad_runs", None), getattr(bias, "grad_runs", None)
        return torch.bmm(flat, weight.mT) if bias is None else torch.baddbmm(bias.unsqueeze(1), flat, weight.mT)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # under autocast the forward's matmul ran in the gradient's dtype (autograd casts each result to its input's)
        flat, weight = (t.to(grad.dtype) for t in ctx.saved_tensors)
        need_x, need_w, need_b = ctx.needs_input_grad
        runs_w, runs_b = ctx.runs
        grad_w = _on_runs(runs_w, weight.shape, grad, lambda a, b: torch.bmm(grad[a:b].mT, flat[a:b])) if need_w else None
        grad_b = (_on_runs(runs_b, grad.shape[::2], grad, lambda a, b: grad[a:b].sum(1))
                  if ctx.has_bias and need_b else None)
        return torch.bmm(grad, weight) if need_x else None, grad_w, grad_b


def _on_runs(span: tuple[int, int] | None, shape, like: torch.Tensor, grad_of) -> torch.Tensor:
    """``grad_of(a, b)``, the gradient of runs a..b-1, as the whole (R, ...) gradient: zero outside ``span``."""
    if span is None:
        return grad_of(0, shape[0])
    out = like.new_zeros(shape)
    out[span[0]:span[1]] = grad_of(*span)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """nn.Linear per run: x (R, ..., in), weight (R, out, in), bias (R, out) → (R, ..., out)."""
    out = _Linear.apply(x.reshape(x.shape[0], -1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[1])


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each run's mean cross-entropy from stacked logits (R, B, C) and labels (R, B): (R,), in float32 at least."""
    r, b, c = logits.shape
    return F.cross_entropy(logits.float().reshape(r * b, c), labels.reshape(-1), reduction="none").view(r, b).mean(1)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """nn.LayerNorm over the last dimension per run: weight and bias (R, D)."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    # the normalisation with a unit affine: torch's CPU kernel without weight and bias takes a slower path (450 vs
    # 270 µs at 6144 rows × 32), and x·1 + 0 is exact, so the result is bitwise the same
    unit = _unit_affine(x.shape[-1], x.dtype, x.device)
    return torch.addcmul(bias.view(shape), F.layer_norm(x, x.shape[-1:], *unit, eps=eps), weight.view(shape))


@functools.lru_cache(maxsize=16)
def _unit_affine(width: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(width, dtype=dtype, device=device), torch.zeros(width, dtype=dtype, device=device)


def attention(qkv: torch.Tensor, heads: int, scale: float, first_query: bool = False) -> torch.Tensor:
    """Softmax attention of every run, input and head from the stacked qkv projection (R, B, N, 3·D) → (R, B, N, D),
    or with ``first_query`` the first token's row only (R, B, 1, D). Each head's q, k and v are views of ``qkv`` (a
    split along features), fed to two ``bmm`` over runs × batch: no copy of q, k, v. ``scaled_dot_product_attention``
    on the CPU wants them head-major and contiguous, and the permutes there and back cost a tiny ViT group more than
    its attention (4.8 → 2.4 ms forward and backward at 12 runs × 32 inputs × 16 tokens × 2 heads)."""
    return _Attention.apply(qkv, heads, scale, first_query)


def _head_views(qkv: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """The q heads, then the k heads, then the v heads of a stacked qkv projection (R, B, N, 3·D), each a view
    (R·B, N, D / heads): a split along features, no copy."""
    R, B, N, width = qkv.shape
    hd = width // 3 // heads
    return [t.reshape(R * B, N, hd) for t in qkv.split(hd, dim=-1)]


class _Attention(torch.autograd.Function):
    """``attention`` with its backward written out: the same products autograd would take, but each head's key
    gradient comes out of ``bmm`` contiguous (dSᵀq, where autograd forms (qᵀdS)ᵀ, a transposed view), so the one
    ``cat`` that assembles the qkv gradient copies rows instead of gathering transposed blocks (one block's
    attention forward and backward at 18 runs × 32 inputs × 16 tokens × 2 heads: 2.5–2.9 → 1.9–2.4 ms; an 18-run
    continual ViT step ~0.8 ms faster). Its float32 products take torch's default kernels (MKL) also inside a
    fused group's oneDNN switch (``train.device.default_float32_matmul``): one small matrix per run, input and
    head, where oneDNN's per-call cost loses (the same results, bit for bit, at the preset's shapes)."""

    @staticmethod
    @default_float32_matmul()
    def forward(ctx, qkv: torch.Tensor, heads: int, scale: float, first_query: bool) -> torch.Tensor:
        R, B, N, width = qkv.shape
        dim = width // 3
        parts = _head_views(qkv, heads)
        outs, probs = [], []
        for h in range(heads):
            q, k, v = parts[h], parts[heads + h], parts[2 * heads + h]
            if first_query:
                q = q[:, :1]
            probs.append(torch.bmm(q, k.mT).mul_(scale).softmax(-1))
            outs.append(torch.bmm(probs[-1], v))
        ctx.save_for_backward(qkv, *probs)
        ctx.heads, ctx.scale, ctx.first_query = heads, scale, first_query
        return torch.cat(outs, -1).view(R, B, -1, dim)

    @staticmethod
    @default_float32_matmul()
    def backward(ctx, grad: torch.Tensor):
        qkv, *probs = ctx.saved_tensors
        heads, scale, dtype = ctx.heads, ctx.scale, qkv.dtype
        qkv = qkv.to(probs[0].dtype)  # under autocast the products ran in the probabilities' dtype
        R, B, N, width = qkv.shape
        dim, hd = width // 3, width // 3 // heads
        parts = _head_views(qkv, heads)
        grad = grad.reshape(R * B, -1, dim).to(probs[0].dtype)
        dq, dk, dv = [], [], []
        for h in range(heads):
            q, k, v, p = parts[h], parts[heads + h], parts[2 * heads + h], probs[h]
            g = grad[..., h * hd:(h + 1) * hd]
            dv.append(torch.bmm(p.mT, g))
            ds = torch._softmax_backward_data(torch.bmm(g, v.mT), p, -1, p.dtype).mul_(scale)
            if ctx.first_query:  # the other queries' rows have no gradient
                dq.append(torch.cat([torch.bmm(ds, k), ds.new_zeros(R * B, N - 1, hd)], 1))
                q = q[:, :1]
            else:
                dq.append(torch.bmm(ds, k))
            dk.append(torch.bmm(ds.mT, q))
        return torch.cat(dq + dk + dv, -1).view(R, B, N, width).to(dtype), None, None, None


# ----------------------------------------------------------------------------------------------------------
# timm's VisionTransformer, in the configurations the continual study and models.vit build (and any like them)


def _plain_norm(m: nn.Module) -> bool:
    """torch's LayerNorm (or timm's subclass on its default path) over the last dimension, with weight and bias."""
    return (isinstance(m, nn.LayerNorm) and not getattr(m, "_fast_norm", False) and len(m.normalized_shape) == 1
            and m.weight is not None and m.bias is not None)


def _vit_supported(vit: nn.Module) -> bool:
    """Either average pooling with fc_norm and no class token (the continual study's ViT), or a class token read
    by token pooling after the final norm (``models.vit.create_vit``: the finetuning backbones); no register tokens,
    fixed image size, plain pre-norm blocks of timm's own Attention and Mlp (no layer scale, drop path, dropout,
    q/k norm or attention-output norm), LayerNorms with affine weights and biases, and an elementwise activation
    module in each MLP."""
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block

    idle = (nn.Identity, nn.Dropout)
    dropless = all(m.p == 0 for m in vit.modules() if isinstance(m, nn.Dropout))
    avg = (vit.global_pool == "avg" and vit.cls_token is None and isinstance(vit.norm, nn.Identity)
           and _plain_norm(vit.fc_norm))
    token = (vit.global_pool == "token" and vit.cls_token is not None and not vit.no_embed_class
             and _plain_norm(vit.norm) and isinstance(vit.fc_norm, nn.Identity))
    if not (dropless and (avg or token) and vit.reg_token is None and not vit.dynamic_img_size
            and vit.pos_embed is not None and vit.attn_pool is None
            and isinstance(vit.patch_embed.norm, nn.Identity) and isinstance(vit.patch_drop, idle)
            and isinstance(vit.norm_pre, nn.Identity) and type(vit.patch_embed.proj) is nn.Conv2d
            and vit.patch_embed.proj.kernel_size == vit.patch_embed.proj.stride
            and vit.patch_embed.proj.padding == (0, 0) and vit.patch_embed.flatten):
        return False
    for b in vit.blocks:
        a, mlp = b.attn, b.mlp
        if not (type(b) is Block and type(a) is Attention and type(mlp) is Mlp  # a subclass may change the maths
                and all(isinstance(m, idle) for m in (b.ls1, b.ls2, b.drop_path1, b.drop_path2, a.q_norm, a.k_norm,
                                                      a.norm, mlp.norm))
                and _plain_norm(b.norm1) and _plain_norm(b.norm2)
                and a.qkv.bias is not None and isinstance(mlp.act, (nn.ReLU, nn.GELU))
                and abs(a.scale - a.head_dim ** -0.5) < 1e-12):
            return False
    return type(vit.head) is nn.Linear


def vit_forward(vit: nn.Module, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits (R, B, classes) of R stacked ViTs on images x (R, B, C, H, W). With token pooling the last block
    computes the class token's row only after its qkv (the head reads nothing else; LayerNorm, the MLP and the
    residual are per token): the same function with ~17 % less arithmetic in a 4-block ViT of 17 tokens."""
    proj = vit.patch_embed.proj
    R, B, C, H, W = x.shape
    ph, pw = proj.kernel_size
    # the stride-equal-kernel convolution as a Linear over the flattened (C, ph, pw) patches, row-major patch order
    patches = x.reshape(R, B, C, H // ph, ph, W // pw, pw).permute(0, 1, 3, 5, 2, 4, 6)
    patches = patches.reshape(R, B, (H // ph) * (W // pw), C * ph * pw)
    w = p["patch_embed.proj.weight"]
    h = linear(patches, w.reshape(R, w.shape[1], -1), p["patch_embed.proj.bias"])
    token = vit.cls_token is not None
    if token:  # timm's default: the class token first, then the position embedding over all tokens
        h = torch.cat([p["cls_token"].expand(R, B, 1, h.shape[-1]), h], dim=2)
    h = h + p["pos_embed"]
    last = len(vit.blocks) - 1
    for i, blk in enumerate(vit.blocks):
        pre, a, first = f"blocks.{i}.", blk.attn, token and i == last
        y = layer_norm(h, p[pre + "norm1.weight"], p[pre + "norm1.bias"], blk.norm1.eps)
        y = attention(linear(y, p[pre + "attn.qkv.weight"], p[pre + "attn.qkv.bias"]), a.num_heads, a.scale, first)
        h = (h[:, :, :1] if first else h) + linear(y, p[pre + "attn.proj.weight"], p[pre + "attn.proj.bias"])
        y = layer_norm(h, p[pre + "norm2.weight"], p[pre + "norm2.bias"], blk.norm2.eps)
        y = blk.mlp.act(linear(y, p[pre + "mlp.fc1.weight"], p[pre + "mlp.fc1.bias"]))
        h = h + linear(y, p[pre + "mlp.fc2.weight"], p[pre + "mlp.fc2.bias"])
    if token:
        pooled = layer_norm(h[:, :, 0], p["norm.weight"], p["norm.bias"], vit.norm.eps)
    else:
        pooled = layer_norm(h.mean(2), p["fc_norm.weight"], p["fc_norm.bias"], vit.fc_norm.eps)
    return linear(pooled, p["head.weight"], p.get("head.bias"))


def _register_timm() -> None:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # timm is a dependency; without it there is no ViT to group
        return
    register(VisionTransformer, _vit_supported)(vit_forward)
