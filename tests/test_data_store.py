"""Datasets: the procedural generator, seeded splits and the prepared-dataset (safetensors) file."""
from __future__ import annotations

import numpy as np
import pytest

from adaptlab.data import procedural
from adaptlab.data.prepare import build_dataset, split_indices
from adaptlab.data.store import SPLITS, ImageDataset, load_dataset, save_dataset
from conftest import assert_disjoint_cover, image_counter


# ----------------------------------------------------------------------------------------------------------------
# 7. procedural generator

PROC = {"kind": "procedural", "classes": 10, "image_size": 32, "n_train": 96, "n_val": 48, "n_test": 48, "seed": 0}


def _proc(**kw) -> ImageDataset:
    return build_dataset("p", {**PROC, **kw})


def test_procedural_deterministic_by_seed():
    a, b, c = _proc(), _proc(), _proc(seed=1)
    for split in SPLITS:
        xa, ya = a.split(split)
        np.testing.assert_array_equal(xa, b.split(split)[0])
        np.testing.assert_array_equal(ya, b.split(split)[1])
        assert not np.array_equal(xa, c.split(split)[0])
        assert xa.dtype == np.uint8 and xa.shape == (PROC[f"n_{split}"], 32, 32, 3)
        assert ya.dtype == np.int64 and 0 <= ya.min() and ya.max() < 10
    assert a.num_classes == 10
    # each split is its own random stream
    assert not np.array_equal(a.x_train[:48], a.x_val)
    assert not np.array_equal(a.x_val, a.x_test)
    assert not np.array_equal(a.x_train[:48], a.x_test)
    assert not (image_counter(a.x_val) & image_counter(a.x_test))
    # another class_seed picks other classes
    assert not np.array_equal(_proc(class_seed=5).x_train, a.x_train)
    assert a.meta["class_table"] == procedural.class_table(10, 0).tolist()


def test_procedural_shape_labels_and_per_class():
    ds = _proc(classes=12, labels="shape", n_train=240)
    assert ds.num_classes == 6
    assert set(ds.y_train.tolist()) == set(range(6))
    few = _proc(per_class=5)
    assert len(few.x_train) == 5 * 10
    assert np.bincount(few.y_train, minlength=10).tolist() == [5] * 10
    few_shape = _proc(classes=12, labels="shape", per_class=5)
    assert few_shape.num_classes == 6 and np.bincount(few_shape.y_train).tolist() == [5] * 6
    assert len(few.x_val) == PROC["n_val"]  # per_class only touches training


def test_procedural_render_modes_and_shifts():
    fill = _proc()
    sketch = _proc(render="sketch")
    assert not np.array_equal(fill.x_train, sketch.x_train)
    np.testing.assert_array_equal(fill.y_train, sketch.y_train)  # same class draws, other rendering
    assert (sketch.x_train[..., 0] == sketch.x_train[..., 1]).all()  # sketches are grey
    assert not (fill.x_train[..., 0] == fill.x_train[..., 1]).all()

    base_std = fill.x_train.astype(np.float64).std()
    low = _proc(contrast=0.2).x_train
    assert low.astype(np.float64).std() < 0.5 * base_std
    assert low.min() >= 95 and low.max() <= 160  # squeezed towards mid-grey
    noisy = _proc(noise=0.3).x_train.astype(np.float64)
    assert noisy.std() > base_std
    # noise is added on top of the same image: per-pixel deviation from the clean image grows
    assert np.abs(noisy - fill.x_train).mean() > 20

    with pytest.raises(ValueError, match="render"):
        _proc(render="watercolour")


@pytest.mark.parametrize("n", [6, 10, 37, procedural.N_COMBINATIONS])
def test_class_table(n):
    t = procedural.class_table(n, 0)
    assert t.shape == (n, 4)
    assert len({tuple(r) for r in t.tolist()}) == n
    assert set(t[:, 0].tolist()) == set(range(len(procedural.SHAPES)))
    assert (t[:, 0] == np.arange(n) % 6).all()  # spread over shapes first
    limits = (len(procedural.SHAPES), len(procedural.COLOURS), len(procedural.TEXTURES), len(procedural.SCALES))
    assert (t >= 0).all() and (t < np.array(limits)).all()
    np.testing.assert_array_equal(t, procedural.class_table(n, 0))
    if n < procedural.N_COMBINATIONS:
        assert not np.array_equal(t, procedural.class_table(n, 1))


def test_class_table_rejects_bad_counts():
    for n in (0, 1, procedural.N_COMBINATIONS + 1):
        with pytest.raises(ValueError, match="classes"):
            procedural.class_table(n)
    with pytest.raises(ValueError, match="datasets.p"):
        _proc(classes=1)


# ----------------------------------------------------------------------------------------------------------------
# 8. split_indices

def test_split_indices_partition():
    n = 101
    parts = split_indices(n, 7, 0.2, 0.1)
    assert [len(p) for p in parts] == [n - 20 - 10, 10, 20]  # rest first, then the fractions in reverse
    assert_disjoint_cover([p.tolist() for p in parts], set(range(n)))
    for a, b in zip(parts, split_indices(n, 7, 0.2, 0.1)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, split_indices(n, 8, 0.2, 0.1)))
    rest, one = split_indices(10, 0, 0.5)
    assert len(rest) == len(one) == 5 and set(rest) | set(one) == set(range(10))


@pytest.mark.parametrize("n, fracs", [(10, (0.5, 0.5)), (10, (1.0,)), (100, (0.6, 0.5)), (100, (0.001,)),
                                      (3, (0.1,)), (1, (0.5,))])
def test_split_indices_rejects_impossible_fractions(n, fracs):
    with pytest.raises(ValueError, match="cannot split"):
        split_indices(n, 0, *fracs)


# ----------------------------------------------------------------------------------------------------------------
# 9. prepared-dataset file

def test_save_load_round_trip(tmp_path):
    ds = _proc()
    ds.meta["extra"] = {"nested": [1, 2.5, "ünïcode"], "none": None}
    path = tmp_path / "sub" / "dir" / "p.safetensors"
    save_dataset(ds, path)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    back = load_dataset(path)
    assert back.name == ds.name and back.num_classes == ds.num_classes and back.meta == ds.meta
    for split in SPLITS:
        for got, want in zip(back.split(split), ds.split(split)):
            assert got.dtype == want.dtype and np.array_equal(got, want)


def test_save_casts_labels_to_int64(tmp_path):
    x = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    y = np.array([0, 1, 2], dtype=np.int32)
    ds = ImageDataset("small", 3, x, y, x[:1], y[:1], x[:2], y[:2])
    save_dataset(ds, tmp_path / "s.safetensors")
    back = load_dataset(tmp_path / "s.safetensors")
    assert back.y_train.dtype == np.int64 and back.y_train.tolist() == [0, 1, 2] and back.meta == {}


def test_load_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_dataset(tmp_path / "nope.safetensors")


def _valid_arrays():
    x = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 1], dtype=np.int64)
    return dict(x_train=x, y_train=y, x_val=x, y_val=y, x_test=x, y_test=y)


@pytest.mark.parametrize("field, value, match", [
    ("x_train", np.zeros((4, 8, 8, 3), dtype=np.float32), "x_train must be uint8"),
    ("x_val", np.zeros((4, 8, 8), dtype=np.uint8), "x_val must be uint8"),
    ("x_test", np.zeros((4, 8, 8, 1), dtype=np.uint8), "x_test must be uint8"),
    ("x_train", np.zeros((4, 3, 8, 8), dtype=np.uint8), "x_train must be uint8"),
    ("y_train", np.zeros(3, dtype=np.int64), "y_train has shape"),
    ("y_val", np.zeros((4, 1), dtype=np.int64), "y_val has shape"),
    ("y_test", np.array([0, 1, 3, 1]), "labels of test outside"),
    ("y_train", np.array([0, -1, 2, 1]), "labels of train outside"),
])
def test_image_dataset_validation(field, value, match):
    ImageDataset("ok", 3, **_valid_arrays())  # the baseline is valid
    with pytest.raises(ValueError, match=match):
        ImageDataset("bad", 3, **{**_valid_arrays(), field: value})


def test_image_dataset_unknown_split():
    ds = ImageDataset("ok", 3, **_valid_arrays())
    with pytest.raises(ValueError, match="unknown split"):
        ds.split("holdout")
