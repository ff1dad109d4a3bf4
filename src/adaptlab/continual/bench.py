"""The continual-learning plasticity benchmark: task sequences, models and the published baselines.

Task sequences on fixed inputs (shared/papers/adamo.md §4):
- ``random`` labels: every task redraws y ~ U{0..C−1} on the same inputs (pure memorisation, the strongest
  plasticity-loss inducer);
- ``permuted`` inputs: true labels, every task applies a fresh pixel permutation (a weaker effect).
Inputs are ``gaussian`` (X ~ N(0, 1), n × dim) or scikit-learn ``digits`` (8×8, standardised). The inputs and
every task's labels/permutation depend on the run's seed only, so all methods see the same sequence.

Models: a ReLU MLP (``layers.i`` hidden Linear layers, ``head``) and a tiny timm ViT on 8×8 single-channel
images with a ReLU MLP in each block (so dead units are defined as in the MLP).

Baselines (hand-written: each is a few lines on top of the loop, no maintained library packages them):
- Shrink & Perturb (Ash & Adams 2020): at every task boundary θ ← α·θ + σ·θ_fresh, θ_fresh a new init.
- ReDo (Sokar et al. 2023): at every task boundary the τ-dormant units of each hidden layer get a fresh
  incoming row (and zero bias), a zero outgoing column, and their Adam moments are zeroed.
  The paper's ReDo resets every F steps; at task boundaries is this benchmark's reading (config: ``redo_tau``).
- L2-init (Kumar et al. 2023): λ‖θ − θ_0‖² added to the loss.
Adam + L2 is torch Adam's (coupled) ``weight_decay``; AdamW is decoupled decay; the coupled isometry variant
adds ``adaptlab.train.adamo.coupled_isometry_loss`` to the loss.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from adaptlab.train.adamo import coupled_isometry_loss


# ----------------------------------------------------------------------------------------------------------
# Data


def load_inputs(bench: dict, seed: int) -> tuple[torch.Tensor, np.ndarray | None, int]:
    """(X (n, d) float32, the true labels or None, side of the square image or 0) for a benchmark spec."""
    rng = np.random.default_rng(seed)
    n = bench["n"]
    if bench["inputs"] == "gaussian":
        x = rng.standard_normal((n, bench["dim"]), dtype=np.float32)
        return torch.from_numpy(x), None, 0
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = rng.permutation(len(d.target))[:n]
    x = d.data[idx].astype(np.float32)
    x = (x - x.mean()) / x.std()
    return torch.from_numpy(x), d.target[idx].astype(np.int64), 8


class ContinualTask:
    """One task of a sequence for the shared loop ``adaptlab.train.loop.fit``.

    Batches are drawn with replacement, a pure function of (seed, task, step). ``evaluate`` returns the
    accuracy on the task's full training set for both splits: memorising the task *is* the plasticity
    measure here, so there is no held-out split. ``loss`` also records the batch accuracy (online accuracy)
    and adds the method's regulariser.
    """

    selection_metric = "acc"

    def __init__(self, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor | None, seed: int, task: int,
                 image_side: int = 0, regulariser=None):
        if perm is not None:
            x = x[:, perm]
        self.x = x.reshape(len(x), 1, image_side, image_side) if image_side else x
        self.y, self.seed, self.task, self.regulariser = y, seed, task, regulariser
        self.online: list[float] = []

    def train_batch(self, step: int, batch_size: int):
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.task) * 1_000_003 + step)
        idx = torch.randint(len(self.y), (batch_size,), generator=g)
        return self.x[idx], self.y[idx]

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        self.online.append((logits.argmax(-1) == y).float().mean().item())
        loss = F.cross_entropy(logits, y)
        return loss + self.regulariser(model) if self.regulariser is not None else loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, autocast=None) -> dict[str, float]:
        logits = model(self.x)
        return {"acc": (logits.argmax(-1) == self.y).float().mean().item(),
                "loss": F.cross_entropy(logits, self.y).item()}


def task_sequence(bench: dict, seed: int, n_tasks: int, classes: int):
    """Yield (labels, permutation or None) for each task, a function of the seed only."""
    x, true_y, _ = load_inputs(bench, seed)
    for t in range(n_tasks):
        g = torch.Generator().manual_seed(seed * 7_919 + t + 1)
        if bench["labels"] == "random":
            yield torch.randint(classes, (len(x),), generator=g), None
        else:
            yield torch.from_numpy(true_y), torch.randperm(x.shape[1], generator=g)


# ----------------------------------------------------------------------------------------------------------
# Models


class MLP(nn.Module):
    def __init__(self, in_dim: int, width: int, depth: int, classes: int):
        super().__init__()
        dims = [in_dim] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer, act in zip(self.layers, self.acts):
            x = act(layer(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def units(self):
        """(layer name, activation module, incoming Linear, outgoing Linear) of each hidden layer."""
        outs = list(self.layers[1:]) + [self.head]
        return [(f"layers.{i}", a, l, o) for i, (a, l, o) in enumerate(zip(self.acts, self.layers, outs))]


def build_model(model_cfg: dict, in_dim: int, image_side: int, classes: int) -> nn.Module:
    if model_cfg["kind"] == "mlp":
        return MLP(in_dim, model_cfg["width"], model_cfg["depth"], classes)
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=image_side, patch_size=model_cfg["patch_size"], in_chans=1, num_classes=classes,
                            embed_dim=model_cfg["width"], depth=model_cfg["depth"], num_heads=model_cfg["num_heads"],
                            mlp_ratio=model_cfg["mlp_ratio"], qkv_bias=True, class_token=False, global_pool="avg",
                            act_layer=nn.ReLU)
    vit.features = lambda x: vit.forward_head(vit.forward_features(x), pre_logits=True)
    vit.units = lambda: [(f"blocks.{i}.mlp", b.mlp.act, b.mlp.fc1, b.mlp.fc2) for i, b in enumerate(vit.blocks)]
    return vit


# ----------------------------------------------------------------------------------------------------------
# Methods: what a method adds to the loss and does at task boundaries


def make_regulariser(method: dict, model: nn.Module, patterns, exclude):
    """The method's loss term (coupled isometry, L2-init) or None."""
    terms = []
    if method["coupled_lambda"]:
        lam, scale = method["coupled_lambda"], method["isometry_scale"]
        terms.append(lambda m: coupled_isometry_loss(m.named_parameters(), lam, scale, patterns, exclude))
    if method["l2_init"]:
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        lam = method["l2_init"]
        terms.append(lambda m: lam * sum(((p - init[n]) ** 2).sum() for n, p in m.named_parameters()))
    if not terms:
        return None
    return lambda m: sum(t(m) for t in terms)


@torch.no_grad()
def shrink_perturb(model: nn.Module, fresh: nn.Module, shrink: float, perturb: float) -> None:
    for p, q in zip(model.parameters(), fresh.parameters()):
        p.mul_(shrink).add_(q, alpha=perturb)


@torch.no_grad()
def redo_reset(model: nn.Module, fresh: nn.Module, opt: torch.optim.Optimizer, dormant: dict[str, torch.Tensor]) -> int:
    """Reinitialise the dormant units (masks per layer name); return how many were reset."""
    fresh_units = {name: (inc, out) for name, _, inc, out in fresh.units()}
    n = 0
    for name, _, inc, out in model.units():
        mask = dormant.get(name)
        if mask is None or not mask.any():
            continue
        n += int(mask.sum())
        f_inc = fresh_units[name][0]
        inc.weight[mask] = f_inc.weight[mask]
        inc.bias[mask] = 0.0
        out.weight[:, mask] = 0.0
        for p, sl in ((inc.weight, (mask,)), (inc.bias, (mask,)), (out.weight, (slice(None), mask))):
            for key in ("exp_avg", "exp_avg_sq"):
                if key in opt.state.get(p, {}):
                    opt.state[p][key][sl] = 0.0
    return n
