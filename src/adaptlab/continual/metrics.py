"""Plasticity metrics measured at the end of each task on a fixed probe set (shared/papers/adamo.md §2).

- dead fraction: a hidden unit is dead when its ReLU output is 0 for every probe input (and token);
  τ-dormant (ReDo): s_i = E|h_i| / mean_k E|h_k| ≤ τ.
- singular-value statistics of each regularised matrix (as in the port's ``sv_stats.py``): σ_max, σ_min,
  cond = σ_max / max(σ_min, 1e-10), effective rank exp(H(σ²/Σσ²)), Gram deviation ‖G − sI‖_F/√dim, ‖W‖_F.
- feature rank of the penultimate features: effective rank and srank_δ (Kumar et al.), δ = 0.01.
- empirical-NTK condition number κ = λ_max/λ_min of Θ = JJᵀ (n·C × n·C), in float64 with an eigenvalue floor
  of 1e-12: a dense layer's block in factored form, every other tensor's from ``torch.func`` (vmap of jacrev).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
from torch.func import functional_call, jacrev, vmap

from adaptlab.train.adamo import gram_deviation


@torch.no_grad()
def unit_activity(model, x: torch.Tensor, taus=(0.0, 0.025, 0.1)) -> dict[str, dict]:
    """Per hidden layer: {'dead': fraction, 'dormant_<τ>': fraction, 'mask_<τ>': bool mask of dormant units}."""
    units = model.units()
    captured: dict[str, torch.Tensor] = {}
    hooks = [act.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o.detach()))
             for name, act, _, _ in units]
    try:
        was = model.training
        model.eval()
        model(x)
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, *_ in units:
        h = captured[name].reshape(-1, captured[name].shape[-1])  # (samples × tokens, units)
        score = h.abs().mean(0)
        score = score / score.mean().clamp_min(1e-12)
        row = {"dead": (h.abs().amax(0) == 0).float().mean().item()}
        for tau in taus:
            mask = (score <= tau) if tau > 0 else (h.abs().amax(0) == 0)
            row[f"dormant_{tau:g}"] = mask.float().mean().item()
            row[f"mask_{tau:g}"] = mask
        out[name] = row
    return out


def effective_rank(values: torch.Tensor) -> float:
    """exp of the entropy of values/Σvalues (values ≥ 0, e.g. σ² or σ)."""
    p = values.double().clamp_min(0)
    p = p / p.sum().clamp_min(1e-30)
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def sv_stats(w: torch.Tensor, scale: float = 1.0) -> dict[str, float]:
    m = w.detach().reshape(w.shape[0], -1).double()
    s = torch.linalg.svdvals(m)
    return {"sigma_max": s[0].item(), "sigma_min": s[-1].item(), "cond": (s[0] / s[-1].clamp_min(1e-10)).item(),
            "eff_rank": effective_rank(s ** 2), "gram_dev": gram_deviation(w, scale), "fro_norm": m.norm().item()}


@torch.no_grad()
def feature_rank(features: torch.Tensor, delta: float = 0.01) -> dict[str, float]:
    s = torch.linalg.svdvals(features.double())
    cum = torch.cumsum(s, 0)
    srank = int((cum < (1 - delta) * cum[-1]).sum().item()) + 1
    return {"feature_eff_rank": effective_rank(s), "feature_srank": float(srank)}


def entk_condition(model, x: torch.Tensor) -> float:
    """κ(Θ) with Θ = JJᵀ over all parameters, J = ∂f(x)/∂θ for the n probe inputs × C logits."""
    eig = torch.linalg.eigvalsh(entk_gram(model, x)).clamp_min(1e-12)
    return (eig[-1] / eig[0]).item()


def entk_gram(model, x: torch.Tensor) -> torch.Tensor:
    """Θ (n·C × n·C, float64, row i·C + c for input i and logit c) of a model whose logits for one input depend on
    that input alone (eval mode). An ``nn.Linear`` applied once to one vector per input gives its block in
    factored form; every other tensor goes through ``torch.func``'s Jacobian."""
    was = model.training
    model.eval()
    try:
        theta, covered = _linear_blocks(model, x)
        rest = {n: p.detach() for n, p in model.named_parameters() if n not in covered}
        if rest:
            part = _jacobian_blocks(model, rest, x)
            theta = part if theta is None else theta + part
    finally:
        model.train(was)
    return theta


def _linear_blocks(model, x: torch.Tensor) -> tuple[torch.Tensor | None, set[str]]:
    """Σ of the factored Θ blocks of the Linear layers fed one vector per input, and their parameter names.

    For y = Wh + b, the row of J_W for (input i, logit c) is g_ic ⊗ h_i with g_ic = ∂f_c(x_i)/∂y_i, so
    J_W J_Wᵀ = (GGᵀ) ⊙ (HHᵀ ⊗ 1_C) and J_b J_bᵀ = GGᵀ: (n·C)²·out work instead of (n·C)²·out·in (the NTK of
    a dense layer written as in Novak et al., ICML 2022, "Fast finite width neural tangent kernel"; written here
    because neural-tangents is a JAX library). A layer called twice, fed tokens, or whose output a later op
    changes in place is left to the Jacobian path."""
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    seen: dict[str, list] = {}  # name -> (input, output, the output's version then) of each call
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, []).append((i[0], o, o._version)))
             for name, m in linears.items()]
    try:
        with torch.enable_grad():
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    layers = {name: calls[0] for name, calls in seen.items()
              if len(calls) == 1 and calls[0][0].dim() == 2 and calls[0][1].requires_grad
              and calls[0][1]._version == calls[0][2] and calls[0][0].shape[0] == x.shape[0]}
    if not layers or logits.dim() != 2:
        return None, set()
    n, classes = logits.shape
    outs = [y for _, y, _ in layers.values()]
    # g for every logit c: one backward per logit (C is the number of classes, small)
    grads = [torch.autograd.grad(logits[:, c].sum(), outs, retain_graph=c < classes - 1, allow_unused=True)
             for c in range(classes)]
    theta, covered = None, set()
    for k, (name, (h, y, _)) in enumerate(layers.items()):
        g = torch.stack([torch.zeros_like(y) if gc[k] is None else gc[k] for gc in grads], 1)  # (n, C, out)
        g = g.detach().double().reshape(n * classes, -1)
        h = h.detach().double()
        module = linears[name]
        gg = g @ g.T
        block = gg * (h @ h.T).repeat_interleave(classes, 0).repeat_interleave(classes, 1)
        if module.bias is not None:
            block += gg
        theta = block if theta is None else theta + block
        prefix = f"{name}." if name else ""
        covered |= {prefix + p for p, _ in module.named_parameters()}
    return theta, covered


def _jacobian_blocks(model, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Σ_t J_t J_tᵀ over ``params`` with J from vmap(jacrev) of a functional call, each block in float64: the same
    sum as one J of those tensors, without building it (a float64 copy of the whole J was half of the time)."""
    def f(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),), strict=False).squeeze(0)

    with warnings.catch_warnings():  # torch has no vmap rule for CPU flash attention: slower, still exact
        warnings.filterwarnings("ignore", message="There is a performance drop")
        jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)  # {name: (n, C, *shape)}
    theta = None
    for v in jac.values():
        j = v.reshape(v.shape[0] * v.shape[1], -1).double()
        theta = j @ j.T if theta is None else theta.addmm_(j, j.T)
    return theta
