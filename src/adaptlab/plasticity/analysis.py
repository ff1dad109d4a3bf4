"""Plasticity analysis of one backbone on one downstream dataset: the rows of ``plasticity_layers``.

Pair i = (i-th source test image, i-th downstream test image), both in file order, as in the official code
(unshuffled loaders); the shorter test set is cycled to reach ``n_pairs``. Every component of every block is
probed on the same embedding outputs X_i = E(a_i), Y_i = E(b_i) (see ``components``). The MHA bound uses the
token radius r measured on these embeddings: the max token norm by default (the bound then really bounds),
or the mean token norm (``radius="mean"``, the official code's heuristic r = 19.4 for ViT-B/16 on CIFAR-10).
"""
from __future__ import annotations

import torch

from adaptlab.plasticity.bounds import component_bound
from adaptlab.plasticity.components import COMPONENTS, THEORETICAL_RANK, embed, probe
from adaptlab.plasticity.estimator import pair_ratios, summarise


def paired_indices(n_source: int, n_target: int, n_pairs: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    n = n_pairs or max(n_source, n_target)
    i = torch.arange(n)
    return i % n_source, i % n_target


@torch.no_grad()
def analyse(model, source_images: torch.Tensor, target_images: torch.Tensor, *, fc2_input: str = "padded",
            radius: str = "max", batch_size: int = 256) -> tuple[list[dict], dict]:
    """Per-layer plasticity, 95 % CI, pairs and bound of every component; and run-level stats (radius, pairs).

    ``source_images`` and ``target_images`` are the already paired, normalised model inputs (N, 3, H, W).
    """
    model.eval()
    ratios = {(l, c): [] for l in range(len(model.blocks)) for c in COMPONENTS}
    zeros = {key: 0 for key in ratios}
    norms_max, norms_sum, n_tokens_total, n_tokens = 0.0, 0.0, 0, None
    for start in range(0, len(source_images), batch_size):
        x = embed(model, source_images[start:start + batch_size])
        y = embed(model, target_images[start:start + batch_size])
        tok = torch.cat([x, y]).double().norm(dim=-1)
        norms_max, norms_sum, n_tokens_total = max(norms_max, float(tok.max())), norms_sum + float(tok.sum()), n_tokens_total + tok.numel()
        n_tokens = x.shape[1]
        for l, block in enumerate(model.blocks):
            for c in COMPONENTS:
                r, z = pair_ratios(probe(block, c, x, fc2_input), probe(block, c, y, fc2_input), x, y)
                ratios[(l, c)].append(r)
                zeros[(l, c)] += z
    r_value = norms_max if radius == "max" else norms_sum / max(1, n_tokens_total)
    rows = []
    for (l, c), parts in ratios.items():
        p = summarise(torch.cat(parts), zeros[(l, c)])
        rows.append({"layer": l, "component": c, "theoretical_rank": THEORETICAL_RANK[c], "plasticity": p.mean,
                     "ci95": p.ci95, "n_pairs": p.n_pairs, "n_zero": p.n_zero,
                     "bound": component_bound(model.blocks[l], c, n_tokens, r_value)})
    return rows, {"radius": r_value, "radius_kind": radius, "n_tokens": n_tokens, "n_pairs": len(source_images)}
