"""The process's malloc settings for streams of large frames: freed memory is kept for the next frame.

glibc's malloc hands a large block back to the kernel when it is freed: blocks above its mmap threshold
(dynamic, at most 32 MiB: every 1920x1080 batch's network input, 66 MB) are unmapped, and the top of a
heap is trimmed; and each thread allocates from an arena of its own. In a stream every frame allocates
the same arrays again (the exposure's output, the checks' temporaries, the network input), so each one
was fresh pages from the kernel: page faults and zeroing, system time on both cores. Measured on the
2-core machine (1920x1080 pixel readout, 24 frames, 2026-12-03): the sensor stage ran at 14-18
frames/s with glibc's defaults and 19-24 with these settings, and the system time of a whole
benchmark run fell from 4.8-7.9 s to 1.1-3.5 s.

:func:`keep_freed_memory` sets, through ``mallopt``: the mmap threshold to 1 GiB (blocks below it come
from the heap and are reused), the trim threshold to 2 GiB (the heap is not shrunk after each frame),
and one arena for every thread (a stage thread's frees are reused by the others). The peak memory is
that of the frames in flight, as before; it is kept, not returned, between frames. Only the CLI's entry
points call it (a process setting, like a thread count); elsewhere (not glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 30
TRIM_THRESHOLD_BYTES = 2 << 30


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep and reuse freed memory (see the module docstring). Returns whether
    every setting was taken (False off glibc, or where ``mallopt`` refuses one)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    results = [mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
               mallopt(M_ARENA_MAX, 1)]
    return all(r == 1 for r in results)
