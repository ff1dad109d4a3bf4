"""Datasets: the CIFAR binary and .npy loaders, and a prepared CIFAR file (ImageFolder and digits:
test_data_folders.py; the procedural generator, seeded splits and the prepared-dataset file: test_data_store.py).
Every fixture is written to tmp_path in the real on-disk format; nothing is downloaded."""
from __future__ import annotations

import pathlib
from pathlib import Path

import numpy as np
import pytest

from adaptlab.data import loaders
from adaptlab.data.prepare import build_dataset, prepare_dataset
from adaptlab.data.store import SPLITS, load_dataset
from conftest import assert_disjoint_cover, pixel_signatures

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
    assert_disjoint_cover([pixel_signatures(ds.x_train), pixel_signatures(ds.x_val)], set(range(n)))
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
    assert pixel_signatures(ds.x_test) == [100 + j for j in range(N_TEST)]
    # seeded: same seed -> same split; another seed -> another split
    again = build_dataset("c10", spec)
    np.testing.assert_array_equal(again.x_val, ds.x_val)
    other = build_dataset("c10", {**spec, "seed": 1})
    assert pixel_signatures(other.x_val) != pixel_signatures(ds.x_val)


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
        assert_disjoint_cover([pixel_signatures(ds.x_train), pixel_signatures(ds.x_val)], set(range(12)))
        for split in SPLITS:
            x, y = ds.split(split)
            assert y.tolist() == [label_of(g) for g in pixel_signatures(x)]
        assert pixel_signatures(ds.x_test) == list(range(200, 205))


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
    assert pixel_signatures(x) == kept and y.tolist() == [_c10_train_label(g) for g in kept]


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
    assert_disjoint_cover([pixel_signatures(ds.split(s)[0]) for s in SPLITS], set(range(10, 40)))
    for split in SPLITS:
        x, y = ds.split(split)
        assert y.tolist() == [g % 10 for g in pixel_signatures(x)]
    full = build_dataset("c10c", {**spec, "rows": None})
    assert_disjoint_cover([pixel_signatures(full.split(s)[0]) for s in SPLITS], set(range(N_NPY)))


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


def test_prepare_dataset_writes_loadable_file(tmp_path):
    root = _write_cifar100(tmp_path / "c100")
    spec = {"kind": "cifar100", "path": str(root), "label": "coarse", "seed": 2}
    ds = prepare_dataset("c100", spec, tmp_path / "out.safetensors")
    back = load_dataset(tmp_path / "out.safetensors")
    assert back.num_classes == 20 and back.meta == {"spec": spec}
    for split in SPLITS:
        np.testing.assert_array_equal(back.split(split)[0], ds.split(split)[0])
        np.testing.assert_array_equal(back.split(split)[1], ds.split(split)[1])
