"""Dataclass configs from YAML: strict field checks, and ``--set section.field=value`` overrides.

Errors are :class:`~sensor.errors.ConfigError` naming the source file and the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError, InputFileError
from .safeio import MAX_PIXELS_ENV, max_pixels, read_text

T = TypeVar("T")
_SCALARS = {"float": (float, "a number"), "int": (int, "an integer"), "str": (str, "a string"),
            "bool": (bool, "true or false")}


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2 floats: ``1.2e6`` and ``1e-3`` are numbers, not strings
    (YAML 1.1 wants a dot and a signed exponent)."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?\.[0-9_]+[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse YAML text safely (no objects), with YAML 1.2 floats (see :class:`YamlLoader`)."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - YamlLoader is a SafeLoader


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping from a file (empty file -> {}). Only a regular file of at most 16 MiB is read."""
    path = Path(path)
    try:
        text = read_text(path, "a readable YAML file")
    except InputFileError as err:
        raise ConfigError(str(path), "<file>", err.expected, err.got) from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(str(path), "<file>", "valid YAML", str(err).splitlines()[0]) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(str(path), "<root>", "a mapping of fields", type(data).__name__)
    return data


def coerce_field(source: str, name: str, type_name: str, value: Any) -> Any:
    """Check ``value`` against a dataclass field's (string) annotation; ints are accepted as floats."""
    optional = type_name.endswith("| None")
    base = type_name.removesuffix("| None").strip()
    if value is None:
        if optional:
            return None
        raise ConfigError(source, name, f"a value of type {base}", value)
    if base not in _SCALARS:
        return value  # containers (dict, tuple, ...) are checked by the dataclass itself
    kind, words = _SCALARS[base]
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, name, words, value)
        if not math.isfinite(float(value)):
            raise ConfigError(source, name, "a finite number", value)
        return float(value)
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(source, name, words, value)
    return value


def dataclass_from_dict(cls: type[T], data: dict[str, Any], source: str) -> T:
    """Build ``cls(**data)`` with unknown fields and wrong types reported by name."""
    if not isinstance(data, dict):
        raise ConfigError(source, "<root>", f"a mapping of {cls.__name__} fields", type(data).__name__)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(source, str(key), f"one of the fields {sorted(fields)}", key)
    kwargs = {k: coerce_field(source, k, str(fields[k].type), v) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(source, err.field, err.expected, err.got) from None


def apply_overrides(config: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """Apply ``a.b=value`` strings (value parsed as YAML) to a nested mapping; returns a new mapping."""
    out = _deep_copy(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(source, item, "section.field=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if any(not p for p in parts):
            raise ConfigError(source, dotted, "a dotted field name like pipeline.batch_size")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(source, dotted, f"'{part}' to be a section", child)
            node = child
        try:
            node[parts[-1]] = load_yaml(text)
        except yaml.YAMLError:
            raise ConfigError(source, dotted, "a YAML value", text) from None
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def check_range(source: str, name: str, value: Any, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is a finite number in [low, high] (or (low, high])."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        raise ConfigError(source, name, " and ".join(x for x in (lo, hi) if x) or "a finite number", value)


def check_size(source: str, name: str, value: Any, high: int = 1 << 16) -> tuple[int, int] | None:
    """An image size ``[height, width]`` (list or tuple of two integers in [1, high], at most
    :func:`sensor.safeio.max_pixels` pixels) as a tuple; None stays None. Else ConfigError naming ``name``."""
    if value is None:
        return None
    expected = f"[height, width]: two integers in [1, {high}]"
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= high for v in value)):
        raise ConfigError(source, name, expected, value)
    if value[0] * value[1] > max_pixels():
        raise ConfigError(source, name, f"at most {max_pixels():,} pixels (set {MAX_PIXELS_ENV} to allow more)",
                          list(value))
    return int(value[0]), int(value[1])
