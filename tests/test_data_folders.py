"""Datasets: the ImageFolder loader (PNG trees written to tmp_path) and scikit-learn's digits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adaptlab.data import loaders
from adaptlab.data.prepare import build_dataset, split_indices
from adaptlab.data.store import SPLITS
from conftest import assert_disjoint_cover, image_counter, pixel_signatures


# ----------------------------------------------------------------------------------------------------------------
# 4. ImageFolder

CLASS_COLOURS = {"cat": (0, 0, 255), "ant": (255, 0, 0), "bird": (0, 255, 0)}  # sorted: ant=0, bird=1, cat=2
SIZES = [(40, 30), (20, 50), (64, 64), (17, 23), (33, 12)]


def _write_png(path: Path, colour, size) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _label_from_colour(img: np.ndarray) -> int:
    names = sorted(CLASS_COLOURS)
    return names.index(next(n for n in names if np.abs(img.astype(int) - CLASS_COLOURS[n]).max() <= 2))


def test_image_folder_train_test_layout(tmp_path):
    root = tmp_path / "folder"
    for name in CLASS_COLOURS:
        for k, size in enumerate(SIZES):
            _write_png(root / "train" / name / f"img{k}.png", CLASS_COLOURS[name], size)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    # the test split lacks "ant": its labels must still follow the train mapping (bird=1, cat=2)
    _write_png(root / "test" / "bird" / "a.png", CLASS_COLOURS["bird"], (30, 40))
    _write_png(root / "test" / "cat" / "b.PNG", CLASS_COLOURS["cat"], (50, 20))
    _write_png(root / "test" / "cat" / "c.png", CLASS_COLOURS["cat"], (8, 8))

    ds = build_dataset("folder", {"kind": "imagefolder", "path": str(root), "image_size": 16, "val_frac": 0.2,
                                  "seed": 0})
    assert ds.num_classes == 3 and ds.meta["classes"] == ["ant", "bird", "cat"]
    assert len(ds.x_train) + len(ds.x_val) == 3 * len(SIZES)  # notes.txt ignored
    assert len(ds.x_val) == round(0.2 * 3 * len(SIZES))
    for split in SPLITS:
        x, y = ds.split(split)
        assert x.shape[1:] == (16, 16, 3) and x.dtype == np.uint8
        assert [_label_from_colour(img) for img in x] == y.tolist()
    assert ds.y_test.tolist() == [1, 2, 2]
    assert sorted(ds.y_train.tolist() + ds.y_val.tolist()) == sorted([0, 1, 2] * len(SIZES))

    ds32 = build_dataset("folder", {"kind": "imagefolder", "path": str(root), "image_size": 32})
    assert ds32.x_train.shape[1:] == (32, 32, 3) and ds32.x_test.shape == (3, 32, 32, 3)


def test_image_folder_val_folder_is_used(tmp_path):
    root = tmp_path / "folder"
    for name in ("ant", "bird"):
        _write_png(root / "train" / name / "x.png", CLASS_COLOURS[name], (20, 20))
        _write_png(root / "train" / name / "y.png", CLASS_COLOURS[name], (21, 20))
        _write_png(root / "test" / name / "x.png", CLASS_COLOURS[name], (20, 20))
    _write_png(root / "val" / "bird" / "v.png", CLASS_COLOURS["bird"], (25, 25))
    ds = build_dataset("f", {"kind": "imagefolder", "path": str(root), "image_size": 8})
    assert ds.x_train.shape == (4, 8, 8, 3) and ds.y_train.tolist() == [0, 0, 1, 1]
    assert ds.y_val.tolist() == [1] and ds.y_test.tolist() == [0, 1]


def test_image_folder_centre_crop(tmp_path):
    # 64x32: black | white (columns 16..47) | black; shorter side -> 16, so the crop is the white middle
    from PIL import Image

    arr = np.zeros((32, 64, 3), dtype=np.uint8)
    arr[:, 16:48] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(arr).save(path)
    img = loaders._load_image(path, 16)
    assert img.shape == (16, 16, 3)
    assert (img[:, 2:14] == 255).all()
    assert img.mean() > 230


def test_image_folder_without_split_folders(tmp_path):
    root = tmp_path / "flat"
    names = sorted(CLASS_COLOURS)
    expected = {}
    for c, name in enumerate(names):
        for k, size in enumerate(SIZES):
            colour = (40 * c + 8 * k + 1, 200 - 30 * k, 77)  # R is unique per image
            _write_png(root / name / f"{k}.png", colour, size)
            expected[colour[0]] = c
    spec = {"kind": "imagefolder", "path": str(root), "image_size": 12, "val_frac": 0.2, "test_frac": 0.2, "seed": 0}
    ds = build_dataset("flat", spec)
    n = len(expected)
    assert ds.num_classes == 3 and ds.meta["classes"] == names
    assert len(ds.x_test) == round(0.2 * n) and len(ds.x_val) == round(0.2 * n)
    assert len(ds.x_train) == n - 2 * round(0.2 * n)
    parts = [pixel_signatures(ds.split(s)[0]) for s in SPLITS]
    assert_disjoint_cover(parts, set(expected))
    for split in SPLITS:
        x, y = ds.split(split)
        assert x.shape[1:] == (12, 12, 3)
        assert y.tolist() == [expected[s] for s in pixel_signatures(x)]
    again = build_dataset("flat", spec)
    assert [pixel_signatures(again.split(s)[0]) for s in SPLITS] == parts
    other = build_dataset("flat", {**spec, "seed": 3})
    assert [pixel_signatures(other.split(s)[0]) for s in SPLITS] != parts


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="datasets.e"):
        build_dataset("e", {"kind": "imagefolder", "path": str(tmp_path / "empty")})
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        loaders.read_image_folder(tmp_path / "noimg", 8)


# ----------------------------------------------------------------------------------------------------------------
# 6. digits

def test_digits_dataset():
    ds = build_dataset("d", {"kind": "digits", "image_size": 32})
    assert ds.num_classes == 10
    for split in SPLITS:
        x, y = ds.split(split)
        assert x.dtype == np.uint8 and x.shape[1:] == (32, 32, 3)
        assert (x[..., 0] == x[..., 1]).all() and (x[..., 0] == x[..., 2]).all()  # grey, replicated
        assert y.min() >= 0 and y.max() <= 9
    sizes = [len(ds.split(s)[0]) for s in SPLITS]
    assert sum(sizes) == 1797 and sizes == [1797 - 2 * 359, 359, 359]
    assert set(ds.y_train.tolist()) == set(range(10))
    # the splits are the seeded index partition of the full set (hence disjoint), and together all of it
    x_all, y_all = loaders.read_digits(32)
    assert x_all.max() == 255 and x_all.min() == 0
    train, val, test = split_indices(1797, 0, 0.2, 0.2)
    for split, idx in zip(SPLITS, (train, val, test)):
        np.testing.assert_array_equal(ds.split(split)[0], x_all[idx])
        np.testing.assert_array_equal(ds.split(split)[1], y_all[idx])
    assert image_counter(ds.x_train, ds.x_val, ds.x_test) == image_counter(x_all)




def test_image_folder_with_train_and_val_but_no_test(tmp_path):
    from PIL import Image

    for split, n in (("train", 10), ("val", 3)):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((12, 12, 3), 10 * i, np.uint8)).save(d / f"{i}.png")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    ds = build_dataset("f", {"kind": "imagefolder", "path": str(tmp_path), "image_size": 8, "test_frac": 0.2})
    assert ds.num_classes == 2 and ds.meta["classes"] == ["a", "b"]
    assert len(ds.y_val) == 6  # the official val folder is used as is
    assert len(ds.y_train) + len(ds.y_test) == 20 and len(ds.y_test) == 4


def test_the_digits_are_scikit_learns_read_without_importing_it():
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    data, target = loaders.sklearn_digits()
    d = load_digits()
    assert data.dtype == d.data.dtype and np.array_equal(data, d.data)
    assert np.array_equal(target, d.target)
    code = ("import sys; from adaptlab.data.loaders import sklearn_digits; x, y = sklearn_digits(); "
            "print(x.shape, 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(1797,", "64)", "False"]  # its import costs a job 1.7 s
