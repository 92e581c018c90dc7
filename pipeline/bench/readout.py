"""Throughput of the keyed readout permutation against memcpy.

Run: ``python -m pipeline.bench.readout --json out.json [--height H --width W --repeat N]``
(default a 12 MP frame, 3000 x 4000 uint16).

Every case moves one (H, W) uint16 frame into a preallocated output. Cases are measured
interleaved (one round runs every case once, ``--repeat`` rounds), after a warm-up round that
also compiles the numba kernels, with ``time.perf_counter``; the median is reported (and the
minimum, less sensitive to a shared machine). ``gb_per_s`` is frame bytes / median time and
``ratio_to_memcpy`` is that throughput over ``np.copyto``'s (1.0 = as fast as a copy).

Cases: ``memcpy``; ``full_table_*``: the pixel scheme applied as one gather through its composed
(H*W,) int64 table (numpy ``take``, numba parallel); ``three_pass_forward|inverse/<scheme>``: the
library path (``ReadoutPermutation.forward`` / ``inverse`` with ``out=``, scratch included);
``three_pass_strips_forward/<scheme>``: the alternative with pass B on in-place column strips.

Table costs: ``static`` builds the pass tables once for a static key (AES-256-CTR keystreams and
numba shuffles);
``rotation`` is the per-frame cost with a rotated key: building the frame's tables, then reading
it out.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numba
import numpy as np
import torch

from pipeline.bench.common import write_json
from sensor import readout as ro
from sensor import readout_kernels as rk
from sensor.keys import Key


def _time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleaved(cases: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Warm up every case once, then ``repeat`` rounds of each case. Returns seconds per case."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            times[name].append(_time_once(fn))
    return times


def _strip_forward(perm: ro.ReadoutPermutation, x: np.ndarray, y: np.ndarray) -> Callable[[], None]:
    """Three passes with pass B as in-place column strips (no scratch), for comparison.

    x, y: (H, W) uint16, y C-contiguous and 4-byte aligned.
    """
    a, b, c = perm.kernel_tables()
    bt = np.ascontiguousarray(b.transpose(0, 2, 1))
    x5, y5 = rk.unit_view(rk.aligned(x[None]), perm.scheme), rk.unit_view(y[None], perm.scheme)
    tile = rk.tile_units(perm.scheme)

    def forward() -> None:
        rk.rows_nb(x5, a, y5, False, False)
        rk.cols_nb(y5, bt, y5, tile, False)
        rk.rows_nb(y5, c, y5, True, False)

    return forward


def throughput_cases(x: np.ndarray, subkey: bytes) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
    """Named callables moving frame x (H, W) uint16, and each case's scheme ('' if none)."""
    height, width = x.shape
    y, z = np.empty_like(x), np.empty_like(x)
    flat_x, flat_y = x.reshape(1, -1), y.reshape(1, -1)
    pi = ro.ReadoutPermutation("pixel", height, width, subkey).table()
    cases: dict[str, Callable[[], object]] = {
        "memcpy": lambda: np.copyto(y, x),
        "full_table_numpy_take": lambda: np.take(flat_x[0], pi, out=flat_y[0]),
        "full_table_numba": lambda: rk.flat_gather_nb(flat_x, pi, flat_y),
    }
    schemes = {name: "" for name in cases}
    for scheme in ro.SCHEMES:
        if scheme != "pixel" and (height % 2 or width % 2):
            continue
        perm = ro.ReadoutPermutation(scheme, height, width, subkey)
        fwd = perm.forward(x)
        cases[f"three_pass_forward/{scheme}"] = lambda p=perm: p.forward(x, out=y)
        cases[f"three_pass_inverse/{scheme}"] = lambda p=perm, f=fwd: p.inverse(f, out=z)
        cases[f"three_pass_strips_forward/{scheme}"] = _strip_forward(perm, x, y)
        for kind in ("forward", "inverse", "strips_forward"):
            schemes[f"three_pass_{kind}/{scheme}"] = scheme
    return cases, schemes


def _scheme_table_costs(key: Key, scheme: str, x: np.ndarray, repeat: int) -> list[dict]:
    """Table costs of one scheme for frames like x (H, W) uint16; see :func:`table_costs`."""
    height, width = x.shape
    y = np.empty_like(x)
    subkey = ro.readout_subkey(key, scheme)
    frame_indices = iter(range(1 << 30))

    def static() -> None:
        ro.ReadoutPermutation(scheme, height, width, subkey).kernel_tables()

    def rotation() -> None:
        ro.readout_permutation(key, scheme, height, width, next(frame_indices)).forward(x, out=y)

    rows = []
    for name, secs in _interleaved({"static": static, "rotation": rotation}, repeat).items():
        rows.append(dict(name=f"tables_{name}", scheme=scheme, ms=1e3 * statistics.median(secs),
                         ms_min=1e3 * min(secs)))
    return rows


def table_costs(height: int, width: int, repeat: int) -> list[dict]:
    """Table-building costs per scheme, in ms.

    ``tables_static``: pass tables for a static key (numba), built once per key.
    ``tables_rotation``: per-frame rotation: tables of a new frame index, then its readout.
    """
    key = Key.generate()
    x = np.random.default_rng(1).integers(0, 1 << 16, (height, width), dtype=np.uint16)
    rows = []
    for scheme in ro.SCHEMES:
        if scheme == "pixel" or (height % 2 == 0 and width % 2 == 0):
            rows += _scheme_table_costs(key, scheme, x, repeat)
    return rows


def run(height: int, width: int, repeat: int) -> dict:
    """All measurements as a JSON-ready dict."""
    x = np.random.default_rng(0).integers(0, 1 << 16, (height, width), dtype=np.uint16)
    subkey = ro.readout_subkey(Key.generate(), "pixel")
    cases, schemes = throughput_cases(x, subkey)
    times = _interleaved(cases, repeat)
    nbytes = x.nbytes
    memcpy_ms = 1e3 * statistics.median(times["memcpy"])
    results = []
    for name, secs in times.items():
        ms = 1e3 * statistics.median(secs)
        results.append(dict(name=name, scheme=schemes[name], ms=ms, ms_min=1e3 * min(secs),
                            gb_per_s=nbytes / ms / 1e6, ratio_to_memcpy=memcpy_ms / ms))
    return dict(
        frame=dict(height=height, width=width, dtype="uint16", bytes=nbytes),
        repeat=repeat,
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                     numba_threads=numba.get_num_threads(), threading_layer=_threading_layer(),
                     numpy=np.__version__, numba=numba.__version__, torch=torch.__version__),
        results=results,
        tables=table_costs(height, width, max(3, repeat // 2)),
    )


def _threading_layer() -> str:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return "unknown"


def print_table(report: dict) -> None:
    frame = report["frame"]
    print(f"frame {frame['height']}x{frame['width']} uint16 ({frame['bytes'] / 1e6:.1f} MB), "
          f"median of {report['repeat']}, {report['machine']['numba_threads']} numba threads")
    print(f"{'case':40s} {'ms':>9s} {'min ms':>9s} {'GB/s':>8s} {'x memcpy':>9s}")
    for r in report["results"]:
        print(f"{r['name']:40s} {r['ms']:9.2f} {r['ms_min']:9.2f} {r['gb_per_s']:8.2f} "
              f"{r['ratio_to_memcpy']:9.3f}")
    print(f"\n{'tables':40s} {'ms':>9s} {'min ms':>9s}")
    for r in report["tables"]:
        print(f"{r['name'] + '/' + r['scheme']:40s} {r['ms']:9.2f} {r['ms_min']:9.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args(argv)
    if args.height < 1 or args.width < 1 or args.repeat < 1:
        parser.error("--height, --width and --repeat must be positive")
    report = run(args.height, args.width, args.repeat)
    print_table(report)
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
