"""Raw Bayer frame IO: ``.npy``, headerless ``.raw``/``.bin``, 16-bit ``.png``/``.tif``/``.tiff``, ``.dng``.

A frame is an (H, W) uint16 mosaic plus its :class:`RawMeta`. CFA pattern names follow
:mod:`sensor.cfa` (top-left pixel first; ``mono`` for no colour filter).

Metadata sources, by format:

* ``.raw`` / ``.bin``: a YAML sidecar ``<file>.yaml`` (e.g. ``frame.raw.yaml``) is required and
  must hold every field of :data:`SIDECAR_FIELDS`; the data are uint16 in the stated byte order.
* ``.npy``, ``.png``, ``.tif``, ``.tiff``: the sidecar is optional. Fields it does not give come
  from keyword hints to :func:`read_raw`, then from defaults (bit depth 16, black level 0, white
  level ``2**bit_depth - 1``, byte order little). The CFA pattern has no default.
* ``.dng``: self-describing (CFA tags, BlackLevel, WhiteLevel, byte order of the TIFF header);
  the bit depth is kept in ImageDescription as ``privcam bit_depth=N`` and otherwise inferred
  from the white level. No sidecar is read or written.

Values found in the file itself, in the sidecar and in hints must agree; a disagreement is a
:class:`~sensor.errors.RawFormatError`, never silently resolved.

Writers are atomic: everything is written to temporary files next to the target (the sidecar
included), then moved into place with :func:`os.replace`; on any error the temporary files are
removed and an existing file at the target is left untouched.

``tifffile`` (TIFF/DNG) and ``rawpy`` (DNG reading) are optional and imported on first use.

Readers are safe on hostile files: only regular files are opened, the size a file declares is
checked against the file's own size and against :func:`sensor.safeio.max_pixels` before anything is
allocated, and files are read as bytes (never through a library call that takes the file name).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import yaml

from .atomic import staged_files
from .cfa import PATTERNS
from .errors import InputFileError, RawFormatError
from .safeio import (
    check_pixels,
    max_pixels,
    open_regular,
    quiet_decoders,
    read_bytes,
    read_image,
    read_text,
    regular_file,
)

ByteOrder = Literal["little", "big"]
BIT_DEPTHS: tuple[int, ...] = (8, 10, 12, 14, 16)
BYTE_ORDERS: tuple[str, ...] = ("little", "big")
SIDECAR_FIELDS: tuple[str, ...] = (
    "width", "height", "bit_depth", "cfa", "black_level", "white_level", "byte_order",
)
EXTENSIONS: tuple[str, ...] = (".npy", ".raw", ".bin", ".png", ".tif", ".tiff", ".dng")
SIDECAR_REQUIRED: frozenset[str] = frozenset({".raw", ".bin"})
MIN_RAWPY_SIZE = 22  # LibRaw refuses images narrower or shorter than this; smaller DNGs use tifffile

# TIFF / DNG tag codes and values.
_PHOTOMETRIC_MINISBLACK = 1
_PHOTOMETRIC_CFA = 32803
_PHOTOMETRIC_LINEAR_RAW = 34892
_TAG_NEW_SUBFILE_TYPE = 254
_TAG_PHOTOMETRIC = 262
_TAG_CFA_REPEAT_PATTERN_DIM = 33421
_TAG_CFA_PATTERN = 33422
_TAG_DNG_VERSION = 50706
_TAG_DNG_BACKWARD_VERSION = 50707
_TAG_UNIQUE_CAMERA_MODEL = 50708
_TAG_CFA_PLANE_COLOR = 50710
_TAG_CFA_LAYOUT = 50711
_TAG_BLACK_LEVEL_REPEAT_DIM = 50713
_TAG_BLACK_LEVEL = 50714
_TAG_WHITE_LEVEL = 50717
_TAG_COLOR_MATRIX_1 = 50721
_TAG_AS_SHOT_NEUTRAL = 50728
_TAG_CALIBRATION_ILLUMINANT_1 = 50778
_TIFF_BYTE, _TIFF_ASCII, _TIFF_SHORT, _TIFF_LONG, _TIFF_RATIONAL, _TIFF_SRATIONAL = 1, 2, 3, 4, 5, 10
_ILLUMINANT_D65 = 21
_CFA_CODE = {"R": 0, "G": 1, "B": 2}
_CFA_LETTER = {v: k for k, v in _CFA_CODE.items()}
# ColorMatrix1 (XYZ D65 -> camera): the sensor is simulated with linear sRGB primaries.
_XYZ_TO_LINEAR_SRGB = (
    (3.2406, -1.5372, -0.4986),
    (-0.9689, 1.8758, 0.0415),
    (0.0557, -0.2040, 1.0570),
)
_CAMERA_MODEL = "privcam simulated sensor"
_DESCRIPTION_RE = re.compile(r"\bprivcam\b.*?\bbit_depth=(\d+)")


@dataclass(frozen=True)
class RawMeta:
    """Metadata of one raw frame.

    Attributes:
        width, height: frame size in pixels; the data are (height, width).
        bit_depth: significant bits per pixel, one of :data:`BIT_DEPTHS`.
        cfa: CFA pattern name, one of :data:`sensor.cfa.PATTERNS`.
        black_level: digital value of no light.
        white_level: saturation value; ``None`` means ``2**bit_depth - 1``.
        byte_order: byte order of the 16-bit samples on disk, ``'little'`` or ``'big'``.
    """

    width: int
    height: int
    bit_depth: int
    cfa: str
    black_level: int = 0
    white_level: int | None = None  # None: replaced by 2**bit_depth - 1
    byte_order: ByteOrder = "little"

    def __post_init__(self) -> None:
        if self.white_level is None and isinstance(self.bit_depth, int):
            object.__setattr__(self, "white_level", (1 << self.bit_depth) - 1)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the data."""
        return (self.height, self.width)

    @property
    def max_value(self) -> int:
        """Largest value a ``bit_depth``-bit sample can hold."""
        return (1 << self.bit_depth) - 1


@dataclass
class RawFrame:
    """One raw frame: ``data`` is the (H, W) uint16 mosaic described by ``meta``."""

    data: np.ndarray
    meta: RawMeta


# ---------------------------------------------------------------------------------------------
# Validation (pure functions)
# ---------------------------------------------------------------------------------------------


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Path of the YAML sidecar of ``path``: the full file name plus ``.yaml``."""
    p = Path(path)
    return p.with_name(p.name + ".yaml")


def _check_int(path: Path, field: str, value: object) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise RawFormatError(path, field, "an integer", repr(value))
    return int(value)


def validate_meta(path: str | os.PathLike[str], values: Mapping[str, Any]) -> RawMeta:
    """Check every field of a metadata mapping and build a :class:`RawMeta`.

    ``values`` must hold all of :data:`SIDECAR_FIELDS` except that ``white_level`` may be None.
    Raises RawFormatError naming ``path`` and the first bad field.
    """
    p = Path(path)
    for name in ("width", "height"):
        if _check_int(p, name, values[name]) < 1:
            raise RawFormatError(p, name, "a positive integer", values[name])
    bit_depth = _check_int(p, "bit_depth", values["bit_depth"])
    if bit_depth not in BIT_DEPTHS:
        raise RawFormatError(p, "bit_depth", f"one of {', '.join(map(str, BIT_DEPTHS))}", bit_depth)
    cfa = values["cfa"]
    if not isinstance(cfa, str) or cfa not in PATTERNS:
        raise RawFormatError(p, "cfa", f"one of {', '.join(PATTERNS)}", repr(cfa))
    max_value = (1 << bit_depth) - 1
    black = _check_int(p, "black_level", values["black_level"])
    if not 0 <= black < max_value:
        raise RawFormatError(p, "black_level", f"an integer in [0, {max_value}) for bit_depth {bit_depth}",
                             black)
    white_value = values["white_level"]
    white = max_value if white_value is None else _check_int(p, "white_level", white_value)
    if not black < white <= max_value:
        raise RawFormatError(p, "white_level", f"an integer in ({black}, {max_value}] "
                             f"(above black_level, at most 2**bit_depth - 1)", white)
    byte_order = values["byte_order"]
    if byte_order not in BYTE_ORDERS:
        raise RawFormatError(p, "byte_order", "'little' or 'big'", repr(byte_order))
    return RawMeta(int(values["width"]), int(values["height"]), bit_depth, cfa, black, white, byte_order)


def check_data(path: str | os.PathLike[str], data: np.ndarray, meta: RawMeta | None = None) -> None:
    """Check that ``data`` is a 2-D uint16 array and, given ``meta``, that it fits it.

    Args:
        data: expected (H, W) uint16 (any byte order).
        meta: when given, H and W must match and no value may exceed ``2**bit_depth - 1``.
    """
    p = Path(path)
    if not isinstance(data, np.ndarray):
        raise RawFormatError(p, "data", "a numpy array", type(data).__name__)
    if data.ndim != 2:
        raise RawFormatError(p, "ndim", "a 2-D (H, W) array", f"{data.ndim}-D array of shape {data.shape}")
    if data.dtype.kind != "u" or data.dtype.itemsize != 2:
        raise RawFormatError(p, "dtype", "uint16", data.dtype)
    if meta is None:
        return
    if data.shape != meta.shape:
        raise RawFormatError(p, "shape", f"(height, width) = {meta.shape}", data.shape)
    found = int(data.max()) if data.size else 0
    if found > meta.max_value:
        raise RawFormatError(p, "data", f"values <= {meta.max_value} (bit_depth {meta.bit_depth})",
                             f"max value {found}")


def _merge_sources(
    path: Path, sources: Sequence[tuple[str, Mapping[str, Any]]], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """Combine metadata sources field by field; two sources giving different values is an error.

    ``defaults`` fill the fields no source gives. A missing ``cfa`` is an error.
    """
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, values in sources:
        for name in SIDECAR_FIELDS:
            if name not in values or values[name] is None:
                continue
            if name in merged and merged[name] != values[name]:
                raise RawFormatError(path, name, f"{values[name]!r} (from {source}) to agree with "
                                     f"{origin[name]}", repr(merged[name]))
            merged.setdefault(name, values[name])
            origin.setdefault(name, source)
    if "cfa" not in merged and "cfa" not in defaults:
        raise RawFormatError(path, "cfa", f"a CFA pattern from the sidecar {sidecar_path(path).name} "
                             f"or the cfa= keyword (one of {', '.join(PATTERNS)})", "none given")
    for name in SIDECAR_FIELDS:
        merged.setdefault(name, defaults.get(name))
    return merged


def _check_hints(hints: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(hints) - set(SIDECAR_FIELDS))
    if unknown:
        raise TypeError(f"read_raw: unknown keyword(s) {unknown}; expected some of {list(SIDECAR_FIELDS)}")
    return dict(hints)


def _byte_order_of(dtype: np.dtype) -> ByteOrder:
    """'little' or 'big': how a multi-byte dtype is laid out in memory."""
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and np.little_endian is False):
        return "big"
    return "little"


def _uint16_dtype(byte_order: str) -> np.dtype:
    return np.dtype(">u2" if byte_order == "big" else "<u2")


def _native(data: np.ndarray) -> np.ndarray:
    """C-contiguous native-endian uint16 copy-or-view of ``data``."""
    return np.ascontiguousarray(data, dtype=np.uint16)


def _as_raw_error(path: Path, err: InputFileError, field: str = "file") -> RawFormatError:
    return RawFormatError(path, field, err.expected, err.got)


def _check_size(path: Path, height: int, width: int) -> None:
    """The declared frame size against :func:`sensor.safeio.max_pixels`, before allocating."""
    try:
        check_pixels(path, height, width, "a raw frame")
    except InputFileError as err:
        raise _as_raw_error(path, err, "size") from None


def _bit_depth_for(white_level: int | None) -> int:
    """Smallest supported bit depth that can hold ``white_level`` (16 when unknown or too big)."""
    if white_level is None:
        return 16
    return next((b for b in BIT_DEPTHS if white_level <= (1 << b) - 1), 16)


# ---------------------------------------------------------------------------------------------
# Sidecar
# ---------------------------------------------------------------------------------------------


def read_sidecar(path: str | os.PathLike[str], required: bool) -> dict[str, Any] | None:
    """Read and check the YAML sidecar of the frame file ``path``.

    Returns the mapping (all :data:`SIDECAR_FIELDS` present; extra keys are ignored), or None
    when there is none and ``required`` is false.
    """
    p = Path(path)
    sc = sidecar_path(p)
    if not sc.exists():
        if required:
            raise RawFormatError(p, "sidecar", f"a YAML sidecar {sc.name} next to it with fields "
                                 f"{', '.join(SIDECAR_FIELDS)}", "missing")
        return None
    try:
        values = yaml.safe_load(read_text(sc, f"a YAML sidecar of {p.name}", limit=1 << 20))
    except InputFileError as err:
        raise _as_raw_error(sc, err, "sidecar") from None
    except yaml.YAMLError as exc:
        raise RawFormatError(sc, "sidecar", f"valid YAML for {p.name}",
                             " ".join(str(exc).split())) from None
    if not isinstance(values, dict):
        raise RawFormatError(sc, "sidecar", f"a YAML mapping with fields {', '.join(SIDECAR_FIELDS)}",
                             type(values).__name__)
    missing = [name for name in SIDECAR_FIELDS if name not in values]
    if missing:
        raise RawFormatError(sc, ", ".join(missing), f"sidecar fields {', '.join(SIDECAR_FIELDS)}",
                             f"missing {', '.join(missing)}")
    validate_meta(sc, values)
    return {name: values[name] for name in SIDECAR_FIELDS}


def _sidecar_text(meta: RawMeta) -> str:
    return yaml.safe_dump(asdict(meta), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def _finish(path: Path, data: np.ndarray, intrinsic: Mapping[str, Any], sidecar: Mapping[str, Any] | None,
            hints: Mapping[str, Any], defaults: Mapping[str, Any]) -> RawFrame:
    """Merge metadata sources, validate them against ``data`` (H, W) and build the frame."""
    sources = [("the file", intrinsic)]
    if sidecar is not None:
        sources.append((f"sidecar {sidecar_path(path).name}", sidecar))
    sources.append(("keyword hints", hints))
    meta = validate_meta(path, _merge_sources(path, sources, defaults))
    check_data(path, data, meta)
    return RawFrame(_native(data), meta)


def _shape_fields(data: np.ndarray) -> dict[str, Any]:
    return {"height": int(data.shape[0]), "width": int(data.shape[1])}


_DEFAULTS: dict[str, Any] = {"bit_depth": 16, "black_level": 0, "white_level": None, "byte_order": "little"}


def _read_npy(path: Path, hints: Mapping[str, Any]) -> RawFrame:
    try:
        fh = open_regular(path, "a .npy array file")
    except InputFileError as err:
        raise _as_raw_error(path, err) from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except Exception as exc:  # noqa: BLE001 - numpy parses the header with ast/tokenize: many types
            raise RawFormatError(path, "npy", "a complete .npy array file", " ".join(str(exc).split())) from None
        if dtype.hasobject or dtype.kind != "u" or dtype.itemsize != 2:
            raise RawFormatError(path, "dtype", "uint16", dtype)
        if len(shape) != 2:
            raise RawFormatError(path, "ndim", "a 2-D (H, W) array", f"{len(shape)}-D array of shape {shape}")
        _check_size(path, int(shape[0]), int(shape[1]))
        expected, available = int(shape[0]) * int(shape[1]) * 2, size - fh.tell()
        if available != expected:
            raise RawFormatError(path, "npy", f"a complete .npy array file ({expected} data bytes for shape "
                                 f"{tuple(shape)})", f"{available} bytes")
        data = np.fromfile(fh, dtype=dtype, count=int(shape[0]) * int(shape[1]))
    data = data.reshape(shape, order="F" if fortran else "C")
    check_data(path, data)
    intrinsic = {**_shape_fields(data), "byte_order": _byte_order_of(data.dtype)}
    return _finish(path, data, intrinsic, read_sidecar(path, required=False), hints, _DEFAULTS)


def _read_headerless(path: Path, hints: Mapping[str, Any]) -> RawFrame:
    sidecar = read_sidecar(path, required=True)
    assert sidecar is not None
    meta = validate_meta(path, _merge_sources(path, [(f"sidecar {sidecar_path(path).name}", sidecar),
                                                     ("keyword hints", hints)], _DEFAULTS))
    _check_size(path, meta.height, meta.width)
    expected = meta.width * meta.height * 2
    try:
        fh = open_regular(path, "a headerless raw frame")
    except InputFileError as err:
        raise _as_raw_error(path, err) from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size != expected:
            raise RawFormatError(path, "size", f"{expected} bytes (width*height*2 = "
                                 f"{meta.width}*{meta.height}*2)", f"{size} bytes")
        data = np.fromfile(fh, dtype=_uint16_dtype(meta.byte_order), count=meta.width * meta.height)
    data = data.reshape(meta.shape)
    check_data(path, data, meta)
    return RawFrame(_native(data), meta)


def _read_png(path: Path, hints: Mapping[str, Any]) -> RawFrame:
    try:
        data = read_image(path, "unchanged", "a 16-bit PNG raw frame")
    except InputFileError as err:
        raise RawFormatError(path, "png", err.expected, err.got) from None
    check_data(path, data)
    return _finish(path, data, _shape_fields(data), read_sidecar(path, required=False), hints, _DEFAULTS)


def _import_tifffile(path: Path) -> Any:
    try:
        import tifffile
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RawFormatError(path, "tifffile", "the tifffile package (pip install privcam[raw])",
                             "not installed") from exc
    return tifffile


def _tiff_handle(path: Path):
    try:
        return open_regular(path, "a TIFF/DNG file")
    except InputFileError as err:
        raise _as_raw_error(path, err) from None


def _check_shape(path: Path, shape: Sequence[int]) -> None:
    """A TIFF page's declared shape against the pixel limit (samples count as pixels)."""
    if len(shape) >= 2:
        _check_size(path, int(shape[0]), int(np.prod(shape[1:], dtype=np.int64)))


def _read_tiff(path: Path, hints: Mapping[str, Any]) -> RawFrame:
    tifffile = _import_tifffile(path)
    try:
        with quiet_decoders(), _tiff_handle(path) as fh, tifffile.TiffFile(fh) as tif:
            order = tif.byteorder
            if len(tif.pages):
                _check_shape(path, tif.pages[0].shape)
            data = tif.asarray(key=0) if len(tif.pages) else None
    except RawFormatError:
        raise
    except Exception as exc:  # tifffile raises many types for a bad file
        raise RawFormatError(path, "tiff", "a readable TIFF file", f"{type(exc).__name__}: {exc}") from exc
    if data is None:
        raise RawFormatError(path, "tiff", "a TIFF file with at least one image", "no readable image")
    check_data(path, data)
    intrinsic = {**_shape_fields(data), "byte_order": "big" if order == ">" else "little"}
    return _finish(path, data, intrinsic, read_sidecar(path, required=False), hints, _DEFAULTS)


def _tiff_header_byte_order(path: Path) -> ByteOrder:
    with _tiff_handle(path) as f:
        head = f.read(2)
    if head == b"II":
        return "little"
    if head == b"MM":
        return "big"
    raise RawFormatError(path, "header", "a TIFF/DNG header starting with b'II' or b'MM'", repr(head))


def _single_level(path: Path, field: str, levels: Sequence[float]) -> int | None:
    """One integer level from a per-channel list; None for an empty list."""
    values = {float(v) for v in levels}
    if not values:
        return None
    if len(values) != 1 or not float(next(iter(values))).is_integer():
        raise RawFormatError(path, field, "one integer level shared by all channels", sorted(values))
    return int(next(iter(values)))


def _letters_to_cfa(path: Path, letters: str) -> str:
    if letters not in PATTERNS:
        raise RawFormatError(path, "cfa", f"a 2x2 pattern, one of {', '.join(PATTERNS)}", repr(letters))
    return letters


def _dng_rawpy(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode a DNG with rawpy. Returns (H, W) data and the metadata found in the file."""
    import rawpy

    try:
        blob = read_bytes(path, "a DNG file", limit=8 * max_pixels() + (16 << 20))
    except InputFileError as err:
        raise _as_raw_error(path, err) from None
    with rawpy.imread(io.BytesIO(blob)) as raw:
        data = np.array(raw.raw_image_visible, dtype=np.uint16, copy=True)
        if raw.num_colors == 1:
            cfa = "mono"
        else:
            pattern = np.asarray(raw.raw_pattern)
            desc = raw.color_desc.decode("ascii", "replace")
            if pattern.shape != (2, 2):
                raise RawFormatError(path, "cfa", "a 2x2 Bayer pattern", f"pattern of shape {pattern.shape}")
            cfa = _letters_to_cfa(path, "".join(desc[int(i)] for i in pattern.flat))
        black = _single_level(path, "black_level", raw.black_level_per_channel)
        white = int(raw.white_level)
    return data, {"cfa": cfa, "black_level": black, "white_level": white}


def _tag_numbers(tag: Any) -> list[float]:
    """Numbers of a TIFF tag value; rationals become floats."""
    value = tag.value
    if isinstance(value, (bytes, bytearray)):
        return [float(v) for v in value]
    values = list(value) if isinstance(value, (tuple, list, np.ndarray)) else [value]
    if tag.dtype in (_TIFF_RATIONAL, _TIFF_SRATIONAL):
        return [n / d for n, d in zip(values[::2], values[1::2], strict=True)]
    return [float(v) for v in values]


def _dng_tifffile_cfa(path: Path, page: Any) -> str:
    if int(page.photometric) in (_PHOTOMETRIC_LINEAR_RAW, _PHOTOMETRIC_MINISBLACK):
        return "mono"
    if int(page.photometric) != _PHOTOMETRIC_CFA:
        raise RawFormatError(path, "photometric", "CFA (32803), LinearRaw (34892) or BlackIsZero (1)",
                             int(page.photometric))
    dims = page.tags.get(_TAG_CFA_REPEAT_PATTERN_DIM)
    codes = page.tags.get(_TAG_CFA_PATTERN)
    if dims is None or codes is None or [int(v) for v in _tag_numbers(dims)] != [2, 2]:
        raise RawFormatError(path, "cfa", "CFARepeatPatternDim (2, 2) and a CFAPattern tag",
                             None if dims is None else dims.value)
    plane = page.tags.get(_TAG_CFA_PLANE_COLOR)
    plane_colours = [int(v) for v in _tag_numbers(plane)] if plane is not None else [0, 1, 2]
    try:
        letters = "".join(_CFA_LETTER[plane_colours[int(c)]] for c in _tag_numbers(codes))
    except (KeyError, IndexError):
        letters = f"CFAPattern {[int(c) for c in _tag_numbers(codes)]}"
    return _letters_to_cfa(path, letters)


def _dng_tifffile(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode a DNG's main image (IFD0 or its first raw SubIFD) with tifffile."""
    tifffile = _import_tifffile(path)
    try:
        with quiet_decoders(), _tiff_handle(path) as fh, tifffile.TiffFile(fh) as tif:
            pages = [tif.pages[0], *(tif.pages[0].pages or [])]
            page = next((pg for pg in pages if int(pg.photometric) in
                         (_PHOTOMETRIC_CFA, _PHOTOMETRIC_LINEAR_RAW)), pages[0])
            _check_shape(path, page.shape)
            data = page.asarray()
            cfa = _dng_tifffile_cfa(path, page)
            black_tag, white_tag = page.tags.get(_TAG_BLACK_LEVEL), page.tags.get(_TAG_WHITE_LEVEL)
            black = _single_level(path, "black_level", _tag_numbers(black_tag)) if black_tag else None
            white = _single_level(path, "white_level", _tag_numbers(white_tag)) if white_tag else None
    except RawFormatError:
        raise
    except Exception as exc:  # tifffile raises many types for a bad file
        raise RawFormatError(path, "dng", "a readable DNG file", f"{type(exc).__name__}: {exc}") from exc
    check_data(path, data)
    return data, {"cfa": cfa, "black_level": black, "white_level": white}


def _dng_bit_depth(path: Path) -> int | None:
    """The bit depth privcam stored in ImageDescription, if tifffile is present and it is there."""
    try:
        import tifffile
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    try:
        with quiet_decoders(), open_regular(path, "a DNG file") as fh, tifffile.TiffFile(fh) as tif:
            description = tif.pages[0].description or ""
    except Exception:  # the decoders report a broken file with more detail
        return None
    match = _DESCRIPTION_RE.search(description)
    return int(match.group(1)) if match else None


def _dng_check_sizes(path: Path) -> None:
    """Every image a DNG declares (IFD0 and its SubIFDs) against the pixel limit, before a decoder
    allocates it. A file tifffile cannot parse is left to the decoders to report."""
    try:
        import tifffile
    except ImportError:  # pragma: no cover - depends on the environment
        return
    shapes = []
    try:
        with quiet_decoders(), _tiff_handle(path) as fh, tifffile.TiffFile(fh) as tif:
            for page in tif.pages:
                shapes += [page.shape] + [sub.shape for sub in (page.pages or [])]
    except RawFormatError:
        raise
    except Exception:  # noqa: BLE001 - the decoders report a broken file with more detail
        return
    for shape in shapes:
        _check_shape(path, shape)


def _read_dng(path: Path, hints: Mapping[str, Any]) -> RawFrame:
    byte_order = _tiff_header_byte_order(path)
    _dng_check_sizes(path)
    try:
        import rawpy
    except ImportError:  # pragma: no cover - depends on the environment
        rawpy = None
    rawpy_error = None
    if rawpy is not None:
        try:
            data, found = _dng_rawpy(path)
        except RawFormatError:
            raise
        except Exception as exc:  # noqa: BLE001 - LibRawError (e.g. smaller than MIN_RAWPY_SIZE), or rawpy
            rawpy_error = exc     # failing on a damaged file in another way: try tifffile
    if rawpy is None or rawpy_error is not None:
        try:
            data, found = _dng_tifffile(path)
        except RawFormatError as exc:
            if rawpy_error is None or exc.field != "dng":  # tifffile decoded it and found a bad field
                raise
            raise RawFormatError(path, "dng", "a DNG readable by rawpy or tifffile",
                                 f"rawpy: {rawpy_error}; tifffile: {exc}") from exc
    check_data(path, data)
    intrinsic = {**_shape_fields(data), **found, "byte_order": byte_order, "bit_depth": _dng_bit_depth(path)}
    defaults = {**_DEFAULTS, "bit_depth": _bit_depth_for(found.get("white_level"))}
    return _finish(path, data, intrinsic, None, hints, defaults)


_READERS: dict[str, Callable[[Path, Mapping[str, Any]], RawFrame]] = {
    ".npy": _read_npy,
    ".raw": _read_headerless,
    ".bin": _read_headerless,
    ".png": _read_png,
    ".tif": _read_tiff,
    ".tiff": _read_tiff,
    ".dng": _read_dng,
}


def read_raw(path: str | os.PathLike[str], **hints: Any) -> RawFrame:
    """Read a raw frame; the format follows the file extension (see the module docstring).

    Args:
        path: a ``.npy``, ``.raw``, ``.bin``, ``.png``, ``.tif``, ``.tiff`` or ``.dng`` file.
        **hints: metadata the file and its sidecar do not give (any of :data:`SIDECAR_FIELDS`);
            a hint that contradicts them is an error.

    Returns:
        RawFrame with (H, W) native uint16 data.

    Raises:
        RawFormatError: the file or its sidecar is missing, truncated, malformed or inconsistent.
        TypeError: an unknown keyword.
    """
    p = Path(path)
    clean_hints = _check_hints(hints)
    reader = _READERS.get(p.suffix.lower())
    if reader is None:
        raise RawFormatError(p, "extension", f"one of {', '.join(EXTENSIONS)}", repr(p.suffix))
    try:
        regular_file(p, "an existing raw frame file")
    except InputFileError as err:
        raise _as_raw_error(p, err) from None
    return reader(p, clean_hints)


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


def _write_npy(tmp: Path, data: np.ndarray, meta: RawMeta) -> None:
    with open(tmp, "wb") as f:
        np.save(f, data.astype(_uint16_dtype(meta.byte_order)), allow_pickle=False)


def _write_headerless(tmp: Path, data: np.ndarray, meta: RawMeta) -> None:
    with open(tmp, "wb") as f:
        f.write(data.astype(_uint16_dtype(meta.byte_order)).tobytes())


def _write_png(tmp: Path, data: np.ndarray, meta: RawMeta) -> None:
    ok, buf = cv2.imencode(".png", _native(data))
    if not ok:  # pragma: no cover - OpenCV failure
        raise OSError(f"{tmp}: OpenCV could not encode the PNG")
    with open(tmp, "wb") as f:
        f.write(buf.tobytes())


def _tiff_byteorder(meta: RawMeta) -> str:
    return ">" if meta.byte_order == "big" else "<"


def _write_tiff(tmp: Path, data: np.ndarray, meta: RawMeta) -> None:
    tifffile = _import_tifffile(tmp)
    tifffile.imwrite(tmp, _native(data), byteorder=_tiff_byteorder(meta), photometric="minisblack",
                     metadata=None, software="privcam")


def _srational(values: Sequence[float], denominator: int = 10000) -> tuple[int, ...]:
    """Flattened (numerator, denominator) pairs, as tifffile wants RATIONAL/SRATIONAL values."""
    return tuple(x for v in values for x in (round(v * denominator), denominator))


def dng_tags(meta: RawMeta) -> list[tuple[int, int, int, Any, bool]]:
    """tifffile ``extratags`` of a DNG 1.4 raw IFD for ``meta`` (Photometric is set separately)."""
    tags: list[tuple[int, int, int, Any, bool]] = [
        (_TAG_NEW_SUBFILE_TYPE, _TIFF_LONG, 1, 0, True),  # 0: main (full-resolution raw) image
        (_TAG_DNG_VERSION, _TIFF_BYTE, 4, (1, 4, 0, 0), True),
        (_TAG_DNG_BACKWARD_VERSION, _TIFF_BYTE, 4, (1, 1, 0, 0), True),
        (_TAG_UNIQUE_CAMERA_MODEL, _TIFF_ASCII, 0, _CAMERA_MODEL, True),
        (_TAG_BLACK_LEVEL_REPEAT_DIM, _TIFF_SHORT, 2, (1, 1), True),
        (_TAG_BLACK_LEVEL, _TIFF_LONG, 1, meta.black_level, True),
        (_TAG_WHITE_LEVEL, _TIFF_LONG, 1, meta.white_level, True),
    ]
    if meta.cfa != "mono":
        matrix = [v for row in _XYZ_TO_LINEAR_SRGB for v in row]
        tags += [
            (_TAG_CFA_REPEAT_PATTERN_DIM, _TIFF_SHORT, 2, (2, 2), True),
            (_TAG_CFA_PATTERN, _TIFF_BYTE, 4, tuple(_CFA_CODE[c] for c in meta.cfa), True),
            (_TAG_CFA_PLANE_COLOR, _TIFF_BYTE, 3, (0, 1, 2), True),
            (_TAG_CFA_LAYOUT, _TIFF_SHORT, 1, 1, True),  # rectangular
            (_TAG_COLOR_MATRIX_1, _TIFF_SRATIONAL, 9, _srational(matrix), True),
            (_TAG_CALIBRATION_ILLUMINANT_1, _TIFF_SHORT, 1, _ILLUMINANT_D65, True),
            (_TAG_AS_SHOT_NEUTRAL, _TIFF_RATIONAL, 3, _srational([1.0, 1.0, 1.0]), True),
        ]
    return sorted(tags)


def write_dng(tmp: Path, data: np.ndarray, meta: RawMeta) -> None:
    """Write ``data`` as a DNG with ``meta``'s tags (:func:`dng_tags`) straight to ``tmp``.

    The format writer behind :func:`write_raw`, without its checks of ``meta`` against the data
    and without the atomic staging: use :func:`write_raw` unless a deliberately inconsistent file
    is wanted (the tests write one to check that :func:`read_raw` rejects it).
    """
    tifffile = _import_tifffile(tmp)
    mono = meta.cfa == "mono"
    # tifffile refuses LinearRaw with one sample, so mono is written BlackIsZero and patched below.
    tifffile.imwrite(tmp, _native(data), byteorder=_tiff_byteorder(meta),
                     photometric=_PHOTOMETRIC_MINISBLACK if mono else _PHOTOMETRIC_CFA,
                     metadata=None, software="privcam", description=f"privcam bit_depth={meta.bit_depth}",
                     extratags=dng_tags(meta))
    if mono:
        with tifffile.TiffFile(tmp, mode="r+b") as tif:
            tif.pages[0].tags[_TAG_PHOTOMETRIC].overwrite(_PHOTOMETRIC_LINEAR_RAW)


_WRITERS: dict[str, Callable[[Path, np.ndarray, RawMeta], None]] = {
    ".npy": _write_npy,
    ".raw": _write_headerless,
    ".bin": _write_headerless,
    ".png": _write_png,
    ".tif": _write_tiff,
    ".tiff": _write_tiff,
    ".dng": write_dng,
}
_NO_SIDECAR: frozenset[str] = frozenset({".dng"})


def write_raw(path: str | os.PathLike[str], frame_or_array: RawFrame | np.ndarray,
              meta: RawMeta | None = None) -> None:
    """Write a raw frame atomically; the format follows the file extension.

    Every format except ``.dng`` also gets a YAML sidecar ``<file>.yaml`` with all of ``meta``.

    Args:
        path: target ``.npy``, ``.raw``, ``.bin``, ``.png``, ``.tif``, ``.tiff`` or ``.dng`` file.
        frame_or_array: a RawFrame, or an (H, W) uint16 array.
        meta: metadata; required with a bare array, overrides ``frame.meta`` when given.

    Raises:
        RawFormatError: unknown extension, invalid ``meta``, or data that do not fit ``meta``.
        TypeError: a bare array without ``meta``.
    """
    p = Path(path)
    if isinstance(frame_or_array, RawFrame):
        data, meta = frame_or_array.data, meta if meta is not None else frame_or_array.meta
    else:
        data = frame_or_array
    if meta is None:
        raise TypeError(f"write_raw({p}): meta is required when writing a bare array")
    writer = _WRITERS.get(p.suffix.lower())
    if writer is None:
        raise RawFormatError(p, "extension", f"one of {', '.join(EXTENSIONS)}", repr(p.suffix))
    meta = validate_meta(p, {f.name: getattr(meta, f.name) for f in fields(RawMeta)})
    check_data(p, data, meta)
    targets = [p] if p.suffix.lower() in _NO_SIDECAR else [p, sidecar_path(p)]
    with staged_files(targets) as temps:
        writer(temps[0], data, meta)
        if len(temps) > 1:
            temps[1].write_text(_sidecar_text(meta), encoding="utf-8")
