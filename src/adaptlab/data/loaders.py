"""Readers for real image datasets on local disk, each returning uint8 (N, H, W, 3) images and int64 labels.

- CIFAR-10/100 **binary** batches (`cifar-10-batches-bin`, `cifar-100-binary`), parsed with numpy from the
  documented record layout; the Python-pickle release is deliberately not supported (never unpickle user files).
- ImageFolder trees (`root/<class>/<image>`), decoded with Pillow and resized to a fixed square size.
- `.npy` image/label arrays (the CIFAR-10-C layout), loaded with ``allow_pickle=False``.
- MNIST-family **idx** files (`train-images-idx3-ubyte[.gz]`, ...), parsed from the documented header; grey
  images are repeated to 3 channels (the prepared-dataset format is RGB).
- Downsampled ImageNet (Chrabaszcz et al. 2017, 16/32/64 px) from its **npz** release (`train_data_batch_*.npz`,
  `val_data.npz`), loaded with ``allow_pickle=False``; its other release is pickled batches and is not supported.

torchvision has CIFAR and ImageFolder readers, but its CIFAR one unpickles and its ImageFolder one decodes
lazily per item; a one-off numpy parse into the prepared-dataset file is simpler and safe.
"""
from __future__ import annotations

import importlib.util
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
    """Images under ``root/<class>/`` (sorted class names define the labels).

    The file list is gathered first and the images decoded into one preallocated array: a list of per-image
    arrays plus ``np.stack`` would hold every image twice (30 GB for ImageNet-1k train at 64 px).
    """
    root = _require(Path(root), "ImageFolder root")
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"ImageFolder root {root} has no class folders")
    files, ys = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for f in sorted(folder.rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
                ys.append(label)
    if not files:
        raise ValueError(f"ImageFolder root {root}: no images with extensions {sorted(IMAGE_EXTENSIONS)}")
    x = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        x[i] = _load_image(f, size)
    return x, np.asarray(ys, dtype=np.int64), classes


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


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits: ``load_digits()``'s ``data`` (1,797 × 64 grey levels 0–16, float64) and ``target``,
    read from the CSV file scikit-learn ships, as ``load_digits`` reads it, without importing scikit-learn (whose
    import brings in scipy.stats and pandas: 1.7 s of a job's start). Falls back to ``load_digits`` where the file
    is not where scikit-learn keeps it."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without running its __init__
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1], data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data, d.target


def read_digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 digits (1,797 images, shipped with the package), upsampled to ``size``."""
    import torch
    import torch.nn.functional as F

    data, target = sklearn_digits()
    x = torch.from_numpy(data.reshape(-1, 8, 8).astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = (x[:, 0, :, :, None].expand(-1, -1, -1, 3).numpy() * 255 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(x), target.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# MNIST idx files (http://yann.lecun.com/exdb/mnist/ layout: big-endian header, then raw uint8 data)

IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _idx_file(root: Path, stem: str) -> Path:
    """``stem`` or ``stem.gz`` (both layouts are common), also the ``stem`` with its '.' spelling
    (``train-images.idx3-ubyte``) of some mirrors."""
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"MNIST idx file: {root / stem}[.gz] does not exist")


def read_idx(path: str | Path) -> np.ndarray:
    """One idx file as a uint8 array of the shape its header declares."""
    import gzip

    path = Path(path)
    raw = (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")).read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header declares shape {shape} ({int(np.prod(shape))} bytes), file has {data.size}")
    return data.reshape(shape)


def read_mnist_idx(root: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{'train': (x, y), 'test': (x, y)}`` from the four idx files; x is (N, 28, 28, 3) grey repeated to RGB."""
    root = _require(Path(root), "MNIST idx folder")
    out = {}
    for split, (img_stem, lab_stem) in IDX_NAMES.items():
        img_path, lab_path = _idx_file(root, img_stem), _idx_file(root, lab_stem)
        x, y = read_idx(img_path), read_idx(lab_path)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{img_path} {x.shape} and {lab_path} {y.shape} are not N images and N labels")
        out[split] = (np.ascontiguousarray(np.repeat(x[..., None], 3, axis=-1)), y.astype(np.int64))
    return out


# ----------------------------------------------------------------------------------------------------------
# Downsampled ImageNet, npz release: each file holds `data` (N, 3·s·s) uint8 in CIFAR's channel-major order
# and `labels` (N,) in 1..1000.


def _npz_arrays(path: Path, keys: tuple[str, ...]) -> list[np.ndarray]:
    """The named arrays of an npz file, never unpickling (object arrays are refused with a clear message)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in keys if k not in f]
            if missing:
                raise ValueError(f"{path}: expected arrays {list(keys)}, found {sorted(f.files)}")
            return [np.asarray(f[k]) for k in keys]
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise ValueError(f"{path}: holds pickled objects, which are never loaded; use the npz release "
                             f"with plain arrays") from None
        raise


def _read_imagenet_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data, labels = _npz_arrays(path, ("data", "labels"))
    side = int(round((data.shape[-1] / 3) ** 0.5)) if data.ndim == 2 else 0
    if data.dtype != np.uint8 or data.ndim != 2 or 3 * side * side != data.shape[1] or len(labels) != len(data):
        raise ValueError(f"{path}: expected uint8 data (N, 3·s·s) and N labels, got {data.dtype} {data.shape}, "
                         f"{len(labels)} labels")
    if labels.min() < 1 or labels.max() > 1000:
        raise ValueError(f"{path}: labels must be in 1..1000 (the release is 1-based), got "
                         f"[{labels.min()}, {labels.max()}]")
    x = data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), labels.astype(np.int64) - 1


def read_downsampled_imagenet(root: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{'train': (x, y), 'test': (x, y)}`` from `train_data_batch_<i>.npz` (every i present, in order) and
    `val_data.npz` (the official validation set, used as test). Labels are 0-based."""
    root = _require(Path(root), "downsampled ImageNet folder")
    batches = sorted(root.glob("train_data_batch_*.npz"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not batches:
        raise FileNotFoundError(f"downsampled ImageNet train batches: {root}/train_data_batch_<i>.npz do not exist")
    # two passes so the train images are held once: the labels first (an npz member loads on its own), then
    # each file's images straight into the preallocated array
    sizes = [len(_npz_arrays(p, ("labels",))[0]) for p in batches]
    test = _read_imagenet_npz(_require(root / "val_data.npz", "downsampled ImageNet val file"))
    x = np.empty((sum(sizes),) + test[0].shape[1:], dtype=np.uint8)
    ys, i = [], 0
    for p, n in zip(batches, sizes):
        px, py = _read_imagenet_npz(p)
        if px.shape[1:] != x.shape[1:] or len(px) != n:
            raise ValueError(f"{p}: images {px.shape[1:]} do not match val_data.npz {x.shape[1:]}")
        x[i:i + n], i = px, i + n
        ys.append(py)
    return {"train": (x, np.concatenate(ys)), "test": test}
