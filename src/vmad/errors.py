"""Errors that the command line reports as one clear line (no traceback)."""

from __future__ import annotations

from pathlib import Path


class VMADError(Exception):
    """Base class for user-facing errors: the CLI prints ``error: <message>`` and exits with status 2."""


class DataError(VMADError):
    """A dataset file or folder cannot be used. The message names the path and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class ConfigError(VMADError):
    """An invalid configuration key or value."""


class VMADWarning(UserWarning):
    """Something worked but probably not as meant; the CLI prints ``warning: <message>`` on one line."""


class DataWarning(VMADWarning):
    """A dataset was read without error but probably not as meant (e.g. no mask file matched)."""
