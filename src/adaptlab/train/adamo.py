"""AdamO: Adam with a decoupled isometry step (Rosseau, Müller, Nowé, ICML 2026, arXiv 2606.09762).

Hand-written: no maintained library ships AdamO (the paper's JAX code is not public; the first author's
PyTorch port Arosseau/nanochat-isometry is a training script, not a package). Written from the equations
in ``shared/papers/adamo.md`` §1:

    g_t = ∇ℓ_task(θ_t)                                  # the task gradient only
    m, v = Adam moments of g_t (bias-corrected as in torch.optim.Adam)
    θ_{t+1} = θ_t − η·m̂/(√v̂+ε) − η_iso·λ·∇R(θ_t)       # R summed over the regularised matrices

with the isometry penalty on the smaller Gram (the *shape rule*): R(W) = ‖WᵀW − sI‖²_F for tall or square W
(out ≥ in) and ‖WWᵀ − sI‖²_F for wide W. ∇R = 4W(WᵀW − sI) resp. 4(WWᵀ − sI)W = 4UΣ(Σ² − s)Vᵀ, so one
step maps each singular value σ ↦ σ − 4η_isoλσ(σ² − s) and keeps the singular vectors.

Conventions chosen here (the paper's are unknown; each is a knob):
- R has no ½ factor (gradient factor 4), as in the zij page; the port's ½ is absorbed into λ.
- target scale ``isometry_scale`` s = 1 (s = 2 is the port's "ReLU gain" option); no normalisation by the
  Gram size.
- η_iso = ``isometry_lr_scale`` × the group's *current* lr, so lr schedulers scale the iso step too;
  ``isometry_lr`` (a number) overrides it.
- ∇R is evaluated at θ_t, before the Adam update (like AdamW's decay); the port applies it after
  ``optimizer.step()`` on the updated weights, an O(η²) difference.
- The iso term is not preconditioned, has no momentum and never enters ``exp_avg``/``exp_avg_sq``.
- The Gram is computed in at least float32. No clipping: the step is stable while 4η_isoλ(3σ_max² − s) < 1;
  a warning is issued once when a cheap lower bound of σ_max² shows it is not (the run then diverges and the
  training loop records it). The bound is checked at the first step and every ``STABILITY_EVERY``-th: it costs
  a reduction and a host sync per matrix (5 % of a preset continual MLP run when checked at every step).

Which tensors are regularised is decided by name (``isometry_param_groups``): ≥2-D weights matching the
``patterns`` and none of the ``exclude`` patterns (by default embeddings, heads, norms). Fused matrices
(timm's ``attn.qkv.weight``) are split into their ``n`` row blocks first (group key ``isometry_split``);
conv kernels are reshaped to (C_out, −1). With λ = 0 (or no regularised tensor) the step is exactly
``torch.optim.Adam(foreach=False)``, bit for bit: the Adam part mirrors its op order.

The coupled variant (λR added to the loss, so its gradient goes through the Adam moments) is the function
``isometry_penalty`` summed by ``coupled_isometry_loss``; use it with any optimizer.
"""
from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Iterable

import torch
from torch.optim.adam import adam as adam_update  # torch's functional Adam (its fused kernel)

# Default selection: every ≥2-D weight except embeddings, heads and norms (1-D tensors are never regularised).
DEFAULT_PATTERNS: tuple[str, ...] = ("*",)
DEFAULT_EXCLUDE: tuple[str, ...] = ("head*", "*embed*", "*norm*", "*cls_token*", "*pos_embed*", "*reg_token*")
DEFAULT_SPLITS: dict[str, int] = {"*qkv.weight": 3}  # fused q, k, v projections
STABILITY_EVERY = 50  # optimizer steps between two checks of the iso step's stability bound


def stability_check_due(step: int) -> bool:
    """Whether optimizer step ``step`` (1, 2, …) reads the stability bound: the first and every STABILITY_EVERY-th."""
    return (step - 1) % STABILITY_EVERY == 0


def _as_matrix(w: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
    """View (…, C_out, −1) of a weight; conv kernels are flattened over (C_in, k_h, k_w). ``batch_dims`` leading
    dimensions index independent weights (fused runs: the run dimension) and are kept."""
    return w.reshape(*w.shape[:batch_dims + 1], -1)


def isometry_grad(w: torch.Tensor, scale: float = 1.0, split: int = 1, batch_dims: int = 0) -> torch.Tensor:
    """∇R(W) in at least float32, same shape as ``w``; ``split`` > 1 treats ``w`` as that many stacked row blocks.
    ``batch_dims``: leading dimensions that index independent weights (fused runs: the run dimension)."""
    return isometry_grads([w], scale, [split], batch_dims)[0]


def isometry_grads(ws: list[torch.Tensor], scale: float = 1.0, splits: list[int] | None = None,
                   batch_dims: int = 0) -> list[torch.Tensor]:
    """``isometry_grad`` of each of ``ws`` (their row-block ``splits``, default 1), the blocks of one shape in one
    batched Gram (a wide block transposed: ∇ of Wᵀ is the transpose of ∇ of W). A small model's isometry step is
    then a few ops per block shape instead of per matrix: its matmuls are tiny and each op's fixed cost dominates."""
    blocks: list[torch.Tensor] = []  # every tensor's row blocks, each tall or square
    for w, split in zip(ws, splits or [1] * len(ws)):
        blocks += _tall_blocks(w.detach(), split, batch_dims)
    by_shape: dict[tuple, list[int]] = {}
    for k, b in enumerate(blocks):
        by_shape.setdefault(tuple(b.shape), []).append(k)
    grads: list[torch.Tensor | None] = [None] * len(blocks)
    for ks in by_shape.values():
        m = blocks[ks[0]].unsqueeze(-3) if len(ks) == 1 else torch.stack([blocks[k] for k in ks], dim=-3)
        for k, g in zip(ks, (4.0 * _times_deviation(m, _deviation(m, scale))).unbind(-3)):
            grads[k] = g
    out, k = [], 0
    for w, split in zip(ws, splits or [1] * len(ws)):
        parts, k = grads[k:k + split], k + split
        rows, cols = _as_matrix(w, batch_dims).shape[-2:]
        if rows // split < cols:  # its blocks went in transposed
            parts = [g.mT for g in parts]
        out.append((torch.cat(parts, dim=batch_dims) if split > 1 else parts[0]).reshape(w.shape))
    return out


def _deviation(m: torch.Tensor, scale: float) -> torch.Tensor:
    """G − sI, G the smaller Gram of ``m`` (of each of a batch): WᵀW (cols × cols) for a tall or square W, WWᵀ
    (rows × rows) for a wide one."""
    gram = m.mT @ m if m.shape[-2] >= m.shape[-1] else m @ m.mT
    gram.diagonal(dim1=-2, dim2=-1).sub_(scale)
    return gram


def _times_deviation(m: torch.Tensor, dev: torch.Tensor) -> torch.Tensor:
    """W(G − sI) for a tall or square W, (G − sI)W for a wide one: ∇R(W) / 4."""
    return m @ dev if m.shape[-2] >= m.shape[-1] else dev @ m


def sigma_max_sq_bound(w: torch.Tensor, batch_dims: int = 0) -> float:
    """A cheap lower bound of σ_max² of W (the largest over the batch): the largest squared column norm of a tall W
    (the diagonal of WᵀW), row norm of a wide W. No SVD."""
    m = _as_matrix(w.detach(), batch_dims).float()
    dim = -2 if m.shape[-2] >= m.shape[-1] else -1
    return m.pow(2).sum(dim=dim).max().item()


def warn_unstable(coeff: float, sigma2: float, scale: float) -> bool:
    """Warn (and return True) when the iso step is certainly unstable: 4·coeff·(3σ_max² − s) ≥ 1."""
    if 4 * coeff * (3 * sigma2 - scale) < 1:
        return False
    import warnings

    warnings.warn(f"AdamO: η_iso·λ = {coeff:g} is too large for a matrix with σ_max² ≥ {sigma2:.3g}: the "
                  f"isometry step is unstable (needs 4·η_iso·λ·(3σ_max² − s) < 1)", RuntimeWarning, stacklevel=4)
    return True


def isometry_penalty(w: torch.Tensor, scale: float = 1.0, split: int = 1, batch_dims: int = 0) -> torch.Tensor:
    """R(W) = Σ_blocks ‖G − sI‖²_F on the smaller Gram of each block; differentiable (the coupled variant).
    ``batch_dims``: leading dimensions that index independent weights (fused runs): one R per weight."""
    return _summed_penalty(_tall_blocks(w, split, batch_dims), scale)


def _tall_blocks(w: torch.Tensor, split: int, batch_dims: int) -> list[torch.Tensor]:
    """The ``split`` row blocks of a weight as matrices (at least float32), each tall or square: a wide block is
    transposed, which leaves its smaller Gram (WWᵀ = (Wᵀ)ᵀWᵀ) and so its penalty unchanged."""
    m = _as_matrix(w, batch_dims)
    m = m.float() if m.dtype in (torch.float16, torch.bfloat16) else m
    blocks = m.chunk(split, dim=batch_dims) if split > 1 else (m,)
    return [b if b.shape[-2] >= b.shape[-1] else b.mT for b in blocks]


def _summed_penalty(blocks: list[torch.Tensor], scale: float) -> torch.Tensor:
    """Σ ‖G − sI‖²_F over tall ``blocks`` (each (*batch, rows, cols)), the blocks of one shape stacked into one
    batched Gram: a small model's penalty is a few ops per shape instead of per matrix (its matmuls are tiny and
    each op's fixed cost dominated it: 4.1 ms forward and backward for a 2-block ViT's 12 blocks at 3 runs)."""
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for b in blocks:
        by_shape.setdefault(tuple(b.shape), []).append(b)
    total = None
    for same in by_shape.values():
        stacked = same[0].unsqueeze(-3) if len(same) == 1 else torch.stack(same, dim=-3)
        value = _GramDeviation.apply(stacked, float(scale))[0].sum(-1)
        total = value if total is None else total + value
    return total


class _GramDeviation(torch.autograd.Function):
    """‖G − sI‖²_F of a matrix (or of each of a batch), G its smaller Gram, with the gradient written out:
    4·W(G − sI) for a tall or square W, 4·(G − sI)W for a wide one (``isometry_grad``'s formula). Autograd's own
    backward through the Gram takes two matmuls per matrix (one per factor) where this takes one. Returns the
    deviation G − sI too (saved for the backward; torch.func's rule: ``setup_context`` sees only outputs). Both
    passes run outside autocast, in the input's dtype (at least float32, ``isometry_penalty``): under a GPU group's
    bf16 autocast the Gram would come out bf16 and the backward would mix it with the float32 weights."""

    generate_vmap_rule = True  # a fused group's vmap path (train.fused) calls it per run

    @staticmethod
    def forward(m: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(m.device.type, enabled=False):
            dev = _deviation(m, scale)
            return dev.square().sum((-2, -1)), dev

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0], output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _):
        m, dev = ctx.saved_tensors
        with torch.autocast(m.device.type, enabled=False):
            g = _times_deviation(m, dev)
            return g * (4 * grad[..., None, None].to(g.dtype)), None


def gram_deviation(w: torch.Tensor, scale: float = 1.0) -> float:
    """‖G − sI‖_F / sqrt(gram_dim) on the smaller Gram (the port's per-layer isometry statistic)."""
    m = _as_matrix(w.detach()).float()
    dim = min(m.shape)
    return math.sqrt(isometry_penalty(m, scale).item() / dim)


def _check_lambda(lam, where: str) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"{where}: isometry_lambda must be a finite number >= 0, got {lam!r}")
    return float(lam)


def _check_patterns(patterns, key: str) -> tuple[str, ...]:
    if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{key}: expected a list of non-empty fnmatch patterns, got {patterns!r}")
    return tuple(patterns)


def select_isometry(named_params: Iterable[tuple[str, torch.nn.Parameter]], patterns=DEFAULT_PATTERNS,
                    exclude=DEFAULT_EXCLUDE, splits: dict[str, int] | None = None) -> dict[str, int]:
    """{name: split} of the regularised tensors: ≥2-D, matching ``patterns`` and no ``exclude`` pattern.

    A pattern (in ``patterns``) that matches no parameter name is an error: a typo must not silently turn
    AdamO into Adam.
    """
    patterns = _check_patterns(patterns, "isometry_patterns")
    exclude = _check_patterns(exclude, "isometry_exclude")
    splits = DEFAULT_SPLITS if splits is None else splits
    named = list(named_params)
    unmatched = [pat for pat in patterns if not any(fnmatchcase(n, pat) for n, _ in named)]
    if unmatched:
        raise ValueError(f"isometry_patterns: {unmatched} match no parameter (names look like {[n for n, _ in named[:4]]})")
    out = {}
    for name, p in named:
        if p.ndim < 2 or not any(fnmatchcase(name, pat) for pat in patterns):
            continue
        if any(fnmatchcase(name, pat) for pat in exclude):
            continue
        split = next((k for pat, k in splits.items() if fnmatchcase(name, pat)), 1)
        if p.shape[0] % split:
            raise ValueError(f"isometry split: {name} has {p.shape[0]} rows, not divisible into {split} blocks")
        out[name] = split
    return out


def isometry_param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], isometry_lambda: float,
                          patterns=DEFAULT_PATTERNS, exclude=DEFAULT_EXCLUDE,
                          splits: dict[str, int] | None = None) -> list[dict]:
    """Param groups for ``AdamO``: one per split size of the regularised tensors, then the rest with λ = 0."""
    named = [(n, p) for n, p in named_params if p.requires_grad]
    lam = _check_lambda(isometry_lambda, "isometry_param_groups")
    chosen = select_isometry(named, patterns, exclude, splits)
    groups: dict[int, list] = {}
    for name, p in named:
        if name in chosen:
            groups.setdefault(chosen[name], []).append(p)
    out = [{"params": ps, "isometry_lambda": lam, "isometry_split": k} for k, ps in sorted(groups.items())]
    rest = [p for n, p in named if n not in chosen]
    if rest:
        out.append({"params": rest, "isometry_lambda": 0.0, "isometry_split": 1})
    return out


def coupled_isometry_loss(named_params: Iterable[tuple[str, torch.nn.Parameter]], isometry_lambda: float,
                          scale: float = 1.0, patterns=DEFAULT_PATTERNS, exclude=DEFAULT_EXCLUDE,
                          splits: dict[str, int] | None = None, batch_dims: int = 0) -> torch.Tensor:
    """λ·Σ R(W) over the selected tensors: add it to the task loss for the coupled ("plain") variant.
    ``batch_dims``: leading dimensions of every tensor that index independent models (a fused group's runs): one
    value per model."""
    named = list(named_params)
    lam = _check_lambda(isometry_lambda, "coupled_isometry_loss")
    chosen = select_isometry([(n, p[(0,) * batch_dims]) for n, p in named], patterns, exclude, splits)
    if not chosen:
        return torch.zeros(named[0][1].shape[:batch_dims] if named else ())
    return lam * summed_isometry_penalty(dict(named), chosen, scale, batch_dims)


def summed_isometry_penalty(weights: dict[str, torch.Tensor], chosen: dict[str, int], scale: float = 1.0,
                            batch_dims: int = 0) -> torch.Tensor:
    """Σ R(W) over the tensors of ``weights`` named in ``chosen`` ({name: split}, as ``select_isometry`` returns
    it; at least one): ``coupled_isometry_loss`` without λ, for a caller that selected the tensors once."""
    blocks = [b for name, split in chosen.items() for b in _tall_blocks(weights[name], split, batch_dims)]
    return _summed_penalty(blocks, scale)


class AdamO(torch.optim.Optimizer):
    """Adam + decoupled isometry step. Group keys: lr, betas, eps, isometry_lambda, isometry_scale,
    isometry_split (row blocks of a fused matrix), isometry_lr (None = follow ``isometry_lr_scale`` × lr)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, isometry_lambda: float = 1e-2,
                 isometry_scale: float = 1.0, isometry_split: int = 1, isometry_lr: float | None = None,
                 isometry_lr_scale: float = 1.0, fused: bool = False):
        if not lr > 0:
            raise ValueError(f"AdamO: lr must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"AdamO: betas must lie in [0, 1), got {betas}")
        if not isometry_scale > 0:
            raise ValueError(f"AdamO: isometry_scale must be > 0, got {isometry_scale}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, isometry_lambda=_check_lambda(isometry_lambda, "AdamO"),
                        isometry_scale=float(isometry_scale), isometry_split=int(isometry_split),
                        isometry_lr=isometry_lr, isometry_lr_scale=float(isometry_lr_scale), fused=bool(fused))
        super().__init__(params, defaults)
        self._calls = 0  # step() calls: the stability check's cadence (not in the state; a resume checks anew)
        for i, g in enumerate(self.param_groups):  # per-group values are checked too
            _check_lambda(g["isometry_lambda"], f"AdamO param group {i}")
            if g["isometry_split"] < 1:
                raise ValueError(f"AdamO param group {i}: isometry_split must be >= 1")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._calls += 1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, lam = group["lr"], group["isometry_lambda"]
            eta_iso = group["isometry_lr"] if group["isometry_lr"] is not None else group["isometry_lr_scale"] * lr
            if group.get("fused"):  # checkpoints from before the key have none
                self._fused_group_step(group, eta_iso)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                # r_t at θ_t, before the Adam update; never mixed into the moments
                iso = isometry_grad(p, group["isometry_scale"], group["isometry_split"]) if lam and p.ndim >= 2 else None
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                # The Adam part mirrors torch.optim.adam._single_tensor_adam's op order (bit-exact parity).
                step_t += 1
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = step_t.item()
                bias_correction1 = 1 - beta1 ** step
                bias_correction2 = 1 - beta2 ** step
                step_size = lr / bias_correction1
                denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(group["eps"])
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if iso is not None:
                    self._check_stability(p, eta_iso * lam, group["isometry_scale"])
                    p.add_(iso.to(p.dtype), alpha=-eta_iso * lam)
        return loss

    def _fused_group_step(self, group: dict, eta_iso: float) -> None:
        """The same step with torch's fused Adam kernel (``fused=True``): every r_t at θ_t first, then one fused
        Adam update of the group, then the iso steps. Equal to the loop at rounding level, not bit for bit."""
        lam = group["isometry_lambda"]
        params = [p for p in group["params"] if p.grad is not None]
        mats = [p for p in params if lam and p.ndim >= 2]  # their Grams batched by shape
        grads = iter(isometry_grads(mats, group["isometry_scale"], [group["isometry_split"]] * len(mats)))
        isos = [next(grads) if lam and p.ndim >= 2 else None for p in params]
        for p in params:
            state = self.state[p]
            if not state:  # the fused kernel keeps its step count on the parameter's device
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adam_update(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], fused=True, amsgrad=False,
                    beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=0.0, eps=group["eps"], maximize=False)
        for p, iso in zip(params, isos):
            if iso is not None:
                self._check_stability(p, eta_iso * lam, group["isometry_scale"])
                p.add_(iso.to(p.dtype), alpha=-eta_iso * lam)

    def _check_stability(self, p: torch.Tensor, coeff: float, scale: float) -> None:
        """Warn once when the iso step is certainly unstable (``warn_unstable``)."""
        if not getattr(self, "_warned", False) and stability_check_due(self._calls):
            self._warned = warn_unstable(coeff, sigma_max_sq_bound(p), scale)
