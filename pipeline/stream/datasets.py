"""Scene sources: labelled image datasets as (N, H, W[, 3]) uint8 arrays.

- Fashion-MNIST and MNIST in IDX format (optionally gzipped). Debian's
  ``dataset-fashion-mnist`` installs them under ``/usr/share/datasets/fashion-mnist``; the first
  1000 test images ship with privcam as ``fashion-mnist-sample`` for the demo.
- CIFAR-10 in its python pickle format (``data_batch_1..5``, ``test_batch``, ``batches.meta``).
- A folder of images: labels from sub-folder names when there are sub-folders.

Where a named dataset is looked up, in order: ``--data`` (the ``root`` argument), the cache that
``privcam data NAME`` fills (:mod:`pipeline.stream.datafetch`), Debian's path (Fashion-MNIST), and,
for Fashion-MNIST's test split only, the shipped sample, with a note on stderr that it holds 1000
test images. An error that means "not here" names the command that gets the data.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sensor.errors import DatasetError

from ..resources import sample_root
from . import datafetch

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SAMPLE_NOTE = "holds only the first 1000 test images"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
log = logging.getLogger("privcam.data")


@dataclass(frozen=True)
class Dataset:
    """Images (N, H, W) or (N, H, W, 3) uint8, labels (N,) int64 or None; ``source``: where they
    were read from."""

    name: str
    images: np.ndarray
    labels: np.ndarray | None
    class_names: tuple[str, ...] = ()
    source: str = ""

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, count: int | None, offset: int = 0) -> Dataset:
        """The first ``count`` items from ``offset`` (all when count is None)."""
        end = None if count is None else offset + count
        labels = None if self.labels is None else self.labels[offset:end]
        return Dataset(self.name, self.images[offset:end], labels, self.class_names, self.source)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain). Errors name the file and the bad header field."""
    path = Path(path)
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: IDX file not found") from None
    except (OSError, EOFError) as err:
        raise DatasetError(f"{path}: cannot read IDX file: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: magic: expected 00 00 <type> <ndim> IDX header")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: header: expected {ndim} dimension sizes, file too short")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: size: expected {expected} data bytes for shape {shape}, "
                           f"got {len(raw) - header}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def _find(root: Path, stem: str, name: str = "") -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    hint = f"; privcam data {name} fetches the official files" if name in datafetch.SOURCES else ""
    raise DatasetError(f"{root}: expected {stem} or {stem}.gz (IDX format){hint}")


def _has_idx_split(root: Path, split: str) -> bool:
    prefix = _SPLIT_PREFIX[split]
    return all((root / f"{prefix}-{kind}").exists() or (root / f"{prefix}-{kind}.gz").exists()
               for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))


def load_idx_dataset(name: str, root: str | os.PathLike, split: str,
                     class_names: tuple[str, ...] = ()) -> Dataset:
    """MNIST-layout IDX pair: ``train-images-idx3-ubyte`` / ``t10k-images-idx3-ubyte`` and labels."""
    prefix = _SPLIT_PREFIX.get(split)
    if prefix is None:
        raise DatasetError(f"split: expected 'train' or 'test', got {split!r}")
    root = Path(root)
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte", name))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte", name)).astype(np.int64)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(f"{root}: images: expected (N, H, W) uint8, got {images.shape} {images.dtype}")
    if len(labels) != len(images):
        raise DatasetError(f"{root}: labels: expected {len(images)} labels, got {len(labels)}")
    return Dataset(name, images, labels, class_names, str(root))


def load_cifar10(root: str | os.PathLike, split: str) -> Dataset:
    """CIFAR-10 python pickles: (N, 32, 32, 3) uint8 RGB and labels.

    The format is pickle, which can run code: only load batches from a source you trust.
    """
    root = Path(root)
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}.get(split)
    if names is None:
        raise DatasetError(f"split: expected 'train' or 'test', got {split!r}")
    images, labels = [], []
    for name in names:
        path = root / name
        try:
            with open(path, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
        except FileNotFoundError:
            raise DatasetError(f"{path}: CIFAR-10 batch not found (python pickle version; privcam data cifar10 "
                               f"fetches it)") from None
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise DatasetError(f"{path}: not a CIFAR-10 pickle batch: {err}") from None
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise DatasetError(f"{path}: expected a dict with b'data' and b'labels'")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetError(f"{path}: data: expected (N, 3072) uint8, got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        if len(labels[-1]) != len(images[-1]):
            raise DatasetError(f"{path}: labels: expected {len(images[-1])}, got {len(labels[-1])}")
    return Dataset("cifar10", np.concatenate(images), np.concatenate(labels), CIFAR10_CLASSES, str(root))


def load_image_folder(root: str | os.PathLike, grey: bool = False) -> Dataset:
    """Every image under ``root`` (sorted). Sub-folder names become class labels when present.

    All images must share one size; grey images are returned (N, H, W), colour (N, H, W, 3).
    """
    import cv2

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: expected a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    classes = sorted({p.parent.name for p in files if p.parent != root})
    images = []
    for path in files:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR)
        if image is None:
            raise DatasetError(f"{path}: not a readable image")
        images.append(image if grey else cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DatasetError(f"{root}: expected images of one size, found {sorted(shapes)}")
    labels = np.array([classes.index(p.parent.name) for p in files], np.int64) if classes else None
    return Dataset(root.name, np.stack(images), labels, tuple(classes), str(root))


def _not_found(name: str, split: str, searched: list[Path], what: str) -> DatasetError:
    where = ", ".join(str(p) for p in searched)
    source = datafetch.SOURCES[name]
    return DatasetError(f"{name}: no {split} split found (looked in {where}{what}); get it with: privcam data {name} "
                        f"(downloads into {datafetch.dataset_folder(name)}); without network, {source.manual}")


def _lookup_idx(name: str, split: str, class_names: tuple[str, ...]) -> Dataset:
    """``name`` from the cache, then Debian's path; Fashion-MNIST's test split falls back to the sample."""
    if split not in _SPLIT_PREFIX:
        raise DatasetError(f"split: expected 'train' or 'test', got {split!r}")
    searched = [datafetch.data_path(name)] + ([FASHION_MNIST_ROOT] if name == "fashion-mnist" else [])
    for root in searched:
        if _has_idx_split(root, split):
            return load_idx_dataset(name, root, split, class_names)
    if name == "fashion-mnist" and split == "test":
        log.warning("privcam: note: fashion-mnist is not in %s; using the shipped sample fashion-mnist-sample "
                    "(%s), which %s. For all 10000 test images: privcam data fashion-mnist",
                    ", ".join(map(str, searched)), sample_root(), SAMPLE_NOTE)
        return load_idx_dataset("fashion-mnist-sample", sample_root(), split, class_names)
    extra = f"; the shipped sample {SAMPLE_NOTE}" if name == "fashion-mnist" else ""
    raise _not_found(name, split, searched, extra)


def load_dataset(name: str, split: str = "test", root: str | os.PathLike | None = None) -> Dataset:
    """Dispatch by name: fashion-mnist, fashion-mnist-sample (shipped, test split only), mnist, cifar10, folder.

    ``root`` (``--data``) wins; without it, named datasets are looked up as the module docstring says.
    """
    if name == "fashion-mnist-sample":
        if split != "test" and root is None:
            raise DatasetError(f"fashion-mnist-sample: no {split} split (the sample {SAMPLE_NOTE}); for the full "
                               f"dataset: privcam data fashion-mnist, then use --dataset fashion-mnist")
        return load_idx_dataset(name, root or sample_root(), split, FASHION_CLASSES)
    if name in ("fashion-mnist", "mnist"):
        classes = FASHION_CLASSES if name == "fashion-mnist" else tuple(str(i) for i in range(10))
        if root is not None:
            return load_idx_dataset(name, root, split, classes)
        return _lookup_idx(name, split, classes)
    if name == "cifar10":
        if root is not None:
            return load_cifar10(root, split)
        cached = datafetch.data_path(name)
        if cached.is_dir():
            return load_cifar10(cached, split)
        raise _not_found(name, split, [cached], "")
    if name == "folder":
        if root is None:
            raise DatasetError("folder: expected --data PATH to a folder of images")
        return load_image_folder(root)
    raise DatasetError(f"dataset: expected one of fashion-mnist, fashion-mnist-sample, mnist, cifar10, folder, "
                       f"got {name!r}")
