"""Exception types of privcam. Every message names the input, the field and what was expected."""

from __future__ import annotations


class PrivcamError(Exception):
    """Base class of every error privcam raises on purpose."""


class RawFormatError(PrivcamError, ValueError):
    """A raw frame file (or its sidecar) is missing, truncated, or does not match its header."""

    def __init__(self, path: object, field: str, expected: str, got: object = None) -> None:
        self.path, self.field, self.expected, self.got = str(path), field, expected, got
        msg = f"{path}: {field}: expected {expected}"
        if got is not None:
            msg += f", got {got}"
        super().__init__(msg)


class ConfigError(PrivcamError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""

    def __init__(self, source: str, field: str, expected: str, got: object = None) -> None:
        self.source, self.field, self.expected, self.got = source, field, expected, got
        msg = f"{source}: field '{field}': expected {expected}"
        if got is not None:
            msg += f", got {got!r}"
        super().__init__(msg)


class KeyFileError(PrivcamError):
    """A key file is missing, unreadable, malformed or too widely readable.

    Messages never contain key material: only the path and what was wrong.
    """


class DatasetError(PrivcamError, ValueError):
    """A dataset file is missing or not in the expected format."""


class InputFileError(PrivcamError, ValueError):
    """An input file is missing, not a regular file, too large, or not in the format its use expects."""

    def __init__(self, path: object, expected: str, got: object = None) -> None:
        self.path, self.expected, self.got = str(path), expected, got
        msg = f"{path}: expected {expected}"
        if got is not None:
            msg += f", got {got}"
        super().__init__(msg)


class OutputPathError(PrivcamError, ValueError):
    """An output path cannot be written (a folder, under a file, unwritable, the input itself, exists)."""
