"""Readers for real image datasets on local disk, each returning uint8 (N, H, W, 3) images and int64 labels.

- CIFAR-10/100 **binary** batches (`cifar-10-batches-bin`, `cifar-100-binary`), parsed with numpy from the
  documented record layout; the Python-pickle release is deliberately not supported (never unpickle user files).
- ImageFolder trees (`root/<class>/<image>`), decoded with Pillow and resized to a fixed square size.
- `.npy` image/label arrays (the CIFAR-10-C layout), loaded with ``allow_pickle=False``.

torchvision has CIFAR and ImageFolder readers, but its CIFAR one unpickles and its ImageFolder one decodes
lazily per item; a one-off numpy parse into the prepared-dataset file is simpler and safe.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp"}


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    return path


def _read_records(path: Path, n_label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    record = n_label_bytes + 3072
    raw = np.fromfile(_require(path, "CIFAR batch file"), dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise ValueError(f"{path}: size {raw.size} bytes is not a multiple of the {record}-byte CIFAR record")
    raw = raw.reshape(-1, record)
    images = raw[:, n_label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), raw[:, :n_label_bytes].astype(np.int64)


def read_cifar10_binary(root: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{'train': (x, y), 'test': (x, y)}`` from `data_batch_{1..5}.bin` and `test_batch.bin`."""
    root = _require(Path(root), "CIFAR-10 binary folder")
    parts = [_read_records(root / f"data_batch_{i}.bin", 1) for i in range(1, 6)]
    x_test, y_test = _read_records(root / "test_batch.bin", 1)
    return {
        "train": (np.concatenate([p[0] for p in parts]), np.concatenate([p[1][:, 0] for p in parts])),
        "test": (x_test, y_test[:, 0]),
    }


def read_cifar100_binary(root: str | Path, label: str = "fine") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{'train': (x, y), 'test': (x, y)}`` from `train.bin` / `test.bin` (coarse byte, fine byte, pixels)."""
    root = _require(Path(root), "CIFAR-100 binary folder")
    col = {"coarse": 0, "fine": 1}[label]
    out = {}
    for split in ("train", "test"):
        x, y = _read_records(root / f"{split}.bin", 2)
        out[split] = (x, y[:, col])
    return out


def _load_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)  # resize the shorter side, then centre-crop
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def read_image_folder(root: str | Path, size: int, classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images under ``root/<class>/`` (sorted class names define the labels)."""
    root = _require(Path(root), "ImageFolder root")
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"ImageFolder root {root} has no class folders")
    xs, ys = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for f in sorted(folder.rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                xs.append(_load_image(f, size))
                ys.append(label)
    if not xs:
        raise ValueError(f"ImageFolder root {root}: no images with extensions {sorted(IMAGE_EXTENSIONS)}")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes


def read_npy_pair(images: str | Path, labels: str | Path, rows: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    x = np.load(_require(Path(images), "npy images"), allow_pickle=False, mmap_mode="r")
    y = np.load(_require(Path(labels), "npy labels"), allow_pickle=False)
    if len(x) != len(y):
        raise ValueError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    if rows is not None:
        start, stop = rows
        if not 0 <= start < stop <= len(x):
            raise ValueError(f"rows [{start}, {stop}) outside the {len(x)} rows of {images}")
        x, y = x[start:stop], y[start:stop]
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{images}: expected (N, H, W, 3) images, got shape {x.shape}")
    if x.dtype != np.uint8:  # a silent cast would turn [0, 1] floats into 0s and 1s
        raise ValueError(f"{images}: expected uint8 images, got {x.dtype}")
    return x, y.astype(np.int64)


def read_digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 digits (1,797 images, shipped with the package), upsampled to ``size``."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = (x[:, 0, :, :, None].expand(-1, -1, -1, 3).numpy() * 255 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(x), d.target.astype(np.int64)
