"""Errors raised for bad user input.

Every error a user can cause (a wrong path, a bad config value, a corrupt image, a checkpoint of another model)
is raised as an :class:`AllSparkError` subclass whose message is one clear sentence naming the file or option and
what is wrong. The command line prints that sentence and exits non-zero; tracebacks are reserved for bugs.
"""

from __future__ import annotations

__all__ = ["AllSparkError", "CheckpointError", "ConfigError", "DataError", "MissingExtraError"]


class AllSparkError(Exception):
    """Base class of the errors caused by user input; the message is meant for people."""


class ConfigError(AllSparkError, ValueError):
    """A config file, a ``--set`` override or a keyword argument is invalid."""


class DataError(AllSparkError, ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


class CheckpointError(AllSparkError, ValueError):
    """A checkpoint or weight file cannot be read or does not match the model."""


class MissingExtraError(AllSparkError, ImportError):
    """An optional dependency (an ``allspark-seg[extra]``) is needed but not installed."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the '{package}' package: install it with pip install 'allspark-seg[{extra}]'."
        )
        self.package = package
        self.extra = extra
