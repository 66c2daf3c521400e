"""The metric logger: the records of a run, written to ``OUT/metrics.jsonl`` (and TensorBoard when asked).

Every record is a flat JSON object with a ``type`` (``train``, ``eval``, ``guard``) and a ``step``; tensors are turned
into Python numbers with :func:`to_python` (NaN becomes ``null`` in lists). Only the main process writes, but every
process keeps the history, so :class:`~allspark_seg.engine.train.FitResult` is the same everywhere. A resumed run
first drops the records logged after its checkpoint (:func:`drop_records_after`), so no step is logged twice.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import MissingExtraError
from ..utils import upcast
from ..utils.atomic import atomic_write

__all__ = ["METRICS", "MetricLogger", "drop_records_after", "to_python"]

log = logging.getLogger(__name__)

#: The file name of the records in a run folder.
METRICS = "metrics.jsonl"


class MetricLogger:
    """``metrics.jsonl`` (and TensorBoard when installed and asked) on the main process.

    Attributes:
        enabled: Whether this process writes files (the main process).
        path: ``OUT/metrics.jsonl``.
        history: Every record logged so far (on every process).
    """

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool) -> None:
        """Open the logger of the run folder ``out_dir``.

        Args:
            out_dir: The run folder.
            enabled: Write files (True on the main process only).
            tensorboard: Also write TensorBoard scalars to ``out_dir/tb``.

        Raises:
            MissingExtraError: TensorBoard was asked for but is not installed.
        """
        self.enabled = enabled
        self.path = out_dir / METRICS
        self.history: list[dict[str, Any]] = []
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional extra
            except ImportError:
                raise MissingExtraError("tensorboard", "tb", "train.tensorboard") from None
            self.tb = SummaryWriter(str(out_dir / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a line of ``metrics.jsonl``; its numbers as TensorBoard scalars ``TYPE/KEY``)."""
        self.history.append(record)
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and value == value:
                    self.tb.add_scalar(f"{record['type']}/{key}", value, record["step"])

    def close(self) -> None:
        """Flush and close TensorBoard (``metrics.jsonl`` is closed after every record)."""
        if self.tb is not None:
            self.tb.close()


def to_python(value: torch.Tensor) -> float | list[float | None]:
    """A logged tensor as JSON numbers: a 0-d tensor -> float; a vector -> floats rounded to 6 digits, NaN -> None."""
    value = upcast(value.detach()).cpu()
    if value.ndim == 0:
        return float(value)
    return [None if v != v else round(float(v), 6) for v in value.tolist()]


def drop_records_after(path: Path, step: int) -> int:
    """Remove the records of ``path`` (a ``metrics.jsonl``) whose ``step`` is after ``step``, for a resume from it.

    The other lines are kept byte for byte, in order, and so are lines that are not records; a torn last line (no
    newline: the run was killed while writing it) is dropped. The file is rewritten atomically (a temporary file in
    the same folder, flushed to disk and renamed over it), and only when something is dropped.

    Args:
        path: The file; a missing one is left missing.
        step: The iteration resumed from.

    Returns:
        The number of lines dropped.
    """
    if not path.is_file():
        return 0
    lines = path.read_bytes().splitlines(keepends=True)
    kept: list[bytes] = []
    for index, line in enumerate(lines):
        if index == len(lines) - 1 and not line.endswith(b"\n"):
            continue  # torn by a kill mid-write
        try:
            record = json.loads(line)
        except ValueError:
            kept.append(line)
            continue
        later = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step
        if not later:
            kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        atomic_write(path, lambda handle: handle.writelines(kept))
        log.info("%s: dropped %d line(s) logged after iteration %d (logged again on resume)", path, dropped, step)
    return dropped
