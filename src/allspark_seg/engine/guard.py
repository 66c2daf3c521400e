"""The collapse guard: watch a semi-supervised run for collapse and warn, stop it or roll it back.

Three checks (``guard.*``, on by default for the semi-supervised methods, see ``docs/recipes.md``):

- ``miou``: at every validation, the mIoU fell more than ``guard.miou_drop`` points below the best;
- ``classes``: at every logging step, a class whose pseudo-label share had reached ``guard.min_class_share`` x its
  labeled share fell below that bar;
- ``dominant``: at every logging step, one class took more than ``guard.dominant_share`` of the kept pseudo-labels at
  a mean confidence of at least ``guard.dominant_conf``.

A check that fires ``guard.patience`` times in a row acts as ``guard.action`` says: ``warn`` (a WARNING and a
``guard`` record, once per episode, and a ``recovered`` record when the check stops firing), ``stop`` (raise
:class:`TrainingCollapsed`) or ``rollback`` (the loop reloads ``best.pt`` and scales the learning rate; after
``guard.max_rollbacks`` the run stops). :class:`CollapseGuard` is the guard's state, saved in checkpoints;
:class:`CollapseMonitor` runs the checks for the training loop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..config import GuardConfig, RunConfig
from ..data import TrainDataset, load_mask
from ..errors import AllSparkError
from .diagnostics import collapsed_classes, dominant_class, labeled_class_share, miou_drop
from .logger import MetricLogger

__all__ = ["CollapseGuard", "CollapseMonitor", "GuardedRun", "TrainingCollapsed", "watched_labeled_share"]

log = logging.getLogger(__name__)


class TrainingCollapsed(AllSparkError):
    """The collapse guard stopped the run (``guard.action=stop``, or too many rollbacks); ``best.pt`` is kept."""


@dataclass
class CollapseGuard:
    """State of the collapse guard (saved in checkpoints, so a resumed run continues it).

    Attributes:
        lr_scale: Factor applied to the scheduled learning rate (``guard.lr_factor`` per rollback).
        rollbacks: Rollbacks done so far.
        strikes: Consecutive firing checks per kind (``miou``, ``classes``, ``dominant``).
        established: Classes whose pseudo-label share has reached ``guard.min_class_share`` x their labeled share at
            some logging step after the first validation; only these can collapse (a class the teacher has not
            learned yet has not *fallen*).
        warned: Kinds that ``guard.action=warn`` has warned about and that still fire; the warning is logged once
            per episode, and a ``recovered`` record is written when the kind's check stops firing.
        warnings: ``(kind, iteration)`` of every warning given so far, before a resume too (the end-of-run summary).
    """

    lr_scale: float = 1.0
    rollbacks: int = 0
    strikes: dict[str, int] = field(default_factory=dict)
    established: set[int] = field(default_factory=set)
    warned: set[str] = field(default_factory=set)
    warnings: list[tuple[str, int]] = field(default_factory=list)

    def check(self, kind: str, fired: bool, patience: int) -> bool:
        """Count a check of ``kind``; True when it fired ``patience`` times in a row (the counter then resets)."""
        self.strikes[kind] = self.strikes.get(kind, 0) + 1 if fired else 0
        if self.strikes[kind] >= patience:
            self.strikes[kind] = 0
            return True
        return False

    def rolled_back(self, lr_factor: float) -> None:
        """Count a rollback: scale the learning rate by ``lr_factor`` (cumulative) and restart the strike counters."""
        self.rollbacks += 1
        self.lr_scale *= lr_factor
        self.strikes = {}

    def state_dict(self) -> dict[str, Any]:
        """The state as primitives (lists for the sets)."""
        return {
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "strikes": dict(self.strikes),
            "established": sorted(self.established),
            "warned": sorted(self.warned),
            "warnings": [[kind, step] for kind, step in self.warnings],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (checkpoints without ``established``, ``warned`` or ``warnings``
        start empty: no warning counted)."""
        self.lr_scale = float(state["lr_scale"])
        self.rollbacks = int(state["rollbacks"])
        self.strikes = {str(k): int(v) for k, v in state["strikes"].items()}
        self.established = {int(k) for k in state.get("established", [])}
        self.warned = {str(k) for k in state.get("warned", [])}
        self.warnings = [(str(kind), int(step)) for kind, step in state.get("warnings", [])]


class GuardedRun(Protocol):
    """What the guard reads from the training loop and asks of it."""

    step: int
    best_miou: float
    best_step: int
    guard: CollapseGuard

    def rollback(self, path: Path) -> None:
        """Reload ``path`` (``best.pt``) and count the rollback in ``guard``."""


def watched_labeled_share(cfg: RunConfig, labeled: TrainDataset) -> torch.Tensor | None:
    """Class shares of the labeled masks, read once when the guard watches pseudo-label class shares (else None).

    Args:
        cfg: Resolved config.
        labeled: The labeled training set (the masks of its items are read).

    Returns:
        ``(K,)`` shares summing to 1, or None for ``supervised`` or when no class-share check is on.
    """
    g = cfg.guard
    if not (g.enabled and (g.min_class_share > 0 or g.dominant_share > 0) and cfg.method != "supervised"):
        return None
    items = labeled.items
    share = labeled_class_share((load_mask(i.mask, i.mask_encoding) for i in items), cfg.data.num_classes)
    log.info("labeled class shares: %s", " ".join(f"{100 * v:.1f}%" for v in share.tolist()))
    return share


class CollapseMonitor:
    """The guard's checks and actions, called by the training loop at its logging steps and validations."""

    def __init__(
        self,
        settings: GuardConfig,
        class_names: Sequence[str],
        labeled_share: torch.Tensor | None,
        logger: MetricLogger,
        best_path: Path,
    ) -> None:
        """Set up the checks of one run.

        Args:
            settings: ``guard.*``.
            class_names: K class names (for the messages).
            labeled_share: ``(K,)`` labeled class shares from :func:`watched_labeled_share`; None turns the class-share
                checks off.
            logger: Where the ``guard`` records go.
            best_path: The checkpoint a rollback reloads and a stop names (``OUT/best.pt``).
        """
        self.settings = settings
        self.class_names = tuple(class_names)
        self.labeled_share = labeled_share
        self.logger = logger
        self.best_path = best_path

    def on_train_record(self, run: GuardedRun, record: dict[str, Any]) -> None:
        """Class-share checks at a logging step: an established class whose share fell (``classes``) and one class
        that took almost every pseudo-label at a high confidence (``dominant``).

        Skipped while no pixel is kept (nothing to judge) and before a best checkpoint exists: until the first
        validation the teacher is untested (a model from scratch often swings through one-class predictions then) and
        there is nothing to roll back to. Classes are established from then on.

        Raises:
            TrainingCollapsed: A check stopped the run.
        """
        g, labeled = self.settings, self.labeled_share
        if labeled is None or not record.get("kept_fraction") or run.best_step < 0:
            return
        share = torch.tensor([float(v) for v in record["pseudo_share"]])
        conf = torch.tensor([math.nan if v is None else float(v) for v in record["pseudo_conf"]])
        below = set(collapsed_classes(share, labeled, g.min_class_share))
        low = sorted(below & run.guard.established)
        run.guard.established |= set(range(len(share))) - below
        names = self.class_names
        if self._check(run, "classes", bool(low)):
            what = ", ".join(f"'{names[k]}' {100 * share[k]:.2f}% (labeled {100 * labeled[k]:.2f}%)" for k in low)
            self._act(
                run,
                "classes",
                f"pseudo-label class share collapsed at iteration {run.step}: {what} "
                f"< guard.min_class_share={g.min_class_share} x the labeled share",
            )
        top = dominant_class(share, conf, labeled, g.dominant_share, g.dominant_conf)
        if self._check(run, "dominant", top is not None):
            assert top is not None
            self._act(
                run,
                "dominant",
                f"one class took the pseudo-labels at iteration {run.step}: '{names[top]}' {100 * share[top]:.2f}% "
                f"of them (labeled {100 * labeled[top]:.2f}%) at mean confidence {float(conf[top]):.6f}, "
                f"above guard.dominant_share={g.dominant_share} at guard.dominant_conf={g.dominant_conf}",
            )

    def on_validation(self, run: GuardedRun, miou: float) -> bool:
        """mIoU check at a validation (after the best checkpoint was updated).

        Returns:
            True when the guard rolled the model back (the loop then validates the restored model).

        Raises:
            TrainingCollapsed: The check stopped the run.
        """
        g = self.settings
        drop = miou_drop(run.best_miou, miou)
        if not (g.enabled and self._check(run, "miou", drop > g.miou_drop)):
            return False
        return self._act(
            run,
            "miou",
            f"validation mIoU {100 * miou:.2f} at iteration {run.step} is {drop:.2f} points below the best "
            f"{100 * run.best_miou:.2f} (iteration {run.best_step}), more than guard.miou_drop={g.miou_drop}",
        )

    def log_summary(self, guard: CollapseGuard) -> None:
        """Log, at the end of a run, how many warnings the guard gave, before a resume too (none: nothing is logged).

        Args:
            guard: The run's guard state (it counts the warnings, :attr:`CollapseGuard.warnings`).
        """
        if guard.warnings:
            log.warning(
                "collapse guard: %d warning(s) during training (%s; 'guard' records in %s)",
                len(guard.warnings),
                ", ".join(f"{kind} at iteration {step}" for kind, step in guard.warnings),
                self.logger.path,
            )

    def _check(self, run: GuardedRun, kind: str, fired: bool) -> bool:
        """Count a check of ``kind``; True when the guard must act. A warned kind whose check no longer fires gets a
        ``recovered`` record (and may warn again later)."""
        if not fired and kind in run.guard.warned:
            run.guard.warned.discard(kind)
            self.logger.write({"type": "guard", "step": run.step, "kind": kind, "action": "recovered"})
            log.info("collapse guard: %s recovered at iteration %d", kind, run.step)
        return run.guard.check(kind, fired, self.settings.patience)

    def _act(self, run: GuardedRun, kind: str, reason: str) -> bool:
        """Warn, stop (raise :class:`TrainingCollapsed`) or roll back to ``best.pt``, as ``guard.action`` says.

        Returns:
            True when the model was rolled back.
        """
        g, best = self.settings, self.best_path
        if g.action == "warn":
            if kind not in run.guard.warned:  # once per episode: the kind's check has fired since the last warning
                run.guard.warned.add(kind)
                run.guard.warnings.append((kind, run.step))
                self.logger.write({"type": "guard", "step": run.step, "kind": kind, "action": "warn", "reason": reason})
                log.warning("collapse guard: %s; training goes on (guard.action=warn)", reason)
            return False
        stop = g.action == "stop" or run.guard.rollbacks >= g.max_rollbacks
        action = "stop" if stop else "rollback"
        self.logger.write({"type": "guard", "step": run.step, "kind": kind, "action": action, "reason": reason})
        if stop:
            why = "guard.action=stop" if g.action == "stop" else f"guard.max_rollbacks={g.max_rollbacks} reached"
            message = (
                f"Training collapsed: {reason}. Stopped ({why}); the best model (iteration {run.best_step}, mIoU "
                f"{100 * run.best_miou:.2f}) is {best}."
            )
            log.error(message)
            raise TrainingCollapsed(message)
        run.rollback(best)
        log.warning(
            "collapse guard: %s; rolled back to %s (iteration %d) and scaled the learning rate to %.3g x the "
            "schedule (rollback %d of at most %d)",
            reason,
            best,
            run.best_step,
            run.guard.lr_scale,
            run.guard.rollbacks,
            g.max_rollbacks,
        )
        return True
