"""Instance-segmentation data: the prepared ``SegDataset`` file, procedural multi-object images and COCO-format
datasets from a local path.

- Procedural: ``render_instances`` draws 1–3 shapes per image with ``adaptlab.data.procedural``'s shape masks and
  textures. ``domain="source"``: coloured, textured shapes on a smooth gradient. ``domain="shifted"``: an
  "X-ray-like" target domain: grey, inverted, each object an additive density on textured clutter plus noise.
  Later objects occlude earlier ones, so instance masks are the visible parts and never overlap.
- COCO: reads the standard annotation JSON (``images``, ``annotations``, ``categories``) and the image files; masks
  come from polygons or RLE via ``pycocotools.mask`` (crowd annotations are skipped, as COCO training does). Images
  and masks are resized to one square ``image_size`` (bilinear / nearest, no crop, so every instance stays whole);
  categories are renumbered 0..C-1 in ascending id order; per image at most ``max_instances`` of the largest
  instances are kept. Never downloads: every path is local and checked, and a malformed file fails with a
  message naming it.

  Split rules (validation is never the test set): train + val + test files as given; train + val files → val is
  the test split and validation is carved from train (``val_frac``); train only → a seeded three-way split.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaptlab.data import procedural
from adaptlab.data.prepare import split_indices

SEG_SPLITS = ("train", "val", "test")
DEFAULT_SHAPES = ("circle", "square", "triangle", "cross")


# ------------------------------------------------------------------------------------------------ dataset


@dataclass
class SegDataset:
    """Per split: images (N, S, S, 3) uint8, masks (N, K, S, S) uint8, labels (N, K) int64 (-1 = no instance)."""

    name: str
    classes: list
    splits: dict  # split -> (images, masks, labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, split: str):
        return self.splits[split]

    def __post_init__(self):
        for s, (x, m, y) in self.splits.items():
            if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
                raise ValueError(f"seg dataset {self.name!r}: {s} images must be uint8 (N, S, S, 3), got {x.dtype} {x.shape}")
            if m.shape[:2] != y.shape or m.shape[0] != x.shape[0] or m.shape[2:] != x.shape[1:3]:
                raise ValueError(f"seg dataset {self.name!r}: {s} masks {m.shape} / labels {y.shape} do not fit images {x.shape}")
            if y.size and (y.max() >= self.num_classes or y.min() < -1):
                raise ValueError(f"seg dataset {self.name!r}: {s} labels outside [-1, {self.num_classes})")


def save_seg_dataset(ds: SegDataset, path: str | Path) -> None:
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for s, (x, m, y) in ds.splits.items():
        tensors.update({f"images_{s}": np.ascontiguousarray(x), f"masks_{s}": np.ascontiguousarray(m.astype(np.uint8)),
                        f"labels_{s}": np.ascontiguousarray(y.astype(np.int64))})
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={"name": ds.name, "classes": json.dumps(list(ds.classes))})
    os.replace(tmp, path)


def load_seg_dataset(path: str | Path) -> SegDataset:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata()
    t = load_file(str(path))
    splits = {s: (t[f"images_{s}"], t[f"masks_{s}"], t[f"labels_{s}"]) for s in SEG_SPLITS}
    return SegDataset(meta["name"], json.loads(meta["classes"]), splits)


# ------------------------------------------------------------------------------------------------ procedural


def render_instances(n: int, size: int, seed, *, domain: str = "source", shapes=DEFAULT_SHAPES, min_objects: int = 1,
                     max_objects: int = 3, noise: float = 0.0, min_area: int = 4):
    """``n`` images with 1..max_objects shapes each; returns (images, masks (n, max_objects, S, S), labels)."""
    if domain not in ("source", "shifted"):
        raise ValueError(f"render_instances: unknown domain {domain!r} (source, shifted)")
    unknown = [s for s in shapes if s not in procedural.SHAPES]
    if unknown:
        raise ValueError(f"render_instances: unknown shapes {unknown} (known: {procedural.SHAPES})")
    rng = np.random.default_rng(seed)
    shape_ids = np.array([procedural.SHAPES.index(s) for s in shapes])
    n_obj = rng.integers(min_objects, max_objects + 1, size=n)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    masks = np.zeros((n, max_objects, size, size), dtype=bool)
    labels = np.full((n, max_objects), -1, dtype=np.int64)
    for k in range(max_objects):
        cls = rng.integers(0, len(shapes), size=n)
        radius = size * rng.uniform(0.14, 0.26, size=n)
        cx, cy = rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)
        theta = rng.uniform(-0.4, 0.4, size=n)
        dx = (x[None] - cx[:, None, None]) / radius[:, None, None]
        dy = (y[None] - cy[:, None, None]) / radius[:, None, None]
        c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
        active = k < n_obj
        masks[:, k] = procedural._shape_mask(shape_ids[cls], c * dx + s * dy, -s * dx + c * dy) & active[:, None, None]
        labels[:, k] = np.where(active, cls, -1)
    # occlusion: later objects lie on top; an instance's mask is what stays visible
    for k in range(max_objects - 1):
        masks[:, k] &= ~masks[:, k + 1:].any(1)
    small = masks.sum((2, 3)) < min_area
    masks[small], labels[small] = False, -1

    grad = rng.uniform(-0.15, 0.15, size=(n, 1, 1, 2))
    if domain == "source":
        img = rng.uniform(0.05, 0.45, size=(n, 1, 1, 3)) + grad[..., :1] * (x[None, ..., None] / size - 0.5) \
            + grad[..., 1:] * (y[None, ..., None] / size - 0.5) + rng.normal(0, 0.03, size=(n, size, size, 3))
        palette = np.asarray(list(procedural.COLOURS.values()), dtype=np.float32)
        for k in range(max_objects):
            base = np.clip(palette[rng.integers(0, len(palette), size=n)] + rng.normal(0, 0.06, size=(n, 3)), 0, 1)
            tex = procedural._texture(rng.integers(0, 4, size=n), x.astype(np.int64), y.astype(np.int64),
                                      max(2, size // 8), rng.integers(0, 8, size=n))
            fg = base[:, None, None, :] * (0.55 + 0.45 * tex[..., None])
            img = np.where(masks[:, k, ..., None], fg, img)
    else:
        # X-ray-like: textured clutter, objects as additive densities, inverted grey
        clutter = procedural._texture(rng.integers(1, 4, size=n), x.astype(np.int64), y.astype(np.int64),
                                      max(2, size // 5), rng.integers(0, 8, size=n))
        dens = 0.1 + 0.08 * clutter + rng.normal(0, 0.04, size=(n, size, size))
        for k in range(max_objects):
            dens = dens + masks[:, k] * rng.uniform(0.2, 0.45, size=(n, 1, 1))
        img = np.repeat((1.0 - dens)[..., None], 3, axis=-1) * np.array([0.95, 0.98, 1.0])
    if noise > 0:
        img = img + rng.normal(0, noise, size=img.shape)
    img = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return img, masks.astype(np.uint8), labels


def procedural_seg_dataset(name: str, spec: dict) -> SegDataset:
    p = {"domain": "source", "shapes": list(DEFAULT_SHAPES), "image_size": 32, "min_objects": 1, "max_objects": 3,
         "noise": 0.0, "n_train": 512, "n_val": 128, "n_test": 128, "seed": 0, **spec}
    kw = dict(domain=p["domain"], shapes=p["shapes"], min_objects=p["min_objects"], max_objects=p["max_objects"],
              noise=p["noise"])
    splits = {s: render_instances(p[f"n_{s}"], p["image_size"], [p["seed"], i], **kw) for i, s in enumerate(SEG_SPLITS)}
    return SegDataset(name, list(p["shapes"]), splits)


# ------------------------------------------------------------------------------------------------ COCO


def read_coco_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: malformed COCO file: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: malformed COCO file: top level must be an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: malformed COCO file: missing list {key!r}")
    need = {"images": ("id", "file_name", "height", "width"), "annotations": ("image_id", "category_id", "segmentation"),
            "categories": ("id", "name")}
    for key, fields in need.items():
        for i, entry in enumerate(data[key]):
            lack = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if lack:
                raise ValueError(f"{path}: malformed COCO file: {key}[{i}] lacks {lack}")
    image_ids = {im["id"] for im in data["images"]}
    cat_ids = {c["id"] for c in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        if ann["image_id"] not in image_ids or ann["category_id"] not in cat_ids:
            raise ValueError(f"{path}: malformed COCO file: annotations[{i}] names an unknown image or category")
    return data


def _decode(seg, h: int, w: int, where: str) -> np.ndarray:
    from pycocotools import mask as mask_utils

    try:
        if isinstance(seg, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, h, w)
        elif isinstance(seg, dict):
            rle = {"size": seg["size"], "counts": seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]}
        else:
            raise TypeError(type(seg).__name__)
        return mask_utils.decode(rle).astype(bool)
    except Exception as err:  # noqa: BLE001 - re-raised naming the file and entry
        raise ValueError(f"{where}: malformed segmentation ({type(err).__name__}: {err})") from None


def read_coco_split(json_path: str | Path, image_dir: str | Path, size: int, max_instances: int,
                    cat_index: dict[int, int] | None = None):
    """(images, masks, labels, categories) of one annotation file, resized to ``size``."""
    from PIL import Image

    data = read_coco_json(json_path)
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"COCO image folder {image_dir} does not exist")
    cats = sorted(data["categories"], key=lambda c: c["id"])
    if cat_index is None:
        cat_index = {c["id"]: i for i, c in enumerate(cats)}
    by_image: dict = {}
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0):
            by_image.setdefault(ann["image_id"], []).append(ann)
    n = len(data["images"])
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, max_instances, size, size), dtype=np.uint8)
    labels = np.full((n, max_instances), -1, dtype=np.int64)
    for i, im in enumerate(sorted(data["images"], key=lambda d: d["id"])):
        path = image_dir / im["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{json_path}: image {path} does not exist")
        with Image.open(path) as pil:
            images[i] = np.asarray(pil.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
        inst = []
        for j, ann in enumerate(by_image.get(im["id"], [])):
            m = _decode(ann["segmentation"], im["height"], im["width"], f"{json_path}: annotation id {ann.get('id', j)}")
            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127
            if m.any() and ann["category_id"] in cat_index:
                inst.append((m.sum(), m, cat_index[ann["category_id"]]))
        inst.sort(key=lambda t: -t[0])  # keep the largest
        for k, (_, m, lab) in enumerate(inst[:max_instances]):
            masks[i, k], labels[i, k] = m, lab
    return images, masks, labels, [c["name"] for c in cats], cat_index


def coco_seg_dataset(name: str, spec: dict) -> SegDataset:
    size, kmax = spec.get("image_size", 224), spec.get("max_instances", 20)
    x, m, y, classes, cat_index = read_coco_split(spec["train_json"], spec["train_images"], size, kmax)
    split = {}
    if spec.get("val_json") and spec.get("test_json"):
        split["train"] = (x, m, y)
        split["val"] = read_coco_split(spec["val_json"], spec["val_images"], size, kmax, cat_index)[:3]
        split["test"] = read_coco_split(spec["test_json"], spec["test_images"], size, kmax, cat_index)[:3]
    elif spec.get("val_json"):
        tr, va = split_indices(len(x), spec.get("seed", 0), spec.get("val_frac", 0.2))
        split["train"], split["val"] = (x[tr], m[tr], y[tr]), (x[va], m[va], y[va])
        split["test"] = read_coco_split(spec["val_json"], spec["val_images"], size, kmax, cat_index)[:3]
    else:
        tr, va, te = split_indices(len(x), spec.get("seed", 0), spec.get("test_frac", 0.2), spec.get("val_frac", 0.2))
        split = {"train": (x[tr], m[tr], y[tr]), "val": (x[va], m[va], y[va]), "test": (x[te], m[te], y[te])}
    return SegDataset(name, classes, split)


SEG_DATASET_KINDS = {"procedural": procedural_seg_dataset, "coco": coco_seg_dataset}  # spec kind -> builder


def build_seg_dataset(name: str, spec: dict) -> SegDataset:
    kind = spec.get("kind", "procedural")
    if kind not in SEG_DATASET_KINDS:
        raise ValueError(f"peft.seg_datasets.{name}.kind: unknown kind {kind!r} ({', '.join(SEG_DATASET_KINDS)})")
    return SEG_DATASET_KINDS[kind](name, {k: v for k, v in spec.items() if k != "kind"})
