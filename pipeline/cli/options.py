"""Command-line option types with ranges, and the one output-path check every command runs before its work."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import Any

from sensor.atomic import check_output_path
from sensor.errors import OutputPathError


# -- option ranges --------------------------------------------------------------------------------------------------
def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [low, high]; the error names the option (argparse adds it)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def float_range(low: float, high: float, low_open: bool = True) -> Callable[[str], float]:
    """argparse type: a finite number in (low, high] (or [low, high])."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a finite number {'>' if low_open else '>='} {low:g} and "
                                             f"<= {high:g}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


SEED = int_range(0, 2**63 - 1)
FRAME_INDEX = int_range(0, 2**62)
COUNT = int_range(1)
EPOCHS = int_range(1, 10_000)
WORKERS = int_range(1, 256)


# -- output paths ---------------------------------------------------------------------------------------------------
def check_outputs(outputs: list[tuple[str | None, str, tuple[str, ...] | None]], inputs: list[Any] = ()) -> None:
    """Check every (path, option, suffixes) output of a command before any work: writable, the right
    extension, not an input, and no two the same file. Raises OutputPathError naming the option."""
    seen: dict[str, str] = {}
    ins = [str(p) for p in inputs if p]
    for path, option, suffixes in outputs:
        if path is None:
            continue
        check_output_path(path, option, suffixes, inputs=ins)
        where = os.path.abspath(path)
        if where in seen:
            raise OutputPathError(f"{option} {path}: the same file as {seen[where]}; choose different paths")
        seen[where] = option
