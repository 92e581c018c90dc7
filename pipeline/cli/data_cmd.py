"""``privcam data NAME``: options and output of :func:`pipeline.stream.datafetch.fetch`."""

from __future__ import annotations

import argparse
from typing import Any

from ..stream.datafetch import CACHE_ENV, SOURCES

EXAMPLE = "privcam data fashion-mnist\n  privcam data cifar10 --root /data/privcam"
HELP = ("Download a dataset's official files (fashion-mnist, mnist, cifar10) into privcam's cache, with a progress "
        f"bar, resuming a partial download and checking the published sums. The cache is ${CACHE_ENV}, else "
        "$XDG_CACHE_HOME/privcam, else ~/.cache/privcam; commands look there after --data.")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``privcam data`` (``--json`` comes from the CLI's common options)."""
    p.add_argument("name", choices=sorted(SOURCES), help="dataset to fetch")
    p.add_argument("--root", help=f"cache folder to write into (default: ${CACHE_ENV} or the XDG cache); the "
                   "dataset goes to ROOT/NAME")
    p.add_argument("--mirror", metavar="URL", help="fetch from this base URL instead (same file names; the "
                   "published sums are checked all the same)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_data(args: argparse.Namespace) -> dict[str, Any]:
    from ..stream.datafetch import fetch

    summary = fetch(args.name, root=args.root, mirror=args.mirror, progress=not args.quiet)
    if args.json:
        return summary
    files = summary.pop("files")
    for f in files:
        summary[f["name"]] = f"{f['status']}, {f['bytes']} bytes, sha256 {f['sha256'][:16]}..."
    return summary
