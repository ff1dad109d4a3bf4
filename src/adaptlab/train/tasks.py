"""Tasks plug a dataset and a loss into the shared training loop.

A task is anything with ``train_batch(step)``, ``loss(model, batch)``, ``evaluate(model, split)`` and a
``selection_metric`` (higher is better). Batches are a pure function of (seed, step): the loop needs no
data-loader state to resume a killed run exactly where it stopped.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from adaptlab.data.store import ImageDataset
from adaptlab.train import grouped


class ImageClassification:
    """Cross-entropy classification on a prepared image dataset, resized on the fly to the model's input."""

    selection_metric = "acc"

    def __init__(self, data: ImageDataset, img_size: int, device: torch.device, seed: int, *,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), eval_batch_size: int = 256, hflip: bool = False):
        self.data, self.img_size, self.device, self.seed = data, img_size, device, seed
        self.eval_batch_size, self.hflip = eval_batch_size, hflip
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        # uint8 NHWC stays on the device; normalisation happens per batch (4× less memory than float)
        self._x = {s: torch.from_numpy(np.ascontiguousarray(data.split(s)[0])).to(device) for s in ("train", "val", "test")}
        self._y = {s: torch.from_numpy(data.split(s)[1]).to(device) for s in ("train", "val", "test")}
        self._perm_epoch, self._perm = -1, None

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def _prepare(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = x_uint8.permute(0, 3, 1, 2).float().div_(255)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def inputs(self, split: str, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised model inputs of a split (rows ``idx``, in file order), e.g. for probes and frozen features."""
        x = self._x[split]
        return self._prepare(x if idx is None else x[idx.to(x.device)])

    def labels(self, split: str) -> torch.Tensor:
        return self._y[split]

    def _batch_indices(self, step: int, batch_size: int) -> torch.Tensor:
        """Shuffled epochs with drop_last, each epoch's order seeded by (seed, epoch)."""
        n = len(self._y["train"])
        per_epoch = n // batch_size
        if per_epoch == 0:
            raise ValueError(f"batch_size {batch_size} exceeds the {n} training images of {self.data.name!r}")
        epoch, k = divmod(step, per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(n, generator=g).to(self.device), epoch
        return self._perm[k * batch_size:(k + 1) * batch_size]

    def _flips(self, step: int, n: int) -> torch.Tensor | None:
        """Which images of the step's batch to flip horizontally (None without ``hflip``), seeded by (seed, step)."""
        if not self.hflip:
            return None
        g = torch.Generator().manual_seed(self.seed * 7_000_003 + step)
        return (torch.rand(n, generator=g) < 0.5).to(self.device).view(-1, 1, 1, 1)

    def train_batch(self, step: int, batch_size: int):
        idx = self._batch_indices(step, batch_size)
        x = self._prepare(self._x["train"][idx])
        flip = self._flips(step, len(idx))
        if flip is not None:
            x = torch.where(flip, x.flip(-1), x)
        return x, self._y["train"][idx]

    def loss(self, model: torch.nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x).float(), y)

    @staticmethod
    def model_input(batch):
        """What the loss feeds the model (a fused pack's grouped forward computes it for all runs at once)."""
        return batch[0]

    @staticmethod
    def grouped_loss(logits: torch.Tensor, batch, params: dict) -> torch.Tensor:
        """``loss`` of R fused runs from their stacked logits (R, B, C) and labels (R, B): one value per run."""
        return grouped.cross_entropy(logits, batch[1])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str, autocast=None) -> dict[str, float]:
        """Sample-weighted accuracy and mean loss over the whole split."""
        was_training = model.training
        model.eval()
        x_all, y_all = self._x[split], self._y[split]
        correct, loss_sum = 0, 0.0
        for i in range(0, len(y_all), self.eval_batch_size):
            x = self._prepare(x_all[i:i + self.eval_batch_size])
            y = y_all[i:i + self.eval_batch_size]
            with autocast() if autocast else torch.no_grad():
                logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
        model.train(was_training)
        n = max(1, len(y_all))
        return {"acc": correct / n, "loss": loss_sum / n}
