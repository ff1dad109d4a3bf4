"""The dataset kinds of the continual and precond paper presets: MNIST idx files and the npz release of
downsampled ImageNet, written to tmp_path in their real on-disk formats, and the continual benchmarks that read
prepared datasets (permuted MNIST on one channel, random-label CIFAR, continual-ImageNet class pairs)."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptlab.continual import bench
from adaptlab.data import loaders
from adaptlab.data.prepare import build_dataset, prepare_dataset


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """The idx layout: 0, 0, type 0x08 (ubyte), ndim; big-endian int32 sizes; raw bytes."""
    raw = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    raw += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    (gzip.open(path.with_name(path.name + ".gz"), "wb") if gz else open(path, "wb")).write(raw)


def write_mnist(root: Path, n_train: int = 40, n_test: int = 10, gz: bool = True) -> Path:
    """Image i: pixel (r, c) = (i + r + 2c) % 256, so a transposed or shifted read changes values; label i % 10."""
    root.mkdir(parents=True, exist_ok=True)
    r, c = np.mgrid[0:28, 0:28]
    for prefix, n, off in (("train", n_train, 0), ("t10k", n_test, 100)):
        x = np.stack([(off + i + r + 2 * c) % 256 for i in range(n)]).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", x, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(off, off + n) % 10, gz)
    return root


def write_downsampled_imagenet(root: Path, side: int = 8, per_batch: int = 30, n_batches: int = 2,
                               n_val: int = 20, classes: int = 5) -> Path:
    """train_data_batch_<i>.npz + val_data.npz: `data` (N, 3·s·s) channel-major, 1-based `labels`, `mean`."""
    root.mkdir(parents=True, exist_ok=True)
    g = 0

    def images(n: int, start: int) -> np.ndarray:
        planes = [np.full((n, side * side), 0, np.uint8) + (np.arange(start, start + n) % 256).astype(np.uint8)[:, None],
                  np.tile(np.arange(side * side, dtype=np.uint8), (n, 1)), np.full((n, side * side), 7, np.uint8)]
        return np.concatenate(planes, axis=1)  # R = image id, G = pixel index, B = 7

    for b in range(1, n_batches + 1):
        np.savez(root / f"train_data_batch_{b}.npz", data=images(per_batch, g),
                 labels=np.arange(g, g + per_batch) % classes + 1, mean=np.zeros(3 * side * side))
        g += per_batch
    np.savez(root / "val_data.npz", data=images(n_val, 200), labels=np.arange(n_val) % classes + 1)
    # R plane = image id mod 256 (the val images start at 200)
    return root


def test_mnist_idx_reader_gz_and_raw(tmp_path):
    for gz in (True, False):
        root = write_mnist(tmp_path / f"m{gz}", gz=gz)
        d = loaders.read_mnist_idx(root)
        x, y = d["train"]
        assert x.shape == (40, 28, 28, 3) and x.dtype == np.uint8 and y.dtype == np.int64
        assert (x[..., 0] == x[..., 1]).all() and (x[..., 0] == x[..., 2]).all()  # grey repeated to RGB
        assert x[3, 5, 7, 0] == (3 + 5 + 14) % 256 and y[13] == 3
        assert d["test"][0][2, 0, 1, 0] == 102 + 2 and list(d["test"][1][:3]) == [0, 1, 2]


def test_mnist_build_dataset_splits_and_grey_flag(tmp_path):
    ds = build_dataset("mnist", {"kind": "mnist", "path": str(write_mnist(tmp_path / "m")), "val_frac": 0.25})
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (30, 10, 10) and ds.num_classes == 10
    assert ds.meta["grey"] is True
    # train and val partition the idx train images (R plane of pixel (0, 0) = image id)
    assert sorted(np.concatenate([ds.x_train[:, 0, 0, 0], ds.x_val[:, 0, 0, 0]]).tolist()) == list(range(40))


def test_mnist_errors_name_the_file(tmp_path):
    root = write_mnist(tmp_path / "m", gz=False)
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"datasets.mn \(mnist\).*t10k-labels-idx1-ubyte"):
        build_dataset("mn", {"kind": "mnist", "path": str(root)})
    bad = root / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(ValueError, match="header declares shape"):
        loaders.read_idx(bad)
    bad.write_bytes(b"\x00\x00\x0d\x01" + bytes(8))  # float idx type
    with pytest.raises(ValueError, match="not an idx file of unsigned bytes"):
        loaders.read_idx(bad)
    with pytest.raises(FileNotFoundError, match=r"datasets.mn \(mnist\).*/nope"):
        build_dataset("mn", {"kind": "mnist", "path": str(tmp_path / "nope")})


def test_downsampled_imagenet_reader_layout_labels_and_batch_order(tmp_path):
    root = write_downsampled_imagenet(tmp_path / "i8")
    d = loaders.read_downsampled_imagenet(root)
    x, y = d["train"]
    assert x.shape == (60, 8, 8, 3) and x.dtype == np.uint8
    assert x[:, 0, 0, 0].tolist() == list(range(60))  # batch 1 then batch 2
    assert x[4, 2, 3, 1] == 2 * 8 + 3 and (x[..., 2] == 7).all()  # channel-major rows → HWC
    assert y.tolist() == [i % 5 for i in range(60)]  # 1-based labels made 0-based
    assert d["test"][0][:, 0, 0, 0].tolist() == list(range(200, 220))
    ds = build_dataset("in8", {"kind": "downsampled_imagenet", "path": str(root), "val_frac": 0.1})
    assert ds.num_classes == 1000 and (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (54, 6, 20)


def test_downsampled_imagenet_batches_sort_numerically(tmp_path):
    root = write_downsampled_imagenet(tmp_path / "i", per_batch=3, n_batches=10)
    x, _ = loaders.read_downsampled_imagenet(root)["train"]
    assert x[:, 0, 0, 0].tolist() == list(range(30))  # batch 10 after batch 9, not after batch 1


def test_downsampled_imagenet_never_unpickles_and_checks_files(tmp_path):
    root = write_downsampled_imagenet(tmp_path / "i")
    np.savez(root / "train_data_batch_2.npz", data=np.zeros((2, 192), np.uint8),
             labels=np.array([1, "x"], dtype=object))
    with pytest.raises(ValueError, match="pickled objects, which are never loaded"):
        loaders.read_downsampled_imagenet(root)
    root = write_downsampled_imagenet(tmp_path / "j")
    np.savez(root / "val_data.npz", data=np.zeros((2, 3 * 16 * 16), np.uint8), labels=np.array([1, 2]))
    with pytest.raises(ValueError, match="do not match val_data.npz"):
        loaders.read_downsampled_imagenet(root)
    np.savez(root / "val_data.npz", data=np.zeros((2, 192), np.uint8), labels=np.array([0, 2]))
    with pytest.raises(ValueError, match="1-based"):
        loaders.read_downsampled_imagenet(root)
    (root / "val_data.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"datasets.d \(downsampled_imagenet\).*val_data.npz"):
        build_dataset("d", {"kind": "downsampled_imagenet", "path": str(root)})
    with pytest.raises(FileNotFoundError, match="train_data_batch"):
        loaders.read_downsampled_imagenet(tmp_path)


def test_continual_permuted_mnist_uses_one_channel(tmp_path):
    data = prepare_dataset("mnist", {"kind": "mnist", "path": str(write_mnist(tmp_path / "m"))},
                           tmp_path / "mnist.safetensors")
    b = {"inputs": "dataset", "dataset": "mnist", "labels": "permuted", "n": 16}
    assert bench.input_shape(b, tmp_path / "mnist.safetensors") == ((1, 28, 28), 10)
    tasks = list(bench.task_sequence(b, 0, 2, 10, tmp_path / "mnist.safetensors"))
    (x0, y0, p0, held0), (x1, y1, p1, _) = tasks
    assert x0.shape == (16, 784) and held0 is None and torch.equal(x0, x1)
    assert abs(x0.mean().item()) < 0.5  # standardised with the dataset's statistics
    assert sorted(p0.tolist()) == list(range(784)) and not torch.equal(p0, p1)
    ids = set(np.flatnonzero(np.isin(data.x_train[:, 0, 0, 0], np.arange(40))).tolist())
    assert len(ids) == len(data.x_train) and set(y0.tolist()) <= set(range(10))
    task = bench.ContinualTask(x0, y0, p0, 0, 0, (1, 28, 28))
    assert task.x.shape == (16, 1, 28, 28)
    model = bench.build_model({"kind": "vit", "width": 8, "depth": 1, "num_heads": 2, "patch_size": 7,
                               "mlp_ratio": 2.0}, 784, (1, 28, 28), 10)
    assert model(task.x).shape == (16, 10)


def test_continual_pairs_tasks_hold_out_test_images(tmp_path):
    prepare_dataset("in8", {"kind": "downsampled_imagenet", "path": str(write_downsampled_imagenet(tmp_path / "i")),
                            "val_frac": 0.1}, tmp_path / "in8.safetensors")
    b = {"inputs": "dataset", "dataset": "in8", "labels": "pairs", "n": 512, "per_class": 4}
    shape, n_classes = bench.input_shape(b, tmp_path / "in8.safetensors")
    assert shape == (3, 8, 8) and n_classes == 1000
    # classes of the fixture are 0..4 only: a pair drawn from the 1000 labels without images is reported
    with pytest.raises(ValueError, match="has no train or no test images"):
        list(bench.task_sequence(b, 0, 3, 2, tmp_path / "in8.safetensors"))
    prepare_dataset("in8", {"kind": "downsampled_imagenet", "path": str(write_downsampled_imagenet(
        tmp_path / "j", per_batch=500, n_val=1000, classes=1000)), "val_frac": 0.1}, tmp_path / "full.safetensors")
    seq = list(bench.task_sequence(b, 0, 3, 2, tmp_path / "full.safetensors"))
    x, y, perm, (xt, yt) = seq[0]
    assert perm is None and x.shape == (len(y), 192) and set(y.tolist()) <= {0, 1} and len(y) <= 8
    assert xt.shape == (2, 192) and yt.tolist() == [0, 1]  # one val image per class in this fixture
    again = list(bench.task_sequence(b, 0, 3, 2, tmp_path / "full.safetensors"))
    assert all(torch.equal(a[0], b_[0]) for a, b_ in zip(seq, again))  # a function of the seed
    task = bench.ContinualTask(x, y, None, 0, 0, (3, 8, 8), test=(xt, yt))
    model = bench.build_model({"kind": "mlp", "width": 8, "depth": 1}, 192, (3, 8, 8), 2)
    assert task.evaluate(model, "test")["acc"] in (0.0, 0.5, 1.0)
