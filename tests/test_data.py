"""Datasets: CIFAR binary / ImageFolder / .npy / digits loaders, the procedural generator, seeded splits and
the prepared-dataset file. Every fixture is written to tmp_path in the real on-disk format; nothing is downloaded."""
from __future__ import annotations

import pathlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from adaptlab.data import loaders, procedural
from adaptlab.data.prepare import build_dataset, prepare_dataset, split_indices
from adaptlab.data.store import SPLITS, ImageDataset, load_dataset, save_dataset

RECORDS_PER_BATCH = 3  # CIFAR-10 fixture: 5 train batches of 3 records + a test batch of 4
N_TEST = 4


# ----------------------------------------------------------------------------------------------------------------
# helpers

def _planes(g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The R, G, B planes (32, 32) of fixture image ``g``: R constant g (a unique signature), G = 2g + row,
    B = 5 * col + row, so a wrong CHW -> HWC transposition or a row/column swap changes the values."""
    r, c = np.mgrid[0:32, 0:32]
    return (np.full((32, 32), g, dtype=np.uint8),
            ((2 * g + r) % 256).astype(np.uint8),
            ((5 * c + r) % 256).astype(np.uint8))


def _expected_hwc(g: int) -> np.ndarray:
    return np.stack(_planes(g), axis=-1)


def _record(label_bytes: list[int], g: int) -> bytes:
    return bytes(label_bytes) + b"".join(p.tobytes() for p in _planes(g))


def _c10_train_label(g: int) -> int:
    return (3 * g + 1) % 10


def _c10_test_label(j: int) -> int:
    return 9 - j


def _write_cifar10(root: Path) -> Path:
    root.mkdir(parents=True)
    g = 0
    for b in range(1, 6):
        with open(root / f"data_batch_{b}.bin", "wb") as fh:
            for _ in range(RECORDS_PER_BATCH):
                fh.write(_record([_c10_train_label(g)], g))
                g += 1
    with open(root / "test_batch.bin", "wb") as fh:
        for j in range(N_TEST):
            fh.write(_record([_c10_test_label(j)], 100 + j))
    return root


def _coarse(g: int) -> int:
    return (g * 3) % 20


def _fine(g: int) -> int:
    return (g * 37 + 50) % 100


def _write_cifar100(root: Path, n_train: int = 12, n_test: int = 5) -> Path:
    root.mkdir(parents=True)
    for split, ids in (("train", range(n_train)), ("test", range(200, 200 + n_test))):
        with open(root / f"{split}.bin", "wb") as fh:
            for g in ids:
                fh.write(_record([_coarse(g), _fine(g)], g))
    return root


def _signatures(x: np.ndarray) -> list[int]:
    """The R value of pixel (0, 0): each fixture image has its own."""
    return [int(v) for v in x[:, 0, 0, 0]]


def _image_counter(*arrays: np.ndarray) -> Counter:
    """Multiset of images (by bytes): equal counters mean the same images, duplicates included."""
    return Counter(img.tobytes() for x in arrays for img in x)


def _assert_disjoint_cover(parts: list[list[int]], universe: set[int]) -> None:
    flat = [v for p in parts for v in p]
    assert len(flat) == len(set(flat)), "splits overlap (or repeat an item)"
    assert set(flat) == universe


# ----------------------------------------------------------------------------------------------------------------
# 1. CIFAR-10 binary

def test_cifar10_reader_layout_labels_and_batch_order(tmp_path):
    root = _write_cifar10(tmp_path / "cifar-10-batches-bin")
    d = loaders.read_cifar10_binary(root)
    x, y = d["train"]
    n = 5 * RECORDS_PER_BATCH
    assert x.shape == (n, 32, 32, 3) and x.dtype == np.uint8 and x.flags["C_CONTIGUOUS"]
    assert y.dtype == np.int64 and y.shape == (n,)
    # batches 1..5 concatenated in order: image g sits at row g
    for g in range(n):
        np.testing.assert_array_equal(x[g], _expected_hwc(g))
        assert y[g] == _c10_train_label(g)
    # spot-check individual pixels against the channel-plane layout
    assert x[7, 3, 11, 0] == 7 and x[7, 3, 11, 1] == 2 * 7 + 3 and x[7, 3, 11, 2] == 5 * 11 + 3
    x_te, y_te = d["test"]
    assert x_te.shape == (N_TEST, 32, 32, 3)
    for j in range(N_TEST):
        np.testing.assert_array_equal(x_te[j], _expected_hwc(100 + j))
    assert y_te.tolist() == [_c10_test_label(j) for j in range(N_TEST)]


def test_cifar10_build_dataset_splits(tmp_path):
    root = _write_cifar10(tmp_path / "c10")
    spec = {"kind": "cifar10", "path": str(root), "val_frac": 0.2, "seed": 0}
    ds = build_dataset("c10", spec)
    n = 5 * RECORDS_PER_BATCH
    assert ds.name == "c10" and ds.num_classes == 10
    assert len(ds.x_val) == round(0.2 * n) and len(ds.x_train) == n - round(0.2 * n)
    _assert_disjoint_cover([_signatures(ds.x_train), _signatures(ds.x_val)], set(range(n)))
    # every image keeps its own label and pixels through the split
    for split in ("train", "val"):
        x, y = ds.split(split)
        for img, lab in zip(x, y):
            g = int(img[0, 0, 0])
            np.testing.assert_array_equal(img, _expected_hwc(g))
            assert lab == _c10_train_label(g)
    # the test split is test_batch.bin exactly, in order
    d = loaders.read_cifar10_binary(root)
    np.testing.assert_array_equal(ds.x_test, d["test"][0])
    np.testing.assert_array_equal(ds.y_test, d["test"][1])
    assert _signatures(ds.x_test) == [100 + j for j in range(N_TEST)]
    # seeded: same seed -> same split; another seed -> another split
    again = build_dataset("c10", spec)
    np.testing.assert_array_equal(again.x_val, ds.x_val)
    other = build_dataset("c10", {**spec, "seed": 1})
    assert _signatures(other.x_val) != _signatures(ds.x_val)


# ----------------------------------------------------------------------------------------------------------------
# 2. CIFAR-100 binary

def test_cifar100_fine_and_coarse_labels(tmp_path):
    root = _write_cifar100(tmp_path / "cifar-100-binary")
    fine = loaders.read_cifar100_binary(root, "fine")
    coarse = loaders.read_cifar100_binary(root, "coarse")
    for split, ids in (("train", range(12)), ("test", range(200, 205))):
        np.testing.assert_array_equal(fine[split][0], np.stack([_expected_hwc(g) for g in ids]))
        np.testing.assert_array_equal(coarse[split][0], fine[split][0])
        assert fine[split][1].tolist() == [_fine(g) for g in ids]
        assert coarse[split][1].tolist() == [_coarse(g) for g in ids]
        assert fine[split][1].dtype == np.int64

    ds_fine = build_dataset("c100", {"kind": "cifar100", "path": str(root), "label": "fine", "seed": 0})
    ds_default = build_dataset("c100", {"kind": "cifar100", "path": str(root), "seed": 0})
    ds_coarse = build_dataset("c100", {"kind": "cifar100", "path": str(root), "label": "coarse", "seed": 0})
    assert ds_fine.num_classes == 100 and ds_default.num_classes == 100 and ds_coarse.num_classes == 20
    np.testing.assert_array_equal(ds_default.y_train, ds_fine.y_train)
    for ds, label_of in ((ds_fine, _fine), (ds_coarse, _coarse)):
        _assert_disjoint_cover([_signatures(ds.x_train), _signatures(ds.x_val)], set(range(12)))
        for split in SPLITS:
            x, y = ds.split(split)
            assert y.tolist() == [label_of(g) for g in _signatures(x)]
        assert _signatures(ds.x_test) == list(range(200, 205))


# ----------------------------------------------------------------------------------------------------------------
# 3. corrupted and missing CIFAR files

@pytest.mark.parametrize("extra", [1, -1, -3072])
def test_truncated_cifar10_batch_raises_naming_file(tmp_path, extra):
    root = _write_cifar10(tmp_path / "c10")
    bad = root / "data_batch_3.bin"
    raw = bad.read_bytes()
    bad.write_bytes(raw + b"\0" if extra > 0 else raw[:extra])
    assert bad.stat().st_size % 3073  # not a whole number of records
    with pytest.raises(ValueError, match="data_batch_3.bin"):
        loaders.read_cifar10_binary(root)
    with pytest.raises(ValueError) as info:
        build_dataset("c10bad", {"kind": "cifar10", "path": str(root)})
    assert "datasets.c10bad" in str(info.value) and str(bad) in str(info.value)


def test_cifar10_batch_cut_at_record_boundary_is_read(tmp_path):
    root = _write_cifar10(tmp_path / "c10")
    batch = root / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-3073])  # drop the last whole record: a valid, shorter file
    x, y = loaders.read_cifar10_binary(root)["train"]
    kept = [g for g in range(5 * RECORDS_PER_BATCH) if g != 3 * RECORDS_PER_BATCH - 1]
    assert _signatures(x) == kept and y.tolist() == [_c10_train_label(g) for g in kept]


def test_empty_and_truncated_cifar100_file_raises(tmp_path):
    root = _write_cifar100(tmp_path / "c100")
    (root / "test.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="test.bin"):
        loaders.read_cifar100_binary(root)
    # a CIFAR-10 (1 label byte) record length is not a CIFAR-100 one
    (root / "test.bin").write_bytes(_record([1], 0) * 2)
    with pytest.raises(ValueError, match="test.bin"):
        loaders.read_cifar100_binary(root)


def test_missing_cifar_batch_file_names_it(tmp_path):
    root = _write_cifar10(tmp_path / "c10")
    (root / "data_batch_4.bin").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4.bin"):
        build_dataset("c10", {"kind": "cifar10", "path": str(root)})


@pytest.mark.parametrize("spec", [
    {"kind": "cifar10"},
    {"kind": "cifar100"},
    {"kind": "cifar100", "label": "coarse"},
    {"kind": "imagefolder"},
])
def test_missing_folder_names_dataset_key_and_path(tmp_path, spec):
    missing = tmp_path / "not-here"
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("mydata", {**spec, "path": str(missing)})
    msg = str(info.value)
    assert "datasets.mydata" in msg and str(missing) in msg


def test_missing_npy_names_dataset_key_and_path(tmp_path):
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros(4, dtype=np.int64))
    missing = tmp_path / "contrast.npy"
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("c10c", {"kind": "npy", "images": str(missing), "labels": str(labels)})
    assert "datasets.c10c" in str(info.value) and str(missing) in str(info.value)


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match=r"datasets\.weird\.kind"):
        build_dataset("weird", {"kind": "svhn"})  # (mnist is a kind now)


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
    parts = [_signatures(ds.split(s)[0]) for s in SPLITS]
    _assert_disjoint_cover(parts, set(expected))
    for split in SPLITS:
        x, y = ds.split(split)
        assert x.shape[1:] == (12, 12, 3)
        assert y.tolist() == [expected[s] for s in _signatures(x)]
    again = build_dataset("flat", spec)
    assert [_signatures(again.split(s)[0]) for s in SPLITS] == parts
    other = build_dataset("flat", {**spec, "seed": 3})
    assert [_signatures(other.split(s)[0]) for s in SPLITS] != parts


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="datasets.e"):
        build_dataset("e", {"kind": "imagefolder", "path": str(tmp_path / "empty")})
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        loaders.read_image_folder(tmp_path / "noimg", 8)


# ----------------------------------------------------------------------------------------------------------------
# 5. .npy (CIFAR-10-C layout)

N_NPY = 50


def _write_npy(tmp_path: Path, n_labels: int = N_NPY) -> tuple[Path, Path]:
    x = np.zeros((N_NPY, 32, 32, 3), dtype=np.uint8)
    x[..., 0] = np.arange(N_NPY, dtype=np.uint8)[:, None, None]  # R = row index
    x[..., 1] = np.arange(32, dtype=np.uint8)[None, :, None]
    x[..., 2] = np.arange(32, dtype=np.uint8)[None, None, :]
    images, labels = tmp_path / "contrast.npy", tmp_path / "labels.npy"
    np.save(images, x)
    np.save(labels, (np.arange(n_labels) % 10).astype(np.uint8))  # CIFAR-10-C ships uint8 labels
    return images, labels


def test_npy_reader_and_rows(tmp_path):
    images, labels = _write_npy(tmp_path)
    x, y = loaders.read_npy_pair(images, labels)
    assert x.shape == (N_NPY, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x, np.load(images))
    xs, ys = loaders.read_npy_pair(images, labels, [10, 40])
    np.testing.assert_array_equal(xs, np.load(images)[10:40])
    assert ys.tolist() == [g % 10 for g in range(10, 40)]
    assert not isinstance(xs, np.memmap)


def test_npy_build_dataset_splits_cover_slice(tmp_path):
    images, labels = _write_npy(tmp_path)
    spec = {"kind": "npy", "images": str(images), "labels": str(labels), "rows": [10, 40],
            "test_frac": 0.2, "val_frac": 0.1, "seed": 0}
    ds = build_dataset("c10c", spec)
    assert ds.num_classes == 10
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (30 - 6 - 3, 3, 6)
    _assert_disjoint_cover([_signatures(ds.split(s)[0]) for s in SPLITS], set(range(10, 40)))
    for split in SPLITS:
        x, y = ds.split(split)
        assert y.tolist() == [g % 10 for g in _signatures(x)]
    full = build_dataset("c10c", {**spec, "rows": None})
    _assert_disjoint_cover([_signatures(full.split(s)[0]) for s in SPLITS], set(range(N_NPY)))


@pytest.mark.parametrize("rows", [[10, 51], [20, 20], [30, 10], [-1, 5]])
def test_npy_bad_rows_raise_naming_file(tmp_path, rows):
    images, labels = _write_npy(tmp_path)
    with pytest.raises(ValueError) as info:
        build_dataset("c10c", {"kind": "npy", "images": str(images), "labels": str(labels), "rows": rows})
    assert "datasets.c10c" in str(info.value) and str(images) in str(info.value)


def test_npy_length_mismatch_raises(tmp_path):
    images, labels = _write_npy(tmp_path, n_labels=N_NPY - 1)
    with pytest.raises(ValueError) as info:
        loaders.read_npy_pair(images, labels)
    assert str(images) in str(info.value) and str(labels) in str(info.value)


def test_npy_wrong_image_shape_raises(tmp_path):
    images, labels = tmp_path / "gray.npy", tmp_path / "labels.npy"
    np.save(images, np.zeros((4, 32, 32), dtype=np.uint8))
    np.save(labels, np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="gray.npy"):
        loaders.read_npy_pair(images, labels)


@pytest.mark.parametrize("which", ["images", "labels"])
def test_npy_loader_never_unpickles(tmp_path, which):
    """An object-array .npy is a pickle: it must be refused without running its payload."""
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):  # unpickling calls Path.touch(marker)
            return (pathlib.Path.touch, (marker,))

    images, labels = _write_npy(tmp_path)
    evil = tmp_path / "evil.npy"
    np.save(evil, np.array([Payload()] * N_NPY, dtype=object), allow_pickle=True)
    # positive control: the file really would run code when unpickled
    np.load(evil, allow_pickle=True)
    assert marker.exists()
    marker.unlink()

    args = (evil, labels) if which == "images" else (images, evil)
    with pytest.raises(ValueError):
        loaders.read_npy_pair(*args)
    with pytest.raises(ValueError, match="datasets.c10c"):
        build_dataset("c10c", {"kind": "npy", "images": str(args[0]), "labels": str(args[1])})
    assert not marker.exists()


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
    assert _image_counter(ds.x_train, ds.x_val, ds.x_test) == _image_counter(x_all)


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
    assert not (_image_counter(a.x_val) & _image_counter(a.x_test))
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
    _assert_disjoint_cover([p.tolist() for p in parts], set(range(n)))
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


def test_prepare_dataset_writes_loadable_file(tmp_path):
    root = _write_cifar100(tmp_path / "c100")
    spec = {"kind": "cifar100", "path": str(root), "label": "coarse", "seed": 2}
    ds = prepare_dataset("c100", spec, tmp_path / "out.safetensors")
    back = load_dataset(tmp_path / "out.safetensors")
    assert back.num_classes == 20 and back.meta == {"spec": spec}
    for split in SPLITS:
        np.testing.assert_array_equal(back.split(split)[0], ds.split(split)[0])
        np.testing.assert_array_equal(back.split(split)[1], ds.split(split)[1])


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


def test_npy_num_classes_override_and_float_images_rejected(tmp_path):
    x = np.zeros((20, 8, 8, 3), np.uint8)
    y = np.arange(20) % 3  # labels 0..2 only, but the label set has 10 classes
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    spec = {"kind": "npy", "images": str(tmp_path / "x.npy"), "labels": str(tmp_path / "y.npy")}
    assert build_dataset("n", spec).num_classes == 3
    assert build_dataset("n", {**spec, "num_classes": 10}).num_classes == 10
    with pytest.raises(ValueError, match="num_classes 2"):
        build_dataset("n", {**spec, "num_classes": 2})
    np.save(tmp_path / "xf.npy", x.astype(np.float32))
    with pytest.raises(ValueError, match="xf.npy: expected uint8"):
        build_dataset("n", {**spec, "images": str(tmp_path / "xf.npy")})


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
