"""Checkpoints: plain dicts of tensors and primitives, written atomically, read without unpickling code.

A training checkpoint holds ``model`` (the unwrapped state dict, Semantic Memory buffers included), ``optimizer``,
``step``, ``epoch``, ``best_miou``, ``ema`` (or None), ``scaler`` (or None), ``rng`` (rank 0's torch CPU and CUDA
generator states; training draws do not depend on them, every micro-step reseeds from its iteration and virtual
process, see ``engine.accumulation``), ``world_size`` (the number of processes that wrote it), ``config`` (the
resolved config as a dict), ``history`` and ``version``. Every file is written
to a temporary name in the same folder, flushed to disk and renamed over the target, so a crash during a save
leaves the previous file intact.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["atomic_save", "capture_rng", "find_resume", "load_checkpoint", "restore_rng"]

log = logging.getLogger(__name__)

LAST, BEST = "last.pt", "best.pt"

# What torch.load raises on truncated or foreign files (the legacy unpickler fails in many ways on non-torch bytes).
_UNREADABLE = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    zipfile.BadZipFile,
    ValueError,
    OSError,
    KeyError,
    IndexError,
)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no code is executed).

    Raises:
        CheckpointError: The file is missing, truncated, not a torch file, or holds something other than a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint '{path}' does not exist.")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except _UNREADABLE as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"Checkpoint '{path}' cannot be read safely ({first[:160]}).") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"Checkpoint '{path}' holds a {type(obj).__name__}, not a dict of tensors.")
    return obj


def find_resume(out_dir: str | Path) -> Path | None:
    """The ``last.pt`` checkpoint of a run folder, if any."""
    path = Path(out_dir) / LAST
    return path if path.is_file() else None


def capture_rng() -> dict[str, Any]:
    """States of the torch generators in use (CPU and every CUDA device)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
