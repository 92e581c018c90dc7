"""Nothing half-written: files are written to temporaries beside their targets, then renamed.

Temporaries get the usual mode (0o666 & ~umask), are fsync'ed before the rename, and are removed
on any error (including Ctrl-C), leaving existing targets untouched.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def _create_temp(target: Path) -> Path:
    """Create an empty temporary file next to ``target`` with the same suffix (mode 0o666 & ~umask)."""
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp{target.suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{target}: could not create a unique temporary file")  # pragma: no cover


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
