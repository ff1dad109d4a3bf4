"""ICL accuracy, context-label agreement and attention progress measures (shared/papers/icl.md §4).

Hand-written from the official analysis code, with its unimodal TLA bug fixed (N label slots, not 2N//3):

* ``cla``: fraction of predictions that are one of the labels shown in the context;
* ``ph``: previous-token strength, mean over t ≥ 1 of A[t, t-1] (``ph2``: A[t, t-2], multimodal);
* from the query row q = T-1, with label slots 2i+1 (unimodal) or 3i+2 (multimodal):
  ``tila`` mean A[q, label_i] over context labels equal to the target; ``ih`` (induction-head strength) =
  tila − the mean over the other labels; ``tla`` = Σ_i A[q, label_i]; ``tiia`` mean A[q, item_i] over items
  whose label is the target (multimodal: ``tiia_m1`` at 3i and ``tiia_m2`` at 3i+1).
Heads are averaged (the default model has one).
"""
from __future__ import annotations

import numpy as np
import torch


def slots(T: int, multimodal: bool) -> dict[str, np.ndarray]:
    """Positions of the context items and labels in a sequence of T tokens."""
    if multimodal:
        n = (T - 2) // 3
        return {"m1": 3 * np.arange(n), "m2": 3 * np.arange(n) + 1, "label": 3 * np.arange(n) + 2}
    n = (T - 1) // 2
    return {"item": 2 * np.arange(n), "label": 2 * np.arange(n) + 1}


def context_label_agreement(pred: np.ndarray, ctx_labels: np.ndarray) -> float:
    return float((ctx_labels == pred[:, None]).any(1).mean())


def attention_measures(attn: torch.Tensor, ctx_labels: np.ndarray, target: np.ndarray, multimodal: bool) -> dict[str, float]:
    """Progress measures of one layer; ``attn`` is (n, heads, T, T) or (n, T, T)."""
    A = attn.float()
    if A.dim() == 4:
        A = A.mean(1)
    A = A.cpu().numpy()
    n, T, _ = A.shape
    idx = slots(T, multimodal)
    out = {"ph": float(A[:, np.arange(1, T), np.arange(0, T - 1)].mean())}
    if multimodal:
        out["ph2"] = float(A[:, np.arange(2, T), np.arange(0, T - 2)].mean())
    q = A[:, -1]  # (n, T): the query's attention
    match = ctx_labels == target[:, None]  # (n, N)
    lab = q[:, idx["label"]]
    n_match, n_other = match.sum(1), (~match).sum(1)
    tila = np.where(n_match > 0, (lab * match).sum(1) / np.maximum(n_match, 1), 0.0)
    other = np.where(n_other > 0, (lab * ~match).sum(1) / np.maximum(n_other, 1), 0.0)
    out.update(tila=float(tila.mean()), ih=float((tila - other).mean()), tla=float(lab.sum(1).mean()))
    for key, name in (("item", "tiia"), ("m1", "tiia_m1"), ("m2", "tiia_m2")):
        if key in idx:
            it = q[:, idx[key]]
            out[name] = float(np.where(n_match > 0, (it * match).sum(1) / np.maximum(n_match, 1), 0.0).mean())
    return out
