"""The prepared-dataset file: one safetensors file per dataset with uint8 images and int64 labels per split.

safetensors rather than .npz/.pt: it cannot execute code on load, and it memory-maps, so a 50k-image
CIFAR file opens instantly in every finetuning job.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

SPLITS = ("train", "val", "test")


@dataclass
class ImageDataset:
    """Images (N, H, W, 3) uint8 and labels (N,) int64 for the train, val and test splits."""

    name: str
    num_classes: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    meta: dict = field(default_factory=dict)

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (expected one of {SPLITS})")
        return getattr(self, f"x_{split}"), getattr(self, f"y_{split}")

    def __post_init__(self):
        for s in SPLITS:
            x, y = getattr(self, f"x_{s}"), getattr(self, f"y_{s}")
            if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
                raise ValueError(f"dataset {self.name!r}: x_{s} must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
            if y.shape != (len(x),):
                raise ValueError(f"dataset {self.name!r}: y_{s} has shape {y.shape}, expected ({len(x)},)")
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(f"dataset {self.name!r}: labels of {s} outside [0, {self.num_classes})")


def save_dataset(ds: ImageDataset, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for s in SPLITS:
        x, y = ds.split(s)
        tensors[f"x_{s}"] = np.ascontiguousarray(x)
        tensors[f"y_{s}"] = np.ascontiguousarray(y.astype(np.int64))
    meta = {"name": ds.name, "num_classes": str(ds.num_classes), "meta": json.dumps(ds.meta, sort_keys=True)}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_dataset(path: str | Path) -> ImageDataset:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prepared dataset not found: {path}")
    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata()
    t = load_file(str(path))
    return ImageDataset(name=meta["name"], num_classes=int(meta["num_classes"]), meta=json.loads(meta["meta"]),
                        **{k: t[k] for k in (f"{p}_{s}" for s in SPLITS for p in "xy")})
