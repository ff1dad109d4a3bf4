"""Linear-probing baseline: logistic regression on frozen features of the pretrained backbone.

Features as in the official code's tables: the last block's output (the residual stream before the final
LayerNorm), mean-pooled over tokens (CLS included), L2-normalised, then standardised (scikit-learn
StandardScaler fitted on train), then LogisticRegression. Trained on the train split, the accuracy reported on
val (for the record) and test. scikit-learn does the fitting; nothing here is hand-rolled.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from adaptlab.plasticity.components import embed


@torch.no_grad()
def features(model, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = model.blocks(embed(model, images[start:start + batch_size]))
        out.append(F.normalize(x.mean(dim=1).double(), dim=-1))
    return torch.cat(out).cpu().numpy()  # the model may sit on a GPU; scikit-learn fits on the host


def linear_probe(train: tuple[np.ndarray, np.ndarray], evals: dict[str, tuple[np.ndarray, np.ndarray]], *,
                 max_iter: int = 5000, C: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Fit on ``train`` = (features, labels); return the accuracy on each of ``evals``."""
    scaler = StandardScaler().fit(train[0])
    clf = LogisticRegression(max_iter=max_iter, C=C, random_state=seed).fit(scaler.transform(train[0]), train[1])
    return {name: float((clf.predict(scaler.transform(x)) == y).mean()) for name, (x, y) in evals.items()}
