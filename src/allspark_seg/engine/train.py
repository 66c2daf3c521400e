"""The training loop: one code path for one process and for ``torchrun`` (DDP).

``fit(cfg, out_dir)`` builds the data, the model and the optimiser, resumes from ``OUT/last.pt`` when present,
trains for ``train.iterations`` (or epochs) with the method's step, logs to ``OUT/metrics.jsonl``, evaluates,
and writes ``last.pt`` (every ``checkpoint_every`` iterations and at the end) and ``best.pt`` (on validation
improvement). Resuming continues exactly: data order and augmentation depend only on (seed, epoch, index, stream),
and every micro-step reseeds the dropout generators from (seed, iteration, virtual process), so nothing per process
needs saving; a checkpoint written with another number of processes, ``train.grad_accum``, batch size, seed or
``semi.*`` setting is refused. What a checkpoint holds, resuming and the iteration plan are :mod:`.state`; the
collapse guard is :mod:`.guard`; ``metrics.jsonl`` is :mod:`.logger`.

``train.grad_accum: G`` makes micro-step ``k`` of process ``r`` play process ``r * G + k`` (see
:mod:`.accumulation`): one device reproduces G processes exactly (up to the order in which float gradients are
summed) except for training-mode BatchNorm and, with ``memory_sync=all_gather``, the memory read by micro-steps
before the last. Every optimiser step checks, once for all its micro-steps and processes, that the loss and the
gradients are finite before the optimiser runs: the one host read of a step (the diagnostics and logged values, means
over the micro-steps, stay on the device until a logging step).

Every logging step writes the losses and the semi-supervised diagnostics of the logging window (pseudo-label class
shares, confidence, kept fraction and accuracy summed over all its micro-steps and processes, the labeled/unlabeled
loss ratio, memory fill and diversity). The collapse guard (``guard.*``, on by default for the semi-supervised
methods) watches the validation mIoU at every evaluation and the pseudo-label class shares at every logging step, and
warns (default), stops the run or rolls it back to ``best.pt`` (see :class:`~.guard.CollapseMonitor` and
``docs/recipes.md``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import RunConfig, dump_config
from ..data import build_run_loader, build_val_loader
from ..data.transforms import ROLE_STREAMS
from ..dist import (
    DistEnv,
    convert_sync_batchnorm,
    cpu_flags,
    gradient_sync,
    init_distributed,
    slow_precision_warning,
)
from ..errors import AllSparkError
from ..losses import build_loss
from ..metrics import SegMetrics
from ..models.factory import build_model_from_config, record_built_model
from ..optim import build_optimizer, param_groups, set_lr
from ..utils import upcast
from ..utils.progress import Progress
from .accumulation import MicroStepMemory, gradients_finite, seed_micro_step
from .adapt import choose_threads, local_processes, usable_cores
from .data import DataBundle, prepare_data, pseudo_label_area_cap
from .diagnostics import loss_ratio, memory_diversity, pseudo_label_counts, stats_from_counts
from .evaluate import evaluate
from .guard import CollapseGuard, CollapseMonitor, TrainingCollapsed, watched_labeled_share
from .inference import load_teacher
from .logger import METRICS, MetricLogger, drop_records_after, to_python
from .recipes import RECIPES, StepContext, StepOutput, ema_update, make_ema
from .state import (
    BEST,
    LAST,
    RESUME_KEYS,
    TrainingPlan,
    _check_resumable,
    atomic_save,
    find_resume,
    load_checkpoint,
    restore_training_state,
    restore_weights,
    training_checkpoint,
    training_plan,
)

__all__ = [
    "RESUME_KEYS",
    "CollapseGuard",
    "FitResult",
    "Trainer",
    "TrainingCollapsed",
    "TrainingDiverged",
    "TrainingPlan",
    "build_model_from_config",
    "fit",
    "record_built_model",
    "training_plan",
]

log = logging.getLogger(__name__)


class TrainingDiverged(AllSparkError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint was kept."""


@dataclass
class FitResult:
    """What a finished run produced.

    Attributes:
        out_dir: The run folder.
        step: Iterations done.
        best_miou: Best validation mIoU (fraction) and the step it was reached at.
        final: Metrics of the last evaluation.
        history: Every record written to ``metrics.jsonl``.
        seconds: Training wall time of this call.
    """

    out_dir: Path
    step: int
    best_miou: float
    best_step: int
    final: SegMetrics | None
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _autocast_factory(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _wrap_ddp(model: nn.Module, env: DistEnv, cfg: RunConfig) -> nn.Module:
    """DistributedDataParallel. Buffers are broadcast from rank 0 only for the official ``rank0`` memory behaviour
    (rank 0's memory and BatchNorm statistics overwrite the others' before the step's first forward, method doc Q9;
    under gradient accumulation :class:`MicroStepMemory` broadcasts the memory itself at the start of the step)."""
    sync_buffers = cfg.model.allspark.memory_sync == "rank0"
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": sync_buffers}
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        find_unused_parameters=cfg.model.allspark.memory_length is not None,  # k_mem/v_mem idle in the warm-up
        **sync,
    )


class Trainer:
    """State and steps of one run (built by :func:`fit`)."""

    def __init__(self, cfg: RunConfig, out_dir: Path, env: DistEnv, resume: str | Path | None) -> None:
        self.env = env
        self.out_dir = out_dir
        if env.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.bundle: DataBundle = prepare_data(cfg, out_dir, rank=env.rank)
        self.cfg = cfg = self.bundle.cfg
        self._set_threads()
        semi = cfg.method != "supervised"
        epoch_set = self.bundle.unlabeled if semi else self.bundle.labeled
        self.plan = training_plan(cfg, len(epoch_set), env.world_size)
        self.model = build_model_from_config(cfg).to(env.device)
        self.cfg = cfg = record_built_model(cfg, self.model)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if env.distributed:
            self.model = convert_sync_batchnorm(self.model, env.device)
        self.ema = make_ema(self.model) if cfg.semi.ema else None
        self.teacher, self.teacher_sha256 = self.ema, None
        if cfg.semi.teacher_checkpoint:  # load_teacher logs the checkpoint, its iteration and its mIoU
            path = cfg.semi.teacher_checkpoint
            teacher, self.teacher_sha256 = load_teacher(path, self.bundle.class_names, env.device)
            self.teacher = teacher.to(memory_format=torch.channels_last) if cfg.train.channels_last else teacher
        groups = param_groups(self.model, cfg.train.lr, cfg.train.lr_multi)
        t = cfg.train
        self.optimizer = build_optimizer(t.optimizer, groups, t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=t.precision == "fp16")
        slow = slow_precision_warning(t.precision, env.device, cpu_flags())
        if slow and env.is_main:
            log.warning(slow)
        self.step, self.best_miou, self.best_step = 0, -1.0, -1
        self.guard = CollapseGuard()
        self._resume(resume)
        net: nn.Module = self.model
        if env.distributed:
            net = _wrap_ddp(self.model, env, cfg)
        if t.compile:
            net = torch.compile(net)
        self.net = net
        criterion = build_loss(t.loss, thresh=t.ohem_thresh, min_kept=t.ohem_min_kept)
        area_cap = pseudo_label_area_cap(cfg, self.bundle.labeled)
        self.ctx = StepContext(
            cfg=cfg,
            net=net,
            teacher=self.teacher,
            criterion_l=criterion,
            device=env.device,
            autocast=_autocast_factory(t.precision, env.device),
            channels_last=t.channels_last,
            area_cap=None if area_cap is None else area_cap.to(env.device),
        )
        self.recipe = RECIPES[cfg.method]
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        block = self.model.allspark
        memory = block.memory if block is not None else None
        self.micro_memory = MicroStepMemory(memory, cfg.model.allspark.memory_sync, t.grad_accum)
        self.metric_logger = MetricLogger(out_dir, env.is_main, tensorboard=t.tensorboard)
        self.pseudo_counts: dict[str, torch.Tensor] = {}
        self.last_metrics: SegMetrics | None = None
        labeled_share = watched_labeled_share(cfg, self.bundle.labeled)
        self.monitor = CollapseMonitor(
            cfg.guard, self.bundle.class_names, labeled_share, self.metric_logger, out_dir / BEST
        )

    # -- checkpoints (see .state) ---------------------------------------------------------------------------------
    def _resume(self, resume: str | Path | None) -> None:
        path = Path(resume) if resume else find_resume(self.out_dir)
        if path is None:
            return
        saved = load_checkpoint(path)  # on the CPU: load_state_dict copies onto the run's device
        _check_resumable(saved, self.cfg, path, self.env.world_size, self.teacher_sha256, self.bundle.class_names)
        self.step, self.best_miou, self.best_step = restore_training_state(
            saved, model=self.model, optimizer=self.optimizer, ema=self.ema, scaler=self.scaler, guard=self.guard
        )
        if self.env.is_main:  # the records logged after the checkpoint are logged again
            drop_records_after(self.out_dir / METRICS, self.step)
        log.info("resumed from %s at iteration %d", path, self.step)

    def state(self) -> dict[str, Any]:
        """The checkpoint dict (tensors and primitives only, see :func:`~.state.training_checkpoint`)."""
        return training_checkpoint(
            model=self.model,
            optimizer=self.optimizer,
            ema=self.ema,
            scaler=self.scaler,
            guard=self.guard,
            cfg=self.cfg,
            plan=self.plan,
            step=self.step,
            best_miou=self.best_miou,
            best_step=self.best_step,
            world_size=self.env.world_size,
            class_names=self.bundle.class_names,
            palette=self.bundle.palette,
            teacher_sha256=self.teacher_sha256,
            miou=None if self.last_metrics is None else self.last_metrics.miou,
        )

    def save(self, name: str) -> None:
        """Write the checkpoint ``OUT/name`` atomically (on the main process)."""
        if self.env.is_main:
            atomic_save(self.state(), self.out_dir / name)

    # -- data -----------------------------------------------------------------------------------------------------
    def _uses_unlabeled(self) -> bool:
        return self.bundle.unlabeled is not None and self.cfg.method != "supervised"

    def _run_iterators(self) -> tuple[Any, Any]:
        """Iterators over the batches of iterations ``self.step .. plan.total - 1``: one loader per stream for the
        rest of the run, so its workers start once and prefetch across epochs; the batches are those of
        :func:`~allspark_seg.data.build_train_loader`'s per-epoch loaders, epoch after epoch (see
        :func:`~allspark_seg.data.build_run_loader`)."""
        t = self.cfg.train

        def run_iter(dataset: Any, batch_size: int, stream: int) -> Any:
            loader = build_run_loader(
                dataset,
                batch_size,
                seed=t.seed,
                start=self.step,
                stop=self.plan.total,
                steps=self.plan.steps_per_epoch,
                rank=self.env.rank,
                world_size=self.env.world_size,
                grad_accum=t.grad_accum,
                stream=stream,
                num_workers=self.cfg.data.num_workers,
                pin_memory=self.env.device.type == "cuda",
            )
            return iter(loader)

        it_l = run_iter(self.bundle.labeled, t.batch_size, ROLE_STREAMS["labeled"])
        it_u = None
        if self._uses_unlabeled():
            it_u = run_iter(self.bundle.unlabeled, t.unlabeled_batch_size, ROLE_STREAMS["unlabeled"])
        return it_l, it_u

    def _set_threads(self) -> None:
        """Set PyTorch's intra-op threads to the cores left after the loader workers (once, logged; see
        :func:`~.adapt.choose_threads`): the main process's OpenMP threads must not contend with the workers."""
        loaders = 2 if self._uses_unlabeled() else 1
        current = torch.get_num_threads()
        threads, why = choose_threads(
            current, usable_cores(), loaders, self.cfg.data.num_workers, local_processes(), os.environ
        )
        if threads != current:
            torch.set_num_threads(threads)
        if self.env.is_main:
            log.info("torch threads: %d (%s)", threads, why)

    # -- one optimiser step ---------------------------------------------------------------------------------------
    def train_step(self, it_l: Any, it_u: Any) -> StepOutput:
        """One optimiser step over ``train.grad_accum`` micro-steps (micro-step ``k`` plays process ``k``, see
        :mod:`.accumulation`).

        Returns:
            ``loss`` and ``logs``: means over the micro-steps (detached); ``pseudo``, ``confidence`` and ``target_u``
            of the last micro-step.

        Raises:
            TrainingDiverged: A micro-step's loss, or a gradient, is non-finite; raised before the optimiser step (the
                one host read of the step, see :meth:`_require_finite`).
        """
        cfg, t = self.cfg, self.cfg.train
        set_lr(self.optimizer, self.step, self.plan.total, t.lr * self.guard.lr_scale, t.poly_power)
        self.optimizer.zero_grad(set_to_none=True)
        use_memory = self.step >= self.plan.warmup
        self.ctx.step = self.step
        out: StepOutput | None = None
        loss_sum: torch.Tensor | None = None
        log_sums: dict[str, torch.Tensor] = {}
        for k in range(t.grad_accum):
            batch_l = next(it_l)
            batch_u = next(it_u) if it_u is not None else None
            seed_micro_step(t.seed, self.step, self.env.rank * t.grad_accum + k)
            self.micro_memory.begin(k)
            with gradient_sync(self.net, sync=k == t.grad_accum - 1):
                out = self.recipe(self.ctx, batch_l, batch_u, use_memory=use_memory)
                self.scaler.scale(out.loss / t.grad_accum).backward()
            loss = upcast(out.loss.detach())
            loss_sum = loss if loss_sum is None else loss_sum + loss
            for key, value in out.logs.items():
                log_sums[key] = upcast(value) if key not in log_sums else log_sums[key] + upcast(value)
            self._count_pseudo(out)
        self.micro_memory.end()
        assert out is not None and loss_sum is not None
        logs = {key: value / t.grad_accum for key, value in log_sums.items()}
        self._require_finite(loss_sum, logs)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            ema_update(self.ema, self.model, cfg.semi.ema_decay, self.step, cfg.semi.ema_buffers)
        self.step += 1
        return StepOutput(loss_sum / t.grad_accum, logs, out.pseudo, out.confidence, out.target_u)

    def _require_finite(self, loss_sum: torch.Tensor, logs: dict[str, torch.Tensor]) -> None:
        """Stop before the optimiser step when a micro-step's loss (on any process) or a gradient is non-finite.

        The one host read of a training step (plus, under ``torchrun``, one 1-element all-reduce so that every process
        stops together): it waits for the step's backward passes, so nothing non-finite reaches the optimiser, the
        weights or a checkpoint. Under fp16 the gradient scaler handles overflowing gradients (it skips the step and
        lowers the scale), so only the loss is checked.
        """
        bad = ~torch.isfinite(loss_sum)
        if not self.scaler.is_enabled():
            bad = bad | ~gradients_finite(self.trainable)
        flag = bad.to(torch.int32)
        if self.env.distributed:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not bool(flag):
            return
        if not bool(torch.isfinite(loss_sum)):
            what = "The loss became non-finite"
        elif bool(bad):
            what = "A gradient became non-finite"
        else:
            what = "The loss or a gradient became non-finite on another process"
        where = self.out_dir / LAST
        kept = f"the last good checkpoint {where} is kept" if where.exists() else "no checkpoint was written"
        shown = {**logs, "loss": loss_sum / self.cfg.train.grad_accum}  # the loss back-propagated
        values = ", ".join(f"{k}={float(v):.4g}" for k, v in shown.items())
        raise TrainingDiverged(
            f"{what} in iteration {self.step + 1} ({values}: means over its micro-steps on process {self.env.rank}); "
            f"training stopped before its optimiser step and {kept}. Lower train.lr, or use train.precision=fp32."
        )

    def _count_pseudo(self, out: StepOutput) -> None:
        """Add a micro-step's pseudo-label counts to the logging window's (on the device, no synchronisation)."""
        if out.pseudo is None or out.confidence is None:
            return
        counts = pseudo_label_counts(out.pseudo, out.confidence, self.cfg.data.num_classes, out.target_u)
        for key, value in counts.items():
            self.pseudo_counts[key] = self.pseudo_counts[key] + value if key in self.pseudo_counts else value

    # -- logging --------------------------------------------------------------------------------------------------
    def log_record(self, sums: dict[str, torch.Tensor], count: int, out: StepOutput, seconds: float) -> dict:
        """The ``metrics.jsonl`` record of a logging window (losses averaged over its steps and the processes;
        pseudo-label statistics over all its micro-steps and processes); resets the window's pseudo-label counts."""
        record: dict[str, Any] = {"type": "train", "step": self.step, "epoch": self.step / self.plan.steps_per_epoch}
        if self.env.distributed:  # losses averaged over processes: the loss of the global batch
            keys = sorted(sums)
            stacked = torch.stack([sums[k] for k in keys])
            torch.distributed.all_reduce(stacked)
            sums = dict(zip(keys, stacked / self.env.world_size, strict=True))
        record.update({k: to_python(v / count) for k, v in sums.items()})
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        record["sec_per_iter"] = seconds / count
        if self.pseudo_counts:
            counts = self.pseudo_counts
            if self.env.distributed:
                keys = sorted(counts)
                flat = torch.cat([counts[k].reshape(-1) for k in keys])
                torch.distributed.all_reduce(flat)
                sizes = [counts[k].numel() for k in keys]
                counts = {k: v.view_as(counts[k]) for k, v in zip(keys, flat.split(sizes), strict=True)}
            stats = stats_from_counts(counts)
            record.update({k: to_python(v) for k, v in stats.items()})
            self.pseudo_counts = {}
        if "loss_u" in sums:
            record["loss_ratio"] = to_python(loss_ratio(sums["loss_x"], sums["loss_u"]))
        block = self.model.allspark
        if block is not None and block.memory is not None:
            record["memory_fill"] = to_python(block.memory.fill())
            record["memory_diversity"] = to_python(memory_diversity(block.memory))
            record["memory_read"] = self.step > self.plan.warmup
        return record

    def validate(self) -> SegMetrics:
        """Evaluate the (unwrapped) model in fp32 on this process's validation shard, reduced across processes.

        fp32 whatever ``train.precision`` is, so ``allspark-seg eval`` on a checkpoint gives the logged number.
        """
        ev = self.cfg.eval
        loader = build_val_loader(self.bundle.val, rank=self.env.rank, world_size=self.env.world_size)
        result = evaluate(
            self.model,
            loader,
            self.cfg.data.num_classes,
            mode=ev.mode,
            window=tuple(ev.window),
            stride=tuple(ev.stride),
            flip=ev.flip,
            scales=tuple(ev.scales),
            shift_edges=ev.shift_edges,
            device=self.env.device,
        )
        return result.metrics

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self) -> FitResult:
        cfg, plan, env = self.cfg, self.plan, self.env
        if env.is_main:
            dump_config(cfg, self.out_dir / "config.yaml")
        log.info(
            "%s: %d iterations (%d per epoch), memory read from iteration %d, %s on %s x%d",
            cfg.method,
            plan.total,
            plan.steps_per_epoch,
            plan.warmup,
            cfg.train.precision,
            env.device,
            env.world_size,
        )
        start_time = time.perf_counter()
        progress = Progress(plan.total, self.step, logger=log, enabled=env.is_main)
        final: SegMetrics | None = None
        try:
            final = self._loop(progress)
        except TrainingCollapsed as error:
            progress.close()
            self.metric_logger.close()
            if env.is_main and self.last_metrics is not None:
                results = self._results(self.last_metrics) | {"stopped": str(error)}
                (self.out_dir / "results.json").write_text(json.dumps(results, indent=2))
            raise
        progress.close()
        if final is None:  # resumed after the end: evaluate what is there
            final = self.validate()
        self.metric_logger.close()
        if env.is_main:
            self.monitor.log_summary(self.guard)
            log.info("final evaluation (iteration %d):\n%s", self.step, final.table(list(self.bundle.class_names)))
            (self.out_dir / "results.json").write_text(json.dumps(self._results(final), indent=2))
        return FitResult(
            self.out_dir,
            self.step,
            self.best_miou,
            self.best_step,
            final,
            self.metric_logger.history,
            time.perf_counter() - start_time,
        )

    def _loop(self, progress: Progress) -> SegMetrics | None:
        """Train to the end; returns the metrics of the last evaluation (None when nothing was left to train)."""
        cfg, plan = self.cfg, self.plan
        sums: dict[str, torch.Tensor] = {}
        count, window_start = 0, time.perf_counter()
        final: SegMetrics | None = None
        it_l = it_u = None
        while self.step < plan.total:
            if it_l is None:  # one loader per stream for the whole run (its workers start once)
                it_l, it_u = self._run_iterators()
            out = self.train_step(it_l, it_u)
            for key, value in out.logs.items():
                sums[key] = sums.get(key, 0) + upcast(value)
            count += 1
            last = self.step == plan.total
            if self.step % cfg.train.log_every == 0 or last:
                record = self.log_record(sums, count, out, time.perf_counter() - window_start)
                self.metric_logger.write(record)
                stats = " ".join(f"{k} {record[k]:.4f}" for k in ("loss", "loss_x", "loss_u") if k in record)
                progress.update(self.step, stats, log_line=True)
                sums, count, window_start = {}, 0, time.perf_counter()
                self.monitor.on_train_record(self, record)
            else:
                progress.update(self.step)
            if self.step % plan.eval_every == 0 or last:
                final = self._evaluate_and_select()
            if self.step % cfg.train.checkpoint_every == 0 or last:
                self.save(LAST)
        return final

    def _results(self, metrics: SegMetrics) -> dict[str, Any]:
        return {
            "method": self.cfg.method,
            "step": self.step,
            "best_miou": self.best_miou,
            "best_step": self.best_step,
            "final": metrics.to_dict(list(self.bundle.class_names)),
        }

    # -- rollback (asked by the collapse guard) -------------------------------------------------------------------
    def rollback(self, path: Path) -> None:
        """Reload weights, Semantic Memory, EMA teacher and optimiser state from ``path``; keep the iteration, the
        data position, the random streams and the poly schedule; multiply the learning rate by ``guard.lr_factor``.

        The window's pseudo-label counts and the guard's strike counters restart; ``last.pt`` is rewritten at once
        so that a resumed run continues after the rollback.
        """
        if self.env.distributed:
            torch.distributed.barrier()  # best.pt is written by rank 0
        saved = load_checkpoint(path)  # on the CPU: load_state_dict copies onto the run's device
        restore_weights(saved, model=self.model, optimizer=self.optimizer, ema=self.ema)
        self.guard.rolled_back(self.cfg.guard.lr_factor)
        self.pseudo_counts = {}
        self.save(LAST)

    def _evaluate_and_select(self) -> SegMetrics:
        metrics = self.last_metrics = self.validate()
        record: dict[str, Any] = {"type": "eval", "step": self.step, "miou": metrics.miou}
        record.update({"miou_official": metrics.miou_official, "pixel_acc": metrics.pixel_acc})
        record["iou"] = [None if v != v else v for v in metrics.iou]
        improved = metrics.miou > self.best_miou
        if improved:
            self.best_miou, self.best_step = metrics.miou, self.step
            self.save(BEST)
        record["best_miou"] = self.best_miou
        self.metric_logger.write(record)
        log.info(
            "eval @%d: mIoU %.2f (best %.2f @%d)",
            self.step,
            100 * metrics.miou,
            100 * self.best_miou,
            self.best_step,
        )
        if self.cfg.guard.enabled and self.monitor.on_validation(self, metrics.miou):
            metrics = self.last_metrics = self.validate()  # the restored model's: final metrics match the weights
            self.metric_logger.write({"type": "eval", "step": self.step, "miou": metrics.miou, "rollback": True})
        return metrics


def fit(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: str | Path | None = None,
    env: DistEnv | None = None,
) -> FitResult:
    """Train a model as ``cfg`` describes, writing everything into ``out_dir``.

    Running it again with the same ``out_dir`` resumes from ``out_dir/last.pt``; ``resume`` picks another
    checkpoint. Under ``torchrun`` every process calls it; only rank 0 writes.

    Raises:
        AllSparkError: Bad config, data or checkpoint; :class:`TrainingDiverged` on a non-finite loss.
    """
    env = env or init_distributed(cfg.train.device)
    threads = torch.get_num_threads()  # training picks its own (Trainer._set_threads); the caller's come back after
    try:
        return Trainer(cfg, Path(out_dir), env, resume).run()
    finally:
        torch.set_num_threads(threads)
