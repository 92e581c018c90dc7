"""Scene sources: labelled image datasets as (N, H, W[, 3]) uint8 arrays.

- Fashion-MNIST and MNIST in IDX format (optionally gzipped). Debian's
  ``dataset-fashion-mnist`` installs them under ``/usr/share/datasets/fashion-mnist``; the first
  1000 test images ship with privcam as ``fashion-mnist-sample`` for the demo.
- CIFAR-10 in its python pickle format (``data_batch_1..5``, ``test_batch``, ``batches.meta``), read by
  an unpickler that only builds numpy arrays, lists, dicts and bytes (no other object, no code).
- A folder of images: labels from sub-folder names when there are sub-folders. An image that cannot be
  read, or whose size differs from the others, is skipped and named in :attr:`Dataset.skipped`.

Every file is read safely (:mod:`sensor.safeio`): regular files only, declared sizes checked against
the file and the limits before anything is allocated.

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
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sensor.errors import DatasetError, InputFileError
from sensor.safeio import check_pixels, max_dataset_bytes, open_regular, read_bytes, read_image

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
    skipped: tuple[str, ...] = ()  # "file: why" for each item that could not be used

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, count: int | None, offset: int = 0) -> Dataset:
        """The first ``count`` items from ``offset`` (all when count is None)."""
        if (count is not None and count < 0) or offset < 0:
            raise DatasetError(f"{self.name}: subset: expected count >= 0 and offset >= 0, got {count}, {offset}")
        end = None if count is None else offset + count
        labels = None if self.labels is None else self.labels[offset:end]
        return Dataset(self.name, self.images[offset:end], labels, self.class_names, self.source, self.skipped)


_GZIP_MAX_RATIO = 1100  # deflate expands at most ~1032:1


def _read_exact(stream, n: int, path: Path, what: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise DatasetError(f"{path}: {what}: expected {n} bytes, file too short")
    return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain). Errors name the file and the bad header field.

    The declared shape is checked against the file size (plain files exactly; gzip files against the
    most deflate can expand), against :func:`sensor.safeio.max_dataset_bytes` and, per image, against
    :func:`sensor.safeio.max_pixels` before the data are read.
    """
    path = Path(path)
    try:
        fh = open_regular(path, "an IDX file")
    except InputFileError as err:
        if err.got == "no such file":
            raise DatasetError(f"{path}: IDX file not found") from None
        raise DatasetError(str(err)) from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        packed = path.suffix == ".gz"
        stream = gzip.GzipFile(fileobj=fh) if packed else fh
        try:
            head = stream.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
                raise DatasetError(f"{path}: magic: expected 00 00 <type> <ndim> IDX header")
            ndim = head[3]
            dims = _read_exact(stream, 4 * ndim, path, f"header: {ndim} dimension sizes")
            shape = tuple(int.from_bytes(dims[4 * i: 4 * i + 4], "big") for i in range(ndim))
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
            header = 4 + 4 * ndim
            if not packed and size - header != expected:
                raise DatasetError(f"{path}: size: expected {expected} data bytes for shape {shape}, "
                                   f"got {size - header}")
            if packed and expected > _GZIP_MAX_RATIO * size:
                raise DatasetError(f"{path}: size: shape {shape} declares {expected} bytes, more than a gzip file "
                                   f"of {size} bytes can hold")
            if expected > max_dataset_bytes():
                raise DatasetError(f"{path}: size: shape {shape} declares {expected:,} bytes, above the limit of "
                                   f"{max_dataset_bytes():,} (PRIVCAM_MAX_DATASET_BYTES)")
            if ndim >= 3:
                check_pixels(path, shape[1], int(np.prod(shape[2:])), "images")
            data = stream.read(expected + 1)
        except (OSError, EOFError, zlib.error) as err:
            raise DatasetError(f"{path}: cannot read IDX file: {err}") from None
        except InputFileError as err:
            raise DatasetError(str(err)) from None
    if len(data) != expected:
        raise DatasetError(f"{path}: size: expected {expected} data bytes for shape {shape}, "
                           f"got {'more' if len(data) > expected else len(data)}")
    return np.frombuffer(data, dtype).reshape(shape)


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


def _multiarray():
    try:
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core import multiarray
    return multiarray


class CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches and nothing else: numpy arrays, dtypes and scalars plus the builtin
    containers; any other class or function named by the file is refused (a pickle can run code)."""

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "numpy" and module.endswith("multiarray") and name in ("_reconstruct", "scalar"):
            return getattr(_multiarray(), name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays, "
                                     "lists and bytes")


def load_cifar10(root: str | os.PathLike, split: str) -> Dataset:
    """CIFAR-10 python pickles: (N, 32, 32, 3) uint8 RGB and labels.

    Read with :class:`CifarUnpickler`: a file that names any other object is refused, never run.
    """
    import io

    root = Path(root)
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}.get(split)
    if names is None:
        raise DatasetError(f"split: expected 'train' or 'test', got {split!r}")
    images, labels = [], []
    for name in names:
        path = root / name
        try:
            blob = read_bytes(path, "a CIFAR-10 batch", limit=max_dataset_bytes())
            batch = CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
        except InputFileError as err:
            if err.got == "no such file":
                raise DatasetError(f"{path}: CIFAR-10 batch not found (python pickle version; privcam data "
                                   "cifar10 fetches it)") from None
            raise DatasetError(str(err)) from None
        except Exception as err:  # noqa: BLE001 - a damaged or hostile pickle raises many types
            raise DatasetError(f"{path}: not a CIFAR-10 pickle batch: {err}") from None
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise DatasetError(f"{path}: expected a dict with b'data' and b'labels'")
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            batch_labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as err:
            raise DatasetError(f"{path}: data/labels: expected uint8 pixels and integer labels ({err})") from None
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetError(f"{path}: data: expected (N, 3072) uint8, got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
        if batch_labels.ndim != 1 or len(labels[-1]) != len(images[-1]):
            raise DatasetError(f"{path}: labels: expected {len(images[-1])}, got {batch_labels.shape}")
        if len(batch_labels) and not (0 <= batch_labels.min() and batch_labels.max() < len(CIFAR10_CLASSES)):
            raise DatasetError(f"{path}: labels: expected integers in [0, {len(CIFAR10_CLASSES) - 1}]")
    return Dataset("cifar10", np.concatenate(images), np.concatenate(labels), CIFAR10_CLASSES, str(root))


def load_image_folder(root: str | os.PathLike, grey: bool = False) -> Dataset:
    """Every image under ``root`` (sorted). Sub-folder names become class labels when present.

    Images share one size (the most common one); grey images are returned (N, H, W), colour
    (N, H, W, 3). An unreadable image, or one of another size, is skipped and named in ``skipped``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: expected a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    read, skipped = [], []
    for path in files:
        try:
            image = read_image(path, "grey" if grey else "colour")
        except InputFileError as err:
            skipped.append(str(err))
            continue
        read.append((path, image if grey else image[..., ::-1]))
    if not read:
        raise DatasetError(f"{root}: no readable image; {len(skipped)} skipped, first: {skipped[0]}")
    shape = Counter(im.shape for _, im in read).most_common(1)[0][0]
    skipped += [f"{p}: expected an image of {shape[1]}x{shape[0]} like the others, got {im.shape[1]}x{im.shape[0]}"
                for p, im in read if im.shape != shape]
    read = [(p, im) for p, im in read if im.shape == shape]
    classes = sorted({p.parent.name for p, _ in read if p.parent != root})
    if classes:
        skipped += [f"{p}: expected an image inside a class sub-folder" for p, _ in read if p.parent == root]
        read = [(p, im) for p, im in read if p.parent != root]
    labels = np.array([classes.index(p.parent.name) for p, _ in read], np.int64) if classes else None
    images = np.stack([np.ascontiguousarray(im) for _, im in read])
    return Dataset(root.name, images, labels, tuple(classes), str(root), tuple(skipped))


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
