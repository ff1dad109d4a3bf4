"""The plasticity estimator: mean over index-paired inputs of ||f(X_i) - f(Y_i)||_F / ||X_i - Y_i||_F.

The distance is the Frobenius norm over the whole token matrix of each pair (no mean over tokens). Plasticity
is the MEAN OF PER-PAIR RATIOS, not the ratio of mean distances. Pairs with ||X_i - Y_i|| = 0 have no ratio;
they are excluded and counted (the official code does not guard against them). The 95 % CI is
1.96 * std / sqrt(N), as the official plots draw it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def pair_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Frobenius distance per pair over every non-batch dimension: (N, ...) x (N, ...) -> (N,), float64."""
    if a.shape != b.shape:
        raise ValueError(f"paired tensors differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.detach().double() - b.detach().double()).flatten(1).norm(dim=1)


def pair_ratios(fx: torch.Tensor, fy: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-pair ratios D_f(i) / D_emb(i) for the pairs with D_emb(i) > 0, and the number of excluded pairs."""
    ref = pair_distances(x, y)
    keep = ref > 0
    return pair_distances(fx, fy)[keep] / ref[keep], int((~keep).sum())


@dataclass(frozen=True)
class Plasticity:
    mean: float
    ci95: float
    n_pairs: int
    n_zero: int


def summarise(ratios: torch.Tensor, n_zero: int = 0) -> Plasticity:
    n = int(ratios.numel())
    if n == 0:
        return Plasticity(math.nan, math.nan, 0, n_zero)
    std = float(ratios.std(unbiased=False)) if n > 1 else 0.0
    return Plasticity(float(ratios.mean()), 1.96 * std / math.sqrt(n), n, n_zero)


def plasticity(f, x: torch.Tensor, y: torch.Tensor) -> Plasticity:
    """Plasticity of the map ``f`` over the pairs (x_i, y_i)."""
    ratios, n_zero = pair_ratios(f(x), f(y), x, y)
    return summarise(ratios, n_zero)
