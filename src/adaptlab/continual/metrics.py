"""Plasticity metrics measured at the end of each task on a fixed probe set (shared/papers/adamo.md §2).

- dead fraction: a hidden unit is dead when its ReLU output is 0 for every probe input (and token);
  τ-dormant (ReDo): s_i = E|h_i| / mean_k E|h_k| ≤ τ.
- singular-value statistics of each regularised matrix (as in the port's ``sv_stats.py``): σ_max, σ_min,
  cond = σ_max / max(σ_min, 1e-10), effective rank exp(H(σ²/Σσ²)), Gram deviation ‖G − sI‖_F/√dim, ‖W‖_F.
- feature rank of the penultimate features: effective rank and srank_δ (Kumar et al.), δ = 0.01.
- empirical-NTK condition number κ = λ_max/λ_min of Θ = JJᵀ (n·C × n·C) with J from ``torch.func``
  (vmap of jacrev over a functional call), in float64 with an eigenvalue floor of 1e-12.
"""
from __future__ import annotations

import math
import warnings

import torch
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
    params = {n: p.detach() for n, p in model.named_parameters()}
    was = model.training
    model.eval()

    def f(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    with warnings.catch_warnings():  # torch has no vmap rule for CPU flash attention: slower, still exact
        warnings.filterwarnings("ignore", message="There is a performance drop")
        jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)  # {name: (n, C, *shape)}
    model.train(was)
    # Θ = Σ_tensors J_t J_tᵀ, each block in float64: the same sum as one J of all tensors, without building it
    # (a float64 copy of the whole J was half of this function's time on the preset's MLP)
    theta = None
    for v in jac.values():
        j = v.reshape(v.shape[0] * v.shape[1], -1).double()
        theta = j @ j.T if theta is None else theta.addmm_(j, j.T)
    eig = torch.linalg.eigvalsh(theta).clamp_min(1e-12)
    return (eig[-1] / eig[0]).item()
