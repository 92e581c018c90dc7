"""Dataclass configs from YAML: strict field checks, and ``--set section.field=value`` overrides.

Errors are :class:`~sensor.errors.ConfigError` naming the source file and the field.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")
_SCALARS = {"float": (float, "a number"), "int": (int, "an integer"), "str": (str, "a string"),
            "bool": (bool, "true or false")}


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping from a file (empty file -> {})."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(str(path), "<file>", "a readable YAML file", err.strerror) from None
    try:
        data = yaml.safe_load(text)
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
            node[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(source, dotted, "a YAML value", text) from None
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}
