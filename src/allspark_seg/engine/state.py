"""The training state: what a run saves, how it is written and read back, and what it may resume from.

A training checkpoint (:func:`training_checkpoint`) is a plain dict of tensors and primitives: ``model`` (the
unwrapped state dict, Semantic Memory buffers included), ``optimizer``, ``ema`` (or None), ``scaler`` (or None),
``teacher_sha256`` (the file of ``semi.teacher_checkpoint``, or None), ``rng`` (rank 0's torch CPU and CUDA
generator states; training draws do not depend on them, every micro-step reseeds from its iteration and virtual
process, see ``engine.accumulation``), ``world_size`` (the number of processes that wrote it), ``step``, ``total``
(the run's iterations: a run finished when its ``last.pt`` has ``step == total``), ``epoch``, ``best_miou``,
``best_step``, ``miou`` (the latest validation's), ``guard`` (the collapse guard's state), ``config`` (the resolved
config as a dict), ``class_names``, ``palette`` and ``version``.

Every file is written to a temporary name in the same folder, flushed to disk and renamed over the target
(:func:`atomic_save`), so a crash during a save leaves the previous file intact; reading never unpickles code
(:func:`load_checkpoint`). A run resumes from ``OUT/last.pt`` (:func:`find_resume`) only when it can continue exactly
(:func:`_check_resumable`), and the collapse guard rolls back to ``OUT/best.pt`` (:func:`restore_weights`).
:func:`training_plan` derives the iteration counts every resumed run must agree on.
"""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..config import RunConfig, SemiConfig
from ..config.resolve import _fill_semi
from ..data import steps_per_epoch
from ..errors import CheckpointError
from ..methods import get_method
from ..utils import to_pair
from ..utils.atomic import atomic_write
from .guard import CollapseGuard

__all__ = [
    "BEST",
    "LAST",
    "RESUME_KEYS",
    "TrainingPlan",
    "atomic_save",
    "capture_rng",
    "find_resume",
    "load_checkpoint",
    "restore_rng",
    "restore_training_state",
    "restore_weights",
    "training_checkpoint",
    "training_plan",
]

#: File names of the checkpoints in a run folder: the latest state and the best validation mIoU.
LAST, BEST = "last.pt", "best.pt"

#: Settings a run cannot change and continue exactly: the data layout of every step and the recipe's behaviour.
RESUME_KEYS: tuple[str, ...] = ("train.seed", "train.grad_accum", "train.batch_size", "train.unlabeled_batch_size")

#: Settings that decide the training samples (besides the class names); ``data.root`` only outside the synthetic
#: format, whose samples the generator's settings decide wherever it writes them.
_DATA_KEYS: tuple[str, ...] = (
    "data.format",
    "data.root",
    "data.labeled_split",
    "data.unlabeled_split",
    "data.crop_size",
    "data.pipeline",
    *(f"data.synthetic.{k}" for k in ("kind", "num_labeled", "num_unlabeled", "image_size", "seed")),
)
_PATH_KEYS = ("data.root", "data.labeled_split", "data.unlabeled_split")
_MISSING = object()

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


# ------------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class TrainingPlan:
    """Iteration counts derived from the config and the dataset sizes."""

    steps_per_epoch: int
    total: int
    warmup: int
    eval_every: int


def training_plan(cfg: RunConfig, num_samples: int, world_size: int) -> TrainingPlan:
    """Steps per epoch, total iterations, memory warm-up and evaluation cadence.

    Args:
        cfg: Resolved config.
        num_samples: Length of the epoch-defining set (unlabeled, or labeled for ``supervised``).
        world_size: Processes.
    """
    t = cfg.train
    per_step = t.unlabeled_batch_size if cfg.method != "supervised" else t.batch_size
    spe = steps_per_epoch(num_samples, per_step, world_size * t.grad_accum)
    total = t.iterations if t.iterations is not None else max(1, math.ceil(t.epochs * spe))
    s = cfg.semi
    if s.warmup_iterations is not None:
        warmup = s.warmup_iterations
    elif s.warmup_epochs is not None:
        warmup = math.ceil(s.warmup_epochs * spe)
    else:
        warmup = math.ceil(total / 16)
    if t.eval_every == "epoch":
        eval_every = spe
    elif t.eval_every is not None:
        eval_every = t.eval_every
    else:
        eval_every = max(spe, math.ceil(total / 10))  # once per epoch, at most 10 per run
        if total // eval_every < 5:  # epochs longer than a fifth of the run (a large unlabeled folder): 10 per run
            eval_every = math.ceil(total / 10)
    return TrainingPlan(spe, total, warmup, eval_every)


# ------------------------------------------------------------------------------------------------------- files


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


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


# ----------------------------------------------------------------------------------------------- random states


def capture_rng() -> dict[str, Any]:
    """States of the torch generators in use (CPU and every CUDA device)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _cpu_rng_state(state: torch.Tensor) -> torch.Tensor:
    """A saved generator state as the CPU ByteTensor the generators take, from whatever device it was loaded onto.

    Raises:
        CheckpointError: The state has no values (it was loaded onto the ``meta`` device).
    """
    if state.is_meta:
        raise CheckpointError(
            "The checkpoint's random state has no values (it was loaded with map_location='meta'): load the "
            "checkpoint on the CPU to resume from it."
        )
    return state.detach().to(device="cpu", dtype=torch.uint8)


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured; the states may have been loaded onto any device with values.

    CUDA states are restored for the devices this machine has (at most as many as were saved).

    Raises:
        CheckpointError: A state has no values (loaded onto the ``meta`` device).
    """
    torch.set_rng_state(_cpu_rng_state(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [_cpu_rng_state(s) for s in state["cuda"]]
        for index, saved in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(saved, index)


# -------------------------------------------------------------------------------------------- save and restore


def training_checkpoint(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: nn.Module | None,
    scaler: torch.amp.GradScaler,
    guard: CollapseGuard,
    cfg: RunConfig,
    plan: TrainingPlan,
    step: int,
    best_miou: float,
    best_step: int,
    world_size: int,
    class_names: Sequence[str],
    palette: np.ndarray,
    teacher_sha256: str | None = None,
    miou: float | None = None,
) -> dict[str, Any]:
    """The checkpoint dict of a run (tensors and primitives only; the layout is in the module docstring).

    Args:
        model: The unwrapped model (not DDP, not compiled).
        optimizer: Its optimiser.
        ema: The EMA teacher, or None.
        scaler: The gradient scaler (saved only when enabled, i.e. under fp16).
        guard: The collapse guard's state.
        cfg: The resolved config of the run.
        plan: The run's iteration counts (for the epoch).
        step: Iterations done.
        best_miou: Best validation mIoU so far (-1 before the first validation).
        best_step: Its iteration (-1 before the first validation).
        world_size: Processes of the run.
        class_names: K class names.
        palette: ``(K, 3)`` uint8 colours.
        teacher_sha256: The sha256 of the frozen teacher's file (``semi.teacher_checkpoint``), or None.
        miou: The mIoU of the latest validation (at ``step`` for ``best.pt`` and a finished run's ``last.pt``), or
            None before the first.
    """
    return {
        "version": __version__,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "ema": None if ema is None else ema.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "teacher_sha256": teacher_sha256,
        "rng": capture_rng(),
        "world_size": world_size,
        "step": step,
        "total": plan.total,
        "epoch": step // plan.steps_per_epoch,
        "best_miou": best_miou,
        "best_step": best_step,
        "miou": miou,
        "guard": guard.state_dict(),
        "config": cfg.to_dict(),
        "class_names": list(class_names),
        "palette": torch.as_tensor(palette),
    }


def restore_training_state(
    saved: dict[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: nn.Module | None,
    scaler: torch.amp.GradScaler,
    guard: CollapseGuard,
) -> tuple[int, float, int]:
    """Load a checkpoint checked by :func:`_check_resumable` into the run's objects, in place.

    A checkpoint without a teacher starts the EMA teacher from its weights. The random states are restored too,
    although training draws do not depend on them (every micro-step reseeds, see ``engine.accumulation``).

    Returns:
        ``(step, best_miou, best_step)`` of the checkpoint.
    """
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if ema is not None:
        ema.load_state_dict(saved["ema"] if saved.get("ema") is not None else saved["model"])
    if saved.get("scaler") is not None:
        scaler.load_state_dict(saved["scaler"])
    restore_rng(saved["rng"])
    if saved.get("guard") is not None:
        guard.load_state_dict(saved["guard"])
    return int(saved["step"]), float(saved["best_miou"]), int(saved["best_step"])


def restore_weights(
    saved: dict[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None
) -> None:
    """Load the weights (Semantic Memory included), the optimiser state and the EMA teacher of a checkpoint, in place,
    for a rollback: the iteration, the data position, the random states and the schedule stay the run's."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if ema is not None and saved.get("ema") is not None:
        ema.load_state_dict(saved["ema"])


def _get(config: dict[str, Any], key: str) -> Any:
    """The value of a dotted ``key`` in a nested config dict, or ``_MISSING``."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _defaults_then(old: dict[str, Any], method: str) -> dict[str, Any]:
    """The values a stored config had for the keys it lacks (written before they existed): the schema's defaults,
    and for the null ``semi.*`` keys and ``data.pipeline`` the method's, as resolving filled them."""
    defaults = RunConfig().to_dict()
    names = {f.name for f in fields(SemiConfig)}
    known = {k: v for k, v in (old.get("semi") or {}).items() if k in names}
    defaults["semi"] = asdict(_fill_semi(SemiConfig(**known), get_method(method)))
    defaults["data"]["pipeline"] = get_method(method).pipeline
    return defaults


def _same(key: str, before: Any, after: Any) -> bool:
    """Whether two values of ``key`` give the same run (a crop as an int or a square pair, one folder's spellings)."""
    if before == after:
        return True
    sizes = (int, list)
    if key == "data.crop_size" and isinstance(before, sizes) and isinstance(after, sizes):
        return to_pair(before) == to_pair(after)
    if key in _PATH_KEYS and isinstance(before, str) and isinstance(after, str) and before and after:
        return Path(before).expanduser().resolve() == Path(after).expanduser().resolve()
    return False


def _check_resumable(
    saved: dict[str, Any],
    cfg: RunConfig,
    path: Path,
    world_size: int,
    teacher_sha256: str | None = None,
    class_names: Sequence[str] | None = None,
) -> None:
    """Refuse a checkpoint that this run cannot continue exactly, in one sentence naming the difference.

    Refused: another ``method`` or ``model`` section, class count, number of processes, ``train.seed``,
    ``train.grad_accum``, batch sizes (so another global batch), any ``semi.*`` value, a frozen teacher file
    (``semi.teacher_checkpoint``) whose contents changed (``teacher_sha256``: this run's), and other training samples:
    another data format, ``data.root`` (outside the synthetic format), split file, crop, augmentation pipeline,
    synthetic dataset or class names (``class_names``: this run's). A key that a checkpoint's config lacks (written
    before the key existed) counts as its default then. Checkpoints written before the number of processes was
    recorded are not compared on it.
    """
    old = saved.get("config")
    if not isinstance(old, dict):
        raise CheckpointError(f"Checkpoint '{path}' has no run config: it was not written by allspark-seg train.")
    new = cfg.to_dict()
    fix = "resume with the same setting or use another --out folder"
    for section in ("method", "model"):
        if old.get(section) != new.get(section):
            raise CheckpointError(
                f"Checkpoint '{path}' was written with a different '{section}' config; use another --out folder "
                "or the same config to resume."
            )
    if old["data"].get("num_classes") != new["data"]["num_classes"]:
        raise CheckpointError(
            f"Checkpoint '{path}' has {old['data'].get('num_classes')} classes but the data has "
            f"{new['data']['num_classes']}."
        )
    saved_world = saved.get("world_size")
    if saved_world is not None and int(saved_world) != world_size:
        how = "without torchrun" if int(saved_world) == 1 else f"with torchrun --nproc_per_node={int(saved_world)}"
        raise CheckpointError(
            f"Checkpoint '{path}' was written by {int(saved_world)} process{'es' if int(saved_world) > 1 else ''} "
            f"but this run has {world_size}: resume {how} or use another --out folder."
        )
    defaults = _defaults_then(old, cfg.method)
    semi_keys = sorted(set(old.get("semi", {})) | set(new.get("semi", {})))
    synthetic = new["data"]["format"] == "synthetic"
    data_keys = tuple(k for k in _DATA_KEYS if not (synthetic and k == "data.root"))
    for key in (*RESUME_KEYS, *(f"semi.{k}" for k in semi_keys), *data_keys):
        before, after = _get(old, key), _get(new, key)
        before = _get(defaults, key) if before is _MISSING else before
        before, after = (None if v is _MISSING else v for v in (before, after))
        if not _same(key, before, after):
            why = "the resumed run would see other samples; " if key.startswith("data.") else ""
            raise CheckpointError(
                f"Checkpoint '{path}' was written with {key}={json.dumps(before)} but this run has "
                f"{key}={json.dumps(after)}: {why}{fix}."
            )
    saved_names = saved.get("class_names")
    if class_names is not None and saved_names is not None and list(saved_names) != list(class_names):
        raise CheckpointError(
            f"Checkpoint '{path}' was trained on the classes {list(saved_names)} but the data has "
            f"{list(class_names)}: the resumed run would learn other classes; resume with the same data or use "
            "another --out folder."
        )
    if saved.get("teacher_sha256") != teacher_sha256:
        raise CheckpointError(
            f"Checkpoint '{path}' was trained with another semi.teacher_checkpoint file than "
            f"'{cfg.semi.teacher_checkpoint}' holds now: restore that file or use another --out folder."
        )
