"""A COCO-format instance-segmentation dataset from a local path → the prepared ``SegDataset`` file.

Reads the standard annotation JSON (``images``, ``annotations``, ``categories``) and the image files; masks come
from polygons or RLE via ``pycocotools.mask`` (crowd annotations are skipped, as COCO training does). Images and
masks are resized to one square ``image_size`` (bilinear / nearest, no crop, so every instance stays whole);
categories are renumbered 0..C-1 in ascending id order; per image at most ``max_instances`` of the largest
instances are kept. Never downloads: every path is local and checked, and a malformed file fails with a
message naming it.

Split rules (validation is never the test set): train + val + test files as given; train + val files → val is
the test split and validation is carved from train (``val_frac``); train only → a seeded three-way split.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from adaptlab.data.prepare import split_indices
from adaptlab.peft.segmentation import SegDataset


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
