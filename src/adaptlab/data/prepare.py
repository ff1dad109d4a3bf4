"""Turn a dataset entry of the config into a prepared dataset with seeded train/val/test splits.

Splits are seeded by the dataset's own ``seed``; validation is always carved from training data, so it is
never the test set. Procedural datasets render each split from its own random stream.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from adaptlab.data import loaders, procedural
from adaptlab.data.store import ImageDataset, save_dataset

PROCEDURAL_DEFAULTS = {
    "classes": 10, "class_seed": 0, "render": "fill", "labels": "class", "noise": 0.0, "contrast": 1.0,
    "image_size": 32, "n_train": 2000, "per_class": None, "n_val": 500, "n_test": 500, "seed": 0,
}


def split_indices(n: int, seed: int, *fracs: float) -> list[np.ndarray]:
    """A seeded permutation of range(n) cut into len(fracs) + 1 parts; part i has round(fracs[i] * n) items."""
    perm = np.random.default_rng(seed).permutation(n)
    sizes = [int(round(f * n)) for f in fracs]
    if sum(sizes) >= n or min(sizes, default=1) < 1:
        raise ValueError(f"cannot split {n} items into fractions {fracs} (each part needs at least one item)")
    cuts = np.cumsum(sizes)
    parts = np.split(perm, cuts)
    return parts[::-1]  # rest first: (rest, f_last, ..., f_first)


def _procedural(name: str, spec: dict) -> ImageDataset:
    p = {**PROCEDURAL_DEFAULTS, **spec}
    classes = procedural.class_table(p["classes"], p["class_seed"])
    labels_of, num_classes = procedural.label_map(classes, p["labels"])
    kw = dict(size=p["image_size"], render_mode=p["render"], noise=p["noise"], contrast=p["contrast"])
    train_ids = None
    n_train = p["n_train"]
    if p["per_class"]:
        rng = np.random.default_rng([p["seed"], 99])
        train_ids = np.concatenate([rng.choice(np.flatnonzero(labels_of == lab), p["per_class"])
                                    for lab in range(num_classes)])
        n_train = len(train_ids)
    x_tr, y_tr = procedural.render(classes, labels_of, n_train, seed=[p["seed"], 0], class_ids=train_ids, **kw)
    x_va, y_va = procedural.render(classes, labels_of, p["n_val"], seed=[p["seed"], 1], **kw)
    x_te, y_te = procedural.render(classes, labels_of, p["n_test"], seed=[p["seed"], 2], **kw)
    return ImageDataset(name, num_classes, x_tr, y_tr, x_va, y_va, x_te, y_te,
                        meta={"spec": p, "class_table": classes.tolist()})


def _three_way(name: str, x: np.ndarray, y: np.ndarray, num_classes: int, spec: dict, meta: dict) -> ImageDataset:
    train, val, test = split_indices(len(x), spec.get("seed", 0), spec.get("test_frac", 0.2), spec.get("val_frac", 0.2))
    return ImageDataset(name, num_classes, x[train], y[train], x[val], y[val], x[test], y[test], meta=meta)


def _with_val(name: str, train: tuple, test: tuple, num_classes: int, spec: dict, meta: dict) -> ImageDataset:
    (x, y), (x_te, y_te) = train, test
    tr, va = split_indices(len(x), spec.get("seed", 0), spec.get("val_frac", 0.2))
    return ImageDataset(name, num_classes, x[tr], y[tr], x[va], y[va], x_te, y_te, meta=meta)


def _digits(name: str, spec: dict, meta: dict) -> ImageDataset:
    x, y = loaders.read_digits(spec.get("image_size", 32))
    return _three_way(name, x, y, 10, spec, meta)


def _cifar10(name: str, spec: dict, meta: dict) -> ImageDataset:
    d = loaders.read_cifar10_binary(spec["path"])
    return _with_val(name, d["train"], d["test"], 10, spec, meta)


def _cifar100(name: str, spec: dict, meta: dict) -> ImageDataset:
    label = spec.get("label", "fine")
    d = loaders.read_cifar100_binary(spec["path"], label)
    return _with_val(name, d["train"], d["test"], 100 if label == "fine" else 20, spec, meta)


def _mnist(name: str, spec: dict, meta: dict) -> ImageDataset:
    d = loaders.read_mnist_idx(spec["path"])
    meta["grey"] = True  # the 3 channels are equal: continual benchmarks use one
    return _with_val(name, d["train"], d["test"], 10, spec, meta)


def _downsampled_imagenet(name: str, spec: dict, meta: dict) -> ImageDataset:
    d = loaders.read_downsampled_imagenet(spec["path"])
    return _with_val(name, d["train"], d["test"], 1000, spec, meta)


def _npy(name: str, spec: dict, meta: dict) -> ImageDataset:
    x, y = loaders.read_npy_pair(spec["images"], spec["labels"], spec.get("rows"))
    num_classes = spec.get("num_classes") or int(y.max()) + 1
    if y.max() >= num_classes:
        raise ValueError(f"{spec['labels']}: label {int(y.max())} >= num_classes {num_classes}")
    return _three_way(name, x, y, num_classes, spec, meta)


def build_dataset(name: str, spec: dict) -> ImageDataset:
    """Build the dataset ``name`` from its config entry. Raw-data paths are checked here, naming the key."""
    kind = spec["kind"]
    if kind not in DATASET_KINDS:
        raise ValueError(f"datasets.{name}.kind: unknown kind {kind!r}")
    try:
        return DATASET_KINDS[kind](name, spec, {"spec": spec})
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"datasets.{name} ({kind}): {err}") from err


def _image_folder(name: str, spec: dict, meta: dict) -> ImageDataset:
    root, size = Path(spec["path"]), spec.get("image_size", 64)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder root: {root} does not exist")
    if (root / "train").is_dir():
        x, y, classes = loaders.read_image_folder(root / "train", size)
        meta["classes"] = classes
        val = loaders.read_image_folder(root / "val", size, classes)[:2] if (root / "val").is_dir() else None
        if (root / "test").is_dir():
            test = loaders.read_image_folder(root / "test", size, classes)[:2]
            if val is not None:
                return ImageDataset(name, len(classes), x, y, *val, *test, meta=meta)
            return _with_val(name, (x, y), test, len(classes), spec, meta)
        if val is not None:  # official val split, test carved from train
            tr, te = split_indices(len(x), spec.get("seed", 0), spec.get("test_frac", 0.2))
            return ImageDataset(name, len(classes), x[tr], y[tr], *val, x[te], y[te], meta=meta)
        return _three_way(name, x, y, len(classes), spec, meta)
    x, y, classes = loaders.read_image_folder(root, size)
    meta["classes"] = classes
    return _three_way(name, x, y, len(classes), spec, meta)


def prepare_dataset(name: str, spec: dict, out_path: str | Path) -> ImageDataset:
    ds = build_dataset(name, spec)
    save_dataset(ds, out_path)
    return ds


# datasets.<name>.kind -> builder(name, spec, meta)
DATASET_KINDS = {"procedural": lambda name, spec, meta: _procedural(name, spec), "digits": _digits,
                 "cifar10": _cifar10, "cifar100": _cifar100, "npy": _npy, "imagefolder": _image_folder,
                 "mnist": _mnist, "downsampled_imagenet": _downsampled_imagenet}
