"""``privcam data NAME``: fetch a dataset's official files into privcam's cache, verified.

Each file is downloaded into ``<file>.<random>.part`` beside its final name, resumed with an HTTP
Range request when an interrupted run left a part, checked against the published sums, and only
then renamed into place (atomically). So the final name only ever holds a complete, verified file;
a part that fails its check is deleted.

Checksums: the dataset authors publish MD5 sums, not SHA-256 (Fashion-MNIST: the README of
zalandoresearch/fashion-mnist; MNIST: as torchvision lists them for the files on its mirror;
CIFAR-10: the dataset's web page). A SHA-256 is pinned only where we could compute it from a file
whose published MD5 matched; none of the official archives could be fetched where this was
written (and Debian's ``dataset-fashion-mnist`` recompresses its files, so its SHA-256 sums are not
the archives'), so every ``sha256`` below is None and the published MD5 is what is checked. After a
file passes, its SHA-256 is written to ``SHA256SUMS`` in the dataset's folder (``sha256sum -c``).

Cache: ``$PRIVCAM_DATA_DIR``, else ``$XDG_CACHE_HOME/privcam``, else ``~/.cache/privcam``; one
folder per dataset. :func:`pipeline.stream.datasets.load_dataset` looks there after ``--data``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from sensor.errors import PrivcamError

try:  # POSIX: a part being downloaded is locked, so two runs never write the same part
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

CACHE_ENV = "PRIVCAM_DATA_DIR"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 30.0
FILE_MODE = 0o644  # a dataset is not a secret (temporary files are created 0600)


class DataFetchError(PrivcamError):
    """A dataset could not be downloaded, or a download failed its checksum."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: its name on the server and in the cache, and its sums.

    ``md5`` is the sum the dataset's authors publish. ``sha256`` is None where no SHA-256 could be
    verified against a published sum; then only the MD5 is checked.
    """

    name: str
    md5: str | None
    sha256: str | None = None


@dataclass(frozen=True)
class RemoteDataset:
    """A dataset's files, the servers that have them (canonical first) and what to do offline."""

    name: str
    mirrors: tuple[str, ...]
    files: tuple[RemoteFile, ...]
    manual: str
    extract: str | None = None  # a .tar.gz unpacks to this folder inside the dataset's folder


def _idx_files(md5: dict[str, str]) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(f"{stem}.gz", md5[stem]) for stem in md5)


SOURCES: dict[str, RemoteDataset] = {
    "fashion-mnist": RemoteDataset(
        "fashion-mnist",
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",),
        _idx_files({  # MD5: github.com/zalandoresearch/fashion-mnist README
            "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
        }),
        "install Debian's dataset-fashion-mnist (apt install dataset-fashion-mnist; privcam finds "
        "/usr/share/datasets/fashion-mnist by itself), or copy the four IDX files (.gz or not) from a machine "
        "with network into a folder and pass --data DIR"),
    "mnist": RemoteDataset(
        "mnist",
        ("https://ossci-datasets.s3.amazonaws.com/mnist", "http://yann.lecun.com/exdb/mnist"),
        _idx_files({  # MD5: as published for these files (torchvision's MNIST resources)
            "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
        }),
        "copy the four MNIST IDX files (.gz or not) from a machine with network into a folder and pass --data DIR"),
    "cifar10": RemoteDataset(
        "cifar10",
        ("https://www.cs.toronto.edu/~kriz",),
        (RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),  # MD5: the dataset's page
        "copy cifar-10-python.tar.gz from a machine with network, unpack it, and pass --data "
        "DIR/cifar-10-batches-py (the python pickle batches)",
        extract="cifar-10-batches-py"),
}


def cache_root() -> Path:
    """Where ``privcam data`` puts datasets: $PRIVCAM_DATA_DIR, else $XDG_CACHE_HOME/privcam, else
    ~/.cache/privcam (an XDG_CACHE_HOME that is not absolute is ignored, as the spec says)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "privcam"


def dataset_folder(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder ``privcam data NAME`` writes: ``<root or cache_root()>/<name>``."""
    return Path(root if root is not None else cache_root()).expanduser() / name


def data_path(name: str, root: str | os.PathLike | None = None) -> Path:
    """The path a loader reads for ``name`` in the cache (the unpacked folder for CIFAR-10)."""
    folder = dataset_folder(name, root)
    extract = SOURCES[name].extract if name in SOURCES else None
    return folder / extract if extract else folder


def file_sums(path: Path) -> tuple[str, str]:
    """(md5, sha256) hex digests of a file, in one pass."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def check_sums(path: Path, spec: RemoteFile) -> str | None:
    """None when ``path`` matches every sum ``spec`` has, else what differs (for the message)."""
    md5, sha = file_sums(path)
    if spec.sha256 is not None and sha != spec.sha256:
        return f"SHA-256 {sha} differs from the expected {spec.sha256}"
    if spec.md5 is not None and md5 != spec.md5:
        return f"MD5 {md5} differs from the published {spec.md5}"
    return None


class _Unreachable(Exception):
    """This URL did not deliver the file (no network, HTTP error, connection lost)."""


@contextmanager
def _claimed_part(dest: Path) -> Iterator[tuple[Path, IO[bytes]]]:
    """An open, locked ``<dest>.<random>.part``: a part left by an interrupted run if there is one
    (to resume), else a new one. Parts that another run holds are left alone."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    parts = sorted(dest.parent.glob(f"{dest.name}.*.part"), key=lambda p: p.stat().st_size, reverse=True)
    for path in parts:
        fh = open(path, "a+b")
        if _try_lock(fh):
            break
        fh.close()
    else:
        fd, name = tempfile.mkstemp(prefix=f"{dest.name}.", suffix=".part", dir=dest.parent)
        path, fh = Path(name), os.fdopen(fd, "a+b")
        _try_lock(fh)
    try:
        yield path, fh
    finally:
        fh.close()


def _try_lock(fh: IO[bytes]) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _download(url: str, fh: IO[bytes], label: str, progress: bool) -> None:
    """Append the rest of ``url`` to the part ``fh`` (a Range request when it has bytes already;
    restarted from zero when the server ignores the range)."""
    offset = os.fstat(fh.fileno()).st_size
    headers = {"User-Agent": "privcam"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left to send: the part is whole (the sums will tell)
            return
        raise _Unreachable(f"HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise _Unreachable(str(getattr(err, "reason", err))) from None
    with response:
        resumed = offset and response.status == 206 and \
            response.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
        if not resumed:
            offset = 0
            fh.truncate(0)
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        received = offset
        with tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                  disable=not progress) as bar:
            try:
                while True:
                    try:
                        chunk = response.read(CHUNK_BYTES)
                    except (OSError, http.client.HTTPException) as err:
                        raise _Unreachable(f"connection lost after {received} bytes ({err})") from None
                    if not chunk:
                        break
                    fh.write(chunk)  # a full disk raises OSError here: not a network problem
                    received += len(chunk)
                    bar.update(len(chunk))
            finally:
                fh.flush()
                os.fsync(fh.fileno())
    if total is not None and received != total:
        raise _Unreachable(f"connection closed after {received} of {total} bytes")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def fetch_file(source: RemoteDataset, spec: RemoteFile, folder: Path, mirrors: tuple[str, ...],
               progress: bool = True) -> dict[str, Any]:
    """Make ``folder/spec.name`` a verified copy of the file. Returns {name, status, bytes, md5, sha256}."""
    dest = folder / spec.name
    if dest.exists() and check_sums(dest, spec) is None:
        md5, sha = file_sums(dest)
        return {"name": spec.name, "status": "present", "bytes": dest.stat().st_size, "md5": md5, "sha256": sha}
    status = "downloaded"
    for attempt in range(2):  # a resumed part that fails its sums is fetched once more from zero
        with _claimed_part(dest) as (part, fh):
            resumed_from = os.fstat(fh.fileno()).st_size
            if resumed_from:
                status = "resumed"
            failures = []
            for base in mirrors:
                url = f"{base.rstrip('/')}/{spec.name}"
                try:
                    _download(url, fh, spec.name, progress)
                    break
                except _Unreachable as err:
                    failures.append(f"{url}: {err}")
            else:
                kept = os.fstat(fh.fileno()).st_size
                if not kept:
                    part.unlink(missing_ok=True)
                partial = (f"; the {kept} bytes received are kept in {part.name} and the next run resumes there"
                           if kept else "")
                raise DataFetchError(f"{source.name}: cannot download {spec.name} ({'; '.join(failures)}){partial}. "
                                     f"No network? Then {source.manual}")
            problem = check_sums(part, spec)
            if problem is None:
                os.chmod(part, FILE_MODE)
                os.replace(part, dest)
                _fsync_dir(folder)
                break
            part.unlink()
        if attempt or not resumed_from:
            raise DataFetchError(f"{source.name}: {spec.name} from {url}: {problem}; the download is corrupt or not "
                                 f"the official file, and was deleted (nothing was kept under {dest.name})")
        status = "downloaded"
    md5, sha = file_sums(dest)
    return {"name": spec.name, "status": status, "bytes": dest.stat().st_size, "md5": md5, "sha256": sha}


def _safe_members(archive: tarfile.TarFile, top: str) -> list[tarfile.TarInfo]:
    """Regular files and folders under ``top/`` only: no links, devices, absolute paths or '..'."""
    members = []
    for m in archive.getmembers():
        parts = Path(m.name).parts
        if (Path(m.name).is_absolute() or ".." in parts or not parts or parts[0] != top
                or not (m.isfile() or m.isdir())):
            raise DataFetchError(f"{archive.name}: unexpected member {m.name!r} (expected files under {top}/)")
        members.append(m)
    return members


def _extract(archive_path: Path, top: str, folder: Path) -> None:
    """Unpack ``top/`` from the archive into ``folder`` through a temporary folder and one rename."""
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=folder))
    try:
        with tarfile.open(archive_path, "r:gz") as archive:
            members = _safe_members(archive, top)
            if hasattr(tarfile, "data_filter"):
                archive.extractall(tmp, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4; members were checked above
                archive.extractall(tmp, members=members)
        os.replace(tmp / top, folder / top)
        _fsync_dir(folder)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataFetchError(f"{archive_path}: cannot unpack: {err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_sha256sums(folder: Path, files: list[dict[str, Any]]) -> None:
    path = folder / "SHA256SUMS"
    fd, tmp = tempfile.mkstemp(prefix=".SHA256SUMS.", dir=folder)
    with os.fdopen(fd, "w") as fh:
        fh.writelines(f"{f['sha256']}  {f['name']}\n" for f in files)
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)


def fetch(name: str, root: str | os.PathLike | None = None, mirror: str | None = None, progress: bool = True,
          sources: dict[str, RemoteDataset] | None = None) -> dict[str, Any]:
    """Download dataset ``name`` into ``<root or cache_root()>/<name>`` (see the module docstring).

    ``mirror`` replaces the canonical servers with one base URL that has the same file names; the
    sums are checked all the same. Returns a summary: folder, the path to pass as ``--data``, and
    each file's status (present, downloaded or resumed), size and sums.
    """
    sources = SOURCES if sources is None else sources
    if name not in sources:
        raise DataFetchError(f"dataset: expected one of {', '.join(sources)}, got {name!r}")
    source = sources[name]
    folder = dataset_folder(name, root)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataFetchError(f"{folder}: cannot create the dataset folder: {err.strerror}") from None
    mirrors = (mirror,) if mirror else source.mirrors
    try:
        files = [fetch_file(source, spec, folder, mirrors, progress) for spec in source.files]
        _write_sha256sums(folder, files)
        if source.extract and not (folder / source.extract).is_dir():
            _extract(folder / source.files[0].name, source.extract, folder)
    except OSError as err:  # the cache side: permissions, a full disk (a part keeps what was received)
        raise DataFetchError(f"{folder}: cannot write the dataset: {err.strerror or err}") from None
    path = folder / source.extract if source.extract else folder
    default = root is None or Path(root).expanduser().resolve() == cache_root().resolve()
    return {"dataset": name, "folder": str(folder), "data": str(path),
            "found_automatically": default,
            "use": (f"privcam finds it by itself (the cache, {cache_root()})" if default else
                    f"pass --data {path}, or set {CACHE_ENV}={Path(root).expanduser()}"),
            "checked": "published MD5" + (" and SHA-256" if any(f.sha256 for f in source.files) else ""),
            "files": files}
