"""The continual-learning plasticity benchmark: task sequences, models and the published baselines.

Task sequences (shared/papers/adamo.md §4):
- ``random`` labels: every task redraws y ~ U{0..C−1} on the same inputs (pure memorisation, the strongest
  plasticity-loss inducer; random-label CIFAR-10);
- ``permuted`` inputs: true labels, every task applies a fresh pixel permutation (a weaker effect; permuted MNIST);
- ``pairs``: continual ImageNet (Dohare et al. 2024): each task is a new binary problem between two random
  classes of a prepared dataset, with its own train images and held-out test images.
Inputs are ``gaussian`` (X ~ N(0, 1), n × dim), scikit-learn ``digits`` (8×8, standardised) or a prepared
``dataset`` of the config (MNIST, CIFAR-10, downsampled ImageNet, ...; grey datasets keep one channel). The
inputs and every task's labels/permutation/pair depend on the run's seed only, so all methods see the same
sequence.

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

from adaptlab.train import grouped
from adaptlab.train.adamo import coupled_isometry_loss, select_isometry, summed_isometry_penalty


# ----------------------------------------------------------------------------------------------------------
# Data


def _images(x_uint8: np.ndarray, grey: bool) -> torch.Tensor:
    """uint8 (n, H, W, 3) → float (n, C·H·W) in [0, 1], channel-major (C = 1 for grey datasets such as MNIST)."""
    x = torch.from_numpy(np.ascontiguousarray(x_uint8[..., :1] if grey else x_uint8))
    return x.permute(0, 3, 1, 2).reshape(len(x), -1).float().div_(255)


def load_dataset_inputs(bench: dict, seed: int, data_path) -> dict:
    """A prepared dataset (``datasets.<bench.dataset>``) as continual inputs: the train and test splits (uint8), the
    image shape (C, H, W) and a scalar mean/std, so that each task converts only its own images to float (the
    continual-ImageNet tasks draw from 1.28M images, 16 GB as float32)."""
    from adaptlab.data.store import load_dataset

    if data_path is None:
        raise ValueError(f"benchmark with inputs: dataset ({bench['dataset']!r}) needs its prepared dataset file")
    ds = load_dataset(data_path)
    grey = bool(ds.meta.get("grey"))
    shape = (1 if grey else 3,) + ds.x_train.shape[1:3]
    probe = ds.x_train[np.random.default_rng(0).permutation(len(ds.x_train))[:10_000]]
    ref = _images(probe, grey)
    return {"train": (ds.x_train, ds.y_train), "test": (ds.x_test, ds.y_test), "grey": grey, "shape": shape,
            "mean": ref.mean().item(), "std": ref.std().item(), "num_classes": ds.num_classes}


def input_shape(bench: dict, data_path=None) -> tuple[int | tuple, int]:
    """(the image shape value of ``load_inputs``, the number of true classes) without loading the images: a
    dataset's from its prepared file's header."""
    if bench["inputs"] != "dataset":
        return (0, 10) if bench["inputs"] == "gaussian" else (8, 10)
    import json

    from safetensors import safe_open

    with safe_open(str(data_path), framework="numpy") as fh:
        meta, (_, h, w, _) = fh.metadata(), fh.get_slice("x_train").get_shape()
    grey = bool(json.loads(meta["meta"]).get("grey"))
    return (1 if grey else 3, h, w), int(meta["num_classes"])


def load_inputs(bench: dict, seed: int, data_path=None) -> tuple[torch.Tensor, np.ndarray | None, int | tuple]:
    """(X (n, d) float32, the true labels or None, image shape: 0 for vectors, the side of a square grey image
    (digits), or (C, H, W)) for a benchmark of fixed inputs shared by all tasks."""
    rng = np.random.default_rng(seed)
    n = bench["n"]
    if bench["inputs"] == "gaussian":
        x = rng.standard_normal((n, bench["dim"]), dtype=np.float32)
        return torch.from_numpy(x), None, 0
    if bench["inputs"] == "dataset":
        d = load_dataset_inputs(bench, seed, data_path)
        x_all, y_all = d["train"]
        if n > len(x_all):
            raise ValueError(f"benchmark n={n} exceeds the {len(x_all)} training images of {bench['dataset']!r}")
        idx = np.sort(rng.permutation(len(x_all))[:n])
        x = (_images(x_all[idx], d["grey"]) - d["mean"]) / d["std"]
        return x, y_all[idx].astype(np.int64), d["shape"]
    from adaptlab.data.loaders import sklearn_digits

    data, target = sklearn_digits()
    idx = rng.permutation(len(target))[:n]
    x = data[idx].astype(np.float32)
    x = (x - x.mean()) / x.std()
    return torch.from_numpy(x), target[idx].astype(np.int64), 8


def image_shape(shape) -> tuple[int, int, int] | None:
    """(C, H, W) of ``load_inputs``' shape value (0: vectors → None; an int: a square grey image)."""
    if not shape:
        return None
    return (1, shape, shape) if isinstance(shape, int) else tuple(shape)


class ContinualTask:
    """One task of a sequence for the shared loop ``adaptlab.train.loop.fit``.

    Batches are drawn with replacement, a pure function of (seed, task, step). ``evaluate`` returns the
    accuracy on the task's full training set for the val split: memorising the task *is* the plasticity
    measure here. The test split is the same set, except for tasks with held-out images (``test``, the
    continual-ImageNet pairs), where it is those. ``loss`` also records the batch accuracy (online accuracy)
    and adds the method's regulariser.
    """

    selection_metric = "acc"

    def __init__(self, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor | None, seed: int, task: int,
                 image_side=0, regulariser=None, test: tuple[torch.Tensor, torch.Tensor] | None = None,
                 group_regulariser=None):
        shape = image_shape(image_side)
        if perm is not None:
            x = x[:, perm]
        self.x = x.reshape(len(x), *shape) if shape else x
        self.y, self.seed, self.task, self.regulariser = y, seed, task, regulariser
        self.group_regulariser = group_regulariser  # a fused group's runs' loss terms (``group_regulariser``)
        self.test = None if test is None else (test[0].reshape(len(test[0]), *shape) if shape else test[0], test[1])
        self.test_is_val = test is None  # the loop takes the best-val metrics as the test metrics then
        self.online: list[float] = []

    def batch_seed(self, step: int) -> int:
        return (self.seed * 1_000_003 + self.task) * 1_000_003 + step

    def train_batch(self, step: int, batch_size: int):
        idx = torch.randint(len(self.y), (batch_size,), generator=torch.Generator().manual_seed(self.batch_seed(step)))
        return self.x[idx], self.y[idx]

    @staticmethod
    def stacked_batches(tasks: list["ContinualTask"]):
        """``draw(step, batch_size)``: the stacked ``train_batch`` of a fused group's tasks (``train.fused``), each
        run's indices from its own seed as there, gathered in one op from the runs' inputs stacked once per task
        (an 18-run group's batch: 0.07 against 0.16 ms, 3 % of a preset MLP group's step). None when the tasks'
        sets differ in size (continual-ImageNet pairs): the group stacks the runs' own batches then."""
        if len({tuple(t.x.shape) for t in tasks}) > 1:
            return None
        x, y = torch.stack([t.x for t in tasks]), torch.stack([t.y for t in tasks])
        runs, n = x.shape[:2]
        flat_x, flat_y, gen = x.view(runs * n, *x.shape[2:]), y.view(-1), torch.Generator()
        offsets = torch.arange(0, runs * n, n).unsqueeze(1)

        def draw(step: int, batch_size: int):
            idx = torch.empty(runs, batch_size, dtype=torch.long)
            for r, t in enumerate(tasks):
                torch.randint(n, (batch_size,), generator=gen.manual_seed(t.batch_seed(step)), out=idx[r])
            flat = (idx + offsets).view(-1).to(x.device)
            return (flat_x.index_select(0, flat).view(runs, batch_size, *x.shape[2:]),
                    flat_y.index_select(0, flat).view(runs, batch_size))

        return draw

    @staticmethod
    def model_input(batch):
        """What the loss feeds the model (a fused pack's grouped forward computes it for all runs at once)."""
        return batch[0]

    def grouped_loss_and_aux(self, logits: torch.Tensor, batch, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``loss_and_aux`` of R fused runs from their stacked logits (R, B, C), labels (R, B) and stacked weights
        (each run's own loss terms: ``group_regulariser``): (losses, batch accuracies), each (R,)."""
        y = batch[1]
        loss = grouped.cross_entropy(logits, y)
        acc = (logits.argmax(-1) == y).float().mean(1)
        if self.group_regulariser is not None:
            loss = loss + self.group_regulariser(params)
        elif self.regulariser is not None:
            raise ValueError("a fused group's loss terms come from group_regulariser (each run's own method)")
        return loss, acc

    def loss_and_aux(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, the batch accuracy): no host sync, so that fused runs can vmap it (``train.fused.FusedRuns``)."""
        x, y = batch
        logits = model(x)
        acc = (logits.argmax(-1) == y).float().mean()
        loss = F.cross_entropy(logits, y)
        return (loss + self.regulariser(model) if self.regulariser is not None else loss), acc

    def take_aux(self, acc: float) -> None:
        self.online.append(acc)

    def checkpoint_state(self) -> dict:
        """The online accuracies so far: a run resumed inside the task averages all its steps, not the last ones."""
        return {"online": self.online}

    def load_checkpoint_state(self, state: dict) -> None:
        self.online = list(state["online"])

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        loss, acc = self.loss_and_aux(model, batch)
        self.take_aux(acc.item())
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, autocast=None) -> dict[str, float]:
        x, y = self.test if split == "test" and self.test is not None else (self.x, self.y)
        logits = torch.cat([model(x[i:i + 1024]) for i in range(0, len(x), 1024)])  # bounded activations
        return {"acc": (logits.argmax(-1) == y).float().mean().item(), "loss": F.cross_entropy(logits, y).item()}


def _pair_tasks(bench: dict, seed: int, n_tasks: int, data: dict):
    """Continual ImageNet (Dohare et al. 2024's protocol, our sizes): task t is the binary problem between two
    classes drawn at random (seeded by seed and t), labels 0/1, trained on ``per_class`` train images of each
    (all when unset) and tested on all their test images."""
    (x_tr, y_tr), (x_te, y_te) = data["train"], data["test"]
    by_class = {c: np.flatnonzero(y_tr == c) for c in range(data["num_classes"])}
    test_by_class = {c: np.flatnonzero(y_te == c) for c in range(data["num_classes"])}
    norm = lambda x: (_images(x, data["grey"]) - data["mean"]) / data["std"]  # noqa: E731
    for t in range(n_tasks):
        rng = np.random.default_rng([seed, 7_919, t])
        pair = rng.choice(data["num_classes"], 2, replace=False)
        tr = [rng.permutation(by_class[c])[:bench.get("per_class")] for c in pair]
        te = [test_by_class[c] for c in pair]
        if min(map(len, tr)) == 0 or min(map(len, te)) == 0:
            raise ValueError(f"benchmark {bench['dataset']!r}: class pair {pair.tolist()} of task {t} has no "
                             f"train or no test images")
        ids, tids = np.concatenate(tr), np.concatenate(te)
        y = torch.from_numpy(np.repeat([0, 1], [len(tr[0]), len(tr[1])]))
        yt = torch.from_numpy(np.repeat([0, 1], [len(te[0]), len(te[1])]))
        yield norm(x_tr[ids]), y, None, (norm(x_te[tids]), yt)


def task_sequence(bench: dict, seed: int, n_tasks: int, classes: int, data_path=None):
    """Yield (inputs, labels, permutation or None, held-out (inputs, labels) or None) for each task, a function
    of the seed only. Fixed-input benchmarks reuse the inputs of ``load_inputs`` in every task."""
    if bench["labels"] == "pairs":
        yield from _pair_tasks(bench, seed, n_tasks, load_dataset_inputs(bench, seed, data_path))
        return
    x, true_y, shape = load_inputs(bench, seed, data_path)
    img = image_shape(shape)
    for t in range(n_tasks):
        g = torch.Generator().manual_seed(seed * 7_919 + t + 1)
        if bench["labels"] == "random":
            yield x, torch.randint(classes, (len(x),), generator=g), None, None
        else:  # a pixel permutation, the same in every channel
            pix = img[1] * img[2] if img else x.shape[1]
            perm = torch.randperm(pix, generator=g)
            if img and img[0] > 1:
                perm = torch.cat([c * pix + perm for c in range(img[0])])
            yield x, torch.from_numpy(true_y), perm, None


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


@grouped.register(MLP)
def _mlp_grouped(mlp: MLP, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits (R, B, classes) of R stacked MLPs on x (R, B, ...): a fused run pack's forward (train.grouped)."""
    h = x.flatten(2)
    for i, act in enumerate(mlp.acts):
        h = act(grouped.linear(h, p[f"layers.{i}.weight"], p[f"layers.{i}.bias"]))
    return grouped.linear(h, p["head.weight"], p["head.bias"])


def build_model(model_cfg: dict, in_dim: int, image_side, classes: int) -> nn.Module:
    """``image_side``: the shape value of ``load_inputs`` (a ViT needs an image)."""
    if model_cfg["kind"] == "mlp":
        return MLP(in_dim, model_cfg["width"], model_cfg["depth"], classes)
    from timm.models.vision_transformer import VisionTransformer

    shape = image_shape(image_side)
    if shape is None or shape[1] != shape[2] or shape[1] % model_cfg["patch_size"]:
        raise ValueError(f"continual vit model: needs square images whose side the patch_size "
                         f"{model_cfg['patch_size']} divides, got inputs of shape {shape}")
    vit = VisionTransformer(img_size=shape[1], patch_size=model_cfg["patch_size"], in_chans=shape[0], num_classes=classes,
                            embed_dim=model_cfg["width"], depth=model_cfg["depth"], num_heads=model_cfg["num_heads"],
                            mlp_ratio=model_cfg["mlp_ratio"], qkv_bias=True, class_token=False, global_pool="avg",
                            act_layer=nn.ReLU)
    vit.features = lambda x: vit.forward_head(vit.forward_features(x), pre_logits=True)
    vit.units = lambda: [(f"blocks.{i}.mlp", b.mlp.act, b.mlp.fc1, b.mlp.fc2) for i, b in enumerate(vit.blocks)]
    return vit


# ----------------------------------------------------------------------------------------------------------
# Methods: what a method adds to the loss and does at task boundaries


def make_regulariser(method: dict, model: nn.Module, patterns, exclude):
    """The method's loss term over ``model``'s weights (coupled isometry, L2-init), or None."""
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


def group_regulariser(methods: list[dict], models: list[nn.Module], patterns, exclude, device=None):
    """The loss terms of a fused group's runs over their stacked weights ({name: (R, ...)} on ``device``): (R,)
    values, each run's own method's terms (``make_regulariser``: its coupled-isometry λ, its L2-init λ and θ₀, taken
    from ``models`` now) and 0 for a run without one. Each term is computed on the slices of the runs that have it
    only: a coupled isometry penalty costs a Gram of every matrix. None when no run has a term."""
    coupled = [r for r, m in enumerate(methods) if m["coupled_lambda"]]
    l2 = [r for r, m in enumerate(methods) if m["l2_init"]]
    scales = sorted({methods[r]["isometry_scale"] for r in coupled})
    if len(scales) > 1:  # continual.run.fuse_key keeps the scale a shared value
        raise ValueError(f"fused coupled-isometry runs must share isometry_scale, got {scales}")
    named = [dict(m.named_parameters()) for m in models]
    init = {n: torch.stack([named[r][n].detach() for r in l2]).to(device) for n in named[0]} if l2 else {}
    terms = []  # (runs, method key of their λ, the weights the term reads, the term over those runs' stacked weights)
    if coupled:
        chosen = select_isometry(models[0].named_parameters(), patterns, exclude)
        terms.append((coupled, "coupled_lambda", set(chosen),
                      lambda w: summed_isometry_penalty(w, chosen, scales[0], batch_dims=1)))
    if l2:
        terms.append((l2, "l2_init", set(init), lambda w: sum(((p - init[n]) ** 2).flatten(1).sum(1)
                                                              for n, p in w.items())))
    if not terms:
        return None
    terms = [(torch.tensor(rows, device=device), torch.tensor([float(methods[r][key]) for r in rows], device=device),
              reads, term) for rows, key, reads, term in terms]

    def regulariser(params: dict[str, torch.Tensor]) -> torch.Tensor:
        total = next(iter(params.values())).new_zeros(len(methods))
        for idx, lam, reads, term in terms:
            w = {n: p.index_select(0, idx) for n, p in params.items() if n in reads}
            total = total.index_add(0, idx, lam * term(w))
        return total

    return regulariser


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
        mask = mask.to(inc.weight.device)  # masks restored from a checkpoint are on the CPU
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
