"""Reading files a user hands in, safely: regular files only, sizes checked before anything is allocated.

* A named pipe, device or folder given as an input is refused without being opened for reading (a
  pipe would block forever, ``/dev/zero`` never ends).
* Images are read as bytes and decoded in memory (``cv2.imdecode``; ``cv2.imread`` crashes on file
  names that are not valid UTF-8). The size an image *declares* in its header (PNG, JPEG, BMP, WebP,
  TIFF) is checked against :func:`max_pixels` before the decoder allocates it; anything whose size
  cannot be read from its header is refused.
* :func:`max_pixels` is the largest frame or image accepted, ``PRIVCAM_MAX_PIXELS`` (default 50
  million pixels, a 50 MP sensor; a frame costs about 135 bytes per pixel through the pipeline) and
  :func:`max_dataset_bytes` the largest dataset array, ``PRIVCAM_MAX_DATASET_BYTES`` (default 4 GiB).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import struct
from collections.abc import Iterator

import numpy as np

from .errors import ConfigError, InputFileError

MAX_PIXELS_ENV = "PRIVCAM_MAX_PIXELS"
MAX_DATASET_BYTES_ENV = "PRIVCAM_MAX_DATASET_BYTES"
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_DATASET_BYTES = 4 << 30
IMAGE_FORMATS = "PNG, JPEG, BMP, WebP or TIFF"


def _limit_from_env(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text.strip().replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError("environment", name, "a positive integer", text)
    return value


def max_pixels() -> int:
    """Largest image or raw frame accepted (pixels): ``$PRIVCAM_MAX_PIXELS`` or 50,000,000."""
    return _limit_from_env(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS)


def max_dataset_bytes() -> int:
    """Largest dataset array accepted (bytes): ``$PRIVCAM_MAX_DATASET_BYTES`` or 4 GiB."""
    return _limit_from_env(MAX_DATASET_BYTES_ENV, DEFAULT_MAX_DATASET_BYTES)


def check_pixels(path: str | os.PathLike, height: int, width: int, what: str = "an image") -> None:
    """Refuse a declared size above :func:`max_pixels` (or not positive) before anything is allocated."""
    limit = max_pixels()
    if height < 1 or width < 1:
        raise InputFileError(path, f"{what} with a positive size", f"{width}x{height}")
    if height * width > limit:
        raise InputFileError(path, f"{what} of at most {limit:,} pixels (set {MAX_PIXELS_ENV} to allow more)",
                             f"{width}x{height} = {height * width:,} pixels declared")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def regular_file(path: str | os.PathLike, what: str = "a file") -> os.stat_result:
    """``stat`` of ``path`` if it is a regular file (symlinks followed); InputFileError otherwise.

    Never opens the file, so a named pipe cannot block.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputFileError(path, what, "no such file") from None
    except OSError as err:
        raise InputFileError(path, what, f"cannot stat it: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputFileError(path, f"{what} (a regular file)", _kind(st.st_mode))
    return st


def open_regular(path: str | os.PathLike, what: str = "a file"):
    """Open a regular file for binary reading; pipes, devices and folders are refused without blocking."""
    def opener(name: str, flags: int) -> int:
        return os.open(name, flags | getattr(os, "O_NONBLOCK", 0))

    try:
        fh = open(path, "rb", opener=opener)  # noqa: SIM115 - returned to the caller
    except FileNotFoundError:
        raise InputFileError(path, what, "no such file") from None
    except IsADirectoryError:
        raise InputFileError(path, f"{what} (a regular file)", "a folder") from None
    except OSError as err:
        raise InputFileError(path, what, f"cannot open it: {err.strerror}") from None
    try:
        mode = os.fstat(fh.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise InputFileError(path, f"{what} (a regular file)", _kind(mode))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fh.fileno(), True)
        return fh
    except BaseException:
        fh.close()
        raise


def read_bytes(path: str | os.PathLike, what: str = "a file", limit: int | None = None) -> bytes:
    """The whole of a regular file, refusing one larger than ``limit`` bytes before reading it."""
    with open_regular(path, what) as fh:
        size = os.fstat(fh.fileno()).st_size
        if limit is not None and size > limit:
            raise InputFileError(path, f"{what} of at most {limit:,} bytes", f"{size:,} bytes")
        try:
            return fh.read()
        except OSError as err:
            raise InputFileError(path, what, f"read error: {err.strerror}") from None


def read_text(path: str | os.PathLike, what: str = "a text file", limit: int = 16 << 20) -> str:
    """A UTF-8 text file (regular, at most ``limit`` bytes)."""
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputFileError(path, f"{what} in UTF-8", f"an invalid byte at offset {err.start}") from None


# -- declared image sizes -------------------------------------------------------------------------------------------
def _png(b: bytes) -> tuple[int, int] | None:
    if len(b) >= 24 and b[12:16] == b"IHDR":
        w, h = struct.unpack_from(">II", b, 16)
        return h, w
    return None


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(b: bytes) -> tuple[int, int] | None:
    i, n = 2, len(b)
    while i + 4 <= n:
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (seglen,) = struct.unpack_from(">H", b, i + 2)
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            h, w = struct.unpack_from(">HH", b, i + 5)
            return h, w
        if marker == 0xDA or seglen < 2:  # image data before any frame header
            return None
        i += 2 + seglen
    return None


def _bmp(b: bytes) -> tuple[int, int] | None:
    if len(b) < 26:
        return None
    (dib,) = struct.unpack_from("<I", b, 14)
    if dib == 12:
        w, h = struct.unpack_from("<HH", b, 18)
        return h, w
    w, h = struct.unpack_from("<ii", b, 18)
    return abs(h), abs(w)


def _webp(b: bytes) -> tuple[int, int] | None:
    fourcc = b[12:16]
    if fourcc == b"VP8 " and len(b) >= 30:
        w, h = struct.unpack_from("<HH", b, 26)
        return h & 0x3FFF, w & 0x3FFF
    if fourcc == b"VP8L" and len(b) >= 25:
        (bits,) = struct.unpack_from("<I", b, 21)
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if fourcc == b"VP8X" and len(b) >= 30:
        w = int.from_bytes(b[24:27], "little") + 1
        h = int.from_bytes(b[27:30], "little") + 1
        return h, w
    return None


def _tiff(b: bytes) -> tuple[int, int] | None:
    order = "<" if b[:2] == b"II" else ">"
    (version,) = struct.unpack_from(order + "H", b, 2)
    try:
        if version == 42:
            (offset,) = struct.unpack_from(order + "I", b, 4)
            (count,) = struct.unpack_from(order + "H", b, offset)
            entries, size, head = offset + 2, 12, order + "HHI"
        elif version == 43:  # BigTIFF
            (offset,) = struct.unpack_from(order + "Q", b, 8)
            (count,) = struct.unpack_from(order + "Q", b, offset)
            entries, size, head = offset + 8, 20, order + "HHQ"
        else:
            return None
        found: dict[int, int] = {}
        for k in range(min(count, 4096)):
            pos = entries + k * size
            tag, typ, _ = struct.unpack_from(head, b, pos)
            value_at = pos + struct.calcsize(head)
            if tag in (256, 257):
                fmt = {3: "H", 4: "I", 16: "Q"}.get(typ)
                if fmt is None:
                    return None
                (found[tag],) = struct.unpack_from(order + fmt, b, value_at)
        if 256 in found and 257 in found:
            return found[257], found[256]
    except struct.error:
        return None
    return None


def declared_image_size(data: bytes) -> tuple[str, tuple[int, int] | None]:
    """(format, (height, width) or None) from an encoded image's header, without decoding it."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG", _png(data)
    if data[:2] == b"\xff\xd8":
        return "JPEG", _jpeg(data)
    if data[:2] == b"BM":
        return "BMP", _bmp(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP", _webp(data)
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF", _tiff(data)
    return "unknown", None


IMREAD_MODES = ("unchanged", "grey", "colour")


@contextlib.contextmanager
def quiet_decoders() -> Iterator[None]:
    """Silence OpenCV's and tifffile's own log lines about a damaged file while it is decoded: the caller
    reports the problem once, in one line. (libpng may still print its own messages.)"""
    import cv2

    logger = logging.getLogger("tifffile")
    level, cv_level = logger.level, None
    logger.setLevel(logging.CRITICAL)
    try:
        cv_level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except AttributeError:  # pragma: no cover - an OpenCV build without the logging utilities
        pass
    try:
        yield
    finally:
        logger.setLevel(level)
        if cv_level is not None:
            cv2.utils.logging.setLogLevel(cv_level)


def read_image(path: str | os.PathLike, mode: str = "unchanged", what: str = "an image") -> np.ndarray:
    """Decode an image file safely. ``mode``: unchanged (as stored), grey (H, W) or colour (H, W, 3) BGR.

    Raises InputFileError for anything that is not a regular file holding a decodable PNG, JPEG, BMP,
    WebP or TIFF image of at most :func:`max_pixels` pixels.
    """
    import cv2

    flags = {"unchanged": cv2.IMREAD_UNCHANGED, "grey": cv2.IMREAD_GRAYSCALE, "colour": cv2.IMREAD_COLOR}[mode]
    limit = max_pixels()
    data = read_bytes(path, what, limit=8 * limit + (1 << 20))
    fmt, size = declared_image_size(data)
    if fmt == "unknown":
        raise InputFileError(path, f"{what} ({IMAGE_FORMATS})", "an unknown file format")
    if size is None:
        raise InputFileError(path, f"{what} whose {fmt} header gives its size", "a damaged or truncated header")
    check_pixels(path, *size, what=what)
    try:
        with quiet_decoders():
            image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as err:
        raise InputFileError(path, f"a decodable {fmt} image", str(err).strip().splitlines()[-1]) from None
    if image is None or image.size == 0:
        raise InputFileError(path, f"a decodable {fmt} image", "damaged or unsupported data")
    return image


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when both paths exist and name the same file."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def display(path: str | os.PathLike) -> str:
    """A path for messages: undecodable bytes shown as escapes."""
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")

