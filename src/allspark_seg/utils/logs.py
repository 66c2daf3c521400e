"""Log files of runs: the one record format of ``train.log`` and a block that writes the package's records to one."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["FILE_FORMAT", "file_handler", "run_log"]

#: The record format of every ``train.log``.
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def file_handler(path: str | Path) -> logging.FileHandler:
    """A UTF-8 handler appending to ``path`` (its folder is created) in :data:`FILE_FORMAT`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    return handler


@contextmanager
def run_log(path: str | Path, console_prefix: str | None = None) -> Iterator[None]:
    """Send the package's records to the file ``path`` for the duration of the block.

    Args:
        path: The log file (appended to).
        console_prefix: Also write them to stderr with this text in front of each (trainings that run side by side
            in worker processes tell their lines apart by it); None: the file only.
    """
    logger = logging.getLogger("allspark_seg")
    handlers: list[logging.Handler] = [file_handler(path)]
    if console_prefix is not None:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter(f"%(asctime)s {console_prefix} %(message)s", "%H:%M:%S"))
        handlers.append(console)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
