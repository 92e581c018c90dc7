"""Nothing half-written: files are written to temporaries beside their targets, then renamed.

Temporaries get the usual mode (0o666 & ~umask), are fsync'ed before the rename, and are removed
on any error (including Ctrl-C), leaving existing targets untouched.

Streaming outputs (recordings, prediction files) are written to ``<target>.<random>.partial`` by a
:class:`StagedOutput`, unique per writer, and committed by :meth:`StagedOutput.finish`: an existing
target is only ever replaced by the output of a run that succeeded. :func:`check_output_path` checks
an output path before any work starts.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputPathError


def _create_unique(target: Path, name: Callable[[str], str], token_bytes: int, what: str) -> Path:
    """Create an empty file ``name(random hex)`` beside ``target``, never an existing one (mode 0o666 & ~umask)."""
    for _ in range(100):
        tmp = target.with_name(name(secrets.token_hex(token_bytes)))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{target}: could not create a unique {what}")  # pragma: no cover


def _create_temp(target: Path) -> Path:
    """Create an empty temporary file next to ``target`` with the same suffix."""
    return _create_unique(target, lambda token: f".{target.name}.{token}.tmp{target.suffix}", 6, "temporary file")


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def staged_files(targets: Sequence[Path]) -> Iterator[list[Path]]:
    """Yield temporary paths for ``targets``; on normal exit move each onto its target.

    Targets are replaced last to first, so a frame file is replaced after its sidecar. On any
    exception before the moves every temporary file is removed and no target is touched.
    """
    temps: list[Path] = []
    try:
        for target in targets:
            temps.append(_create_temp(target))
        yield temps
        for tmp in temps:
            _fsync(tmp)
        for tmp, target in reversed(list(zip(temps, targets, strict=True))):
            os.replace(tmp, target)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """One temporary path for ``target`` (parent folders created); moved into place on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with staged_files([target]) as (tmp,):
        yield tmp


def create_partial(target: str | os.PathLike) -> Path:
    """Create an empty, unique ``<target>.<random>.partial`` beside ``target`` (parent folders created)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return _create_unique(target, lambda token: f"{target.name}.{token}.partial", 4, ".partial file")


class StagedOutput:
    """One streaming output: written to :attr:`path` (``<target>.<random>.partial``), placed by :meth:`finish`.

    :meth:`finish` decides where the data end up:

    * the run succeeded: moved onto the target. A target that existed when the output was opened is
      replaced; one that appeared meanwhile (another run wrote it) is not: ours stays as the .partial;
    * the run failed or was interrupted and wrote nothing: the .partial is removed;
    * it failed after writing something and there is no target: moved onto the target (the run's summary
      says it stopped early);
    * it failed after writing something and the target exists: the target is left alone and what was
      written stays in the .partial, whose path :meth:`finish` returns.
    """

    def __init__(self, target: str | os.PathLike) -> None:
        self.target = Path(target)
        self.existed = self.target.exists()
        self.path = create_partial(self.target)
        self.note: str | None = None

    def finish(self, ok: bool, written: bool) -> Path | None:
        """Place the output (see the class docstring); returns where it is, or None when it was removed."""
        if not ok and not written:
            self.path.unlink(missing_ok=True)
            return None
        _fsync(self.path)
        if not ok and self.target.exists():
            self.note = f"{self.target} was not replaced; what this run wrote is in {self.path}"
            return self.path
        if ok and self.existed:
            os.replace(self.path, self.target)
            return self.target
        try:
            os.link(self.path, self.target)  # never replaces a target that appeared meanwhile
        except FileExistsError:
            self.note = f"{self.target} was written by someone else meanwhile; this run's output is in {self.path}"
            return self.path
        except OSError:  # no hard links here (e.g. some network or FAT file systems)
            if self.target.exists():
                self.note = f"{self.target} was written by someone else meanwhile; this run's output is in {self.path}"
                return self.path
            os.replace(self.path, self.target)
            return self.target
        self.path.unlink()
        return self.target

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def check_output_path(path: str | os.PathLike, field: str, suffixes: Sequence[str] | None = None,
                      inputs: Sequence[str | os.PathLike] = (), overwrite: bool = True) -> Path:
    """Refuse, before any work, an output path that cannot be written: a folder, a device or pipe, a path
    under a regular file, a folder without write permission, the wrong extension, one of the command's
    inputs, or (``overwrite=False``) an existing file. Missing parent folders are fine (they are created).

    Raises OutputPathError naming ``field`` and the path.
    """
    p = Path(path)
    if not str(path).strip():
        raise OutputPathError(f"{field}: expected an output path, got an empty string")
    if p.is_dir():
        raise OutputPathError(f"{field} {p}: expected a file path, got a folder")
    if p.exists() and not p.is_file():
        raise OutputPathError(f"{field} {p}: expected a regular file to replace, got a device, pipe or socket")
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise OutputPathError(f"{field} {p}: expected a path ending in {' or '.join(suffixes)} "
                              f"(that is what is written), got {p.suffix or 'no extension'!r}")
    if (p.exists() or p.is_symlink()) and not overwrite:
        raise OutputPathError(f"{field} {p}: exists; refusing to overwrite it (use --force to replace it)")
    for other in inputs:
        if other is not None and _same_file(p, other):
            raise OutputPathError(f"{field} {p}: is also an input of this command; choose another output path")
    parent = p.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise OutputPathError(f"{field} {p}: {parent} is a file, not a folder")
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{field} {p}: cannot write in the folder {parent} (permission denied)")
    return p


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
