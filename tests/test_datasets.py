from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest

from pipeline.stream.datasets import load_cifar10, load_dataset, load_idx_dataset, read_idx
from sensor.errors import DatasetError


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open(path, "wb") if compress else open(path, "wb")).write(payload)


@pytest.fixture
def idx_root(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, compress=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    return tmp_path, images, labels


def test_idx_round_trip(idx_root):
    root, images, labels = idx_root
    ds = load_idx_dataset("mnist", root, "test")
    assert np.array_equal(ds.images, images) and np.array_equal(ds.labels, labels)
    assert len(ds.subset(3, offset=2)) == 3
    assert np.array_equal(load_dataset("mnist", "test", root).images, images)


def test_idx_errors_name_the_file(idx_root, tmp_path):
    root, images, _ = idx_root
    truncated = tmp_path / "trunc-idx"
    write_idx(truncated, images)
    truncated.write_bytes(truncated.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="trunc-idx: size"):
        read_idx(truncated)
    bad = tmp_path / "magic-idx"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DatasetError, match="magic-idx: magic"):
        read_idx(bad)
    with pytest.raises(DatasetError, match="train-images"):
        load_idx_dataset("mnist", root, "train")
    with pytest.raises(DatasetError, match="split"):
        load_idx_dataset("mnist", root, "validation")


def write_cifar_batch(path, images: np.ndarray, labels: list[int]) -> None:
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    with open(path, "wb") as fh:
        pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"test"}, fh)


def test_cifar10_pickles_in_the_real_format(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    write_cifar_batch(tmp_path / "test_batch", images, [3, 1, 4, 1, 5])
    ds = load_cifar10(tmp_path, "test")
    assert ds.images.shape == (5, 32, 32, 3)
    assert np.array_equal(ds.images, images)
    assert ds.labels.tolist() == [3, 1, 4, 1, 5]
    with pytest.raises(DatasetError, match="data_batch_1"):
        load_cifar10(tmp_path, "train")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="not a CIFAR-10 pickle"):
        load_cifar10(tmp_path / "junk", "test")


def test_image_folder_labels_from_subfolders(tmp_path):
    import cv2

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            cv2.imwrite(str(tmp_path / cls / f"{i}.png"), np.full((8, 8, 3), 40 * i, np.uint8))
    ds = load_dataset("folder", root=tmp_path)
    assert ds.images.shape == (4, 8, 8, 3) and ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.class_names == ("cat", "dog")
    with pytest.raises(DatasetError, match="dataset"):
        load_dataset("imagenet")
