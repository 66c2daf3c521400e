"""The measurements behind ``bench/run.py``. Each function runs in its own fresh process (started by ``run.py``), so
the peak resident memory it reports belongs to that one configuration.

Both sides of every comparison are built from the same seed with the same weights: the allspark-seg model first,
then the baseline from it. The baseline is the official code itself when a checkout is given (``official``: its
folder; :func:`official.official_twin`), else the restatement ``tests/official_reference.py``
(:func:`literal.literal_twin`), which the report uses only where it isolates one design choice. Our training
iteration is the engine's ``allspark`` recipe (:func:`allspark_seg.engine.recipes.self_training_step`); the
baseline's is one iteration of ``train_allspark.py``. Both use faithful options (batch-coupled teacher,
randn-initialised memory, logit grouping), read the memory, and run with dropout and drop-path on, as in training.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from literal import R, literal_optimizer, literal_train_step, literal_twin
from official import official_memory_class, official_twin
from torch import nn
from torch.utils import flop_counter

from allspark_seg import build_model
from allspark_seg.config import load_config
from allspark_seg.engine.recipes import StepContext, self_training_step
from allspark_seg.interop import FAITHFUL_OPTIONS, load_official_checkpoint, official_key, to_official_state_dict
from allspark_seg.losses import build_loss
from allspark_seg.models import AllSparkSegmentor, SemanticMemory, channel_grouping
from allspark_seg.optim import build_optimizer, param_groups

__all__ = [
    "components",
    "equivalence",
    "flops_at",
    "inference",
    "matmul_peak",
    "memory_update",
    "device_train",
    "train_memory",
    "train_pair",
    "train_time",
]

HEAD_DIM = 768  # AllSpark's SegFormer head width
LR, LR_MULTI = 1e-3, 10.0


# -- process and timing helpers ---------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (``ru_maxrss``, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Current resident set size from ``/proc/self/statm``, in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def synchronize(device: str | torch.device) -> None:
    """Wait for the queued kernels of ``device`` (CUDA); nothing to wait for on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def summary(times: list[float]) -> dict[str, Any]:
    return {"times": times, "median": statistics.median(times), "min": min(times), "max": max(times)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` (``b`` is the reference), in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _extra_flop_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas ``FlopCounterMode`` lacks on CPU: in-place ``addmm_`` and the CPU flash attention."""
    aten = torch.ops.aten

    def addmm_(self_shape: Any, a_shape: Any, b_shape: Any, *args: Any, **kwargs: Any) -> int:
        return flop_counter.addmm_flop(self_shape, a_shape, b_shape)

    def sdpa_cpu(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
        return flop_counter.sdpa_flop_count(q, k, v)

    def sdpa_cpu_backward(grad_out: Any, q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, q, k, v)

    return {
        aten.addmm_: addmm_,
        aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_cpu_backward,
    }


def count_flops(fn: Callable[[], Any]) -> int:
    """Matrix-multiply and convolution FLOPs (2 per multiply-add) of one call of ``fn``, backward included."""
    mode = flop_counter.FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
    with mode:
        fn()
    return int(mode.get_total_flops())


# -- the machine ------------------------------------------------------------------------------------------------------
def matmul_peak(size: int = 4096, repeats: int = 5, dtype: str = "float32") -> dict[str, Any]:
    """Achieved GFLOP/s of a large square matrix product (the ceiling the training FLOP/s is compared with)."""
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(torch_dtype)
    b = torch.randn(size, size, generator=gen).to(torch_dtype)
    out = torch.empty(size, size, dtype=torch_dtype)
    times = timed(lambda: torch.mm(a, b, out=out), warmup=1, repeats=repeats)
    return {**summary(times), "size": size, "dtype": dtype, "gflops": 2 * size**3 / statistics.median(times) / 1e9}


# -- models and data --------------------------------------------------------------------------------------------------
def build_ours(encoder: str, classes: int, crop: int, head_dim: int = HEAD_DIM, **overrides: Any) -> AllSparkSegmentor:
    """Our model with the faithful options (official behaviour), seeded; ``head_dim``: SegFormer head width."""
    torch.manual_seed(0)
    options = {**FAITHFUL_OPTIONS, **overrides}
    return build_model(encoder, num_classes=classes, crop_size=crop, head_dim=head_dim, **options)


def baseline_name(official: str | None) -> str:
    """``official`` when the official checkout is given, else ``literal`` (the restatement)."""
    return "official" if official else "literal"


def baseline_twin(model: AllSparkSegmentor, crop: int, official: str | None) -> nn.Module:
    """The baseline model with ``model``'s weights: the official code from the folder ``official``, else the
    restatement."""
    return official_twin(model, crop, official) if official else literal_twin(model, crop)


def batch(crop: int, classes: int, size: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labeled images, labels (a few ignored pixels) and unlabeled images, all from a fixed seed."""
    gen = torch.Generator().manual_seed(1)
    x_l = torch.randn(size, 3, crop, crop, generator=gen)
    x_u = torch.randn(size, 3, crop, crop, generator=gen)
    y_l = torch.randint(0, classes, (size, crop, crop), generator=gen)
    y_l[:, :4] = 255
    return x_l, y_l, x_u


def no_dropout(model: nn.Module) -> nn.Module:
    """Every dropout-like rate to 0 (for the equivalence checks)."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    return model


def our_step_fn(
    model: AllSparkSegmentor,
    crop: int,
    classes: int,
    precision: str,
    channels_last: bool,
    compile_model: bool,
    device: str = "cpu",
) -> Callable[[], torch.Tensor]:
    """One engine ``allspark`` iteration (teacher pass, student pass, loss, backward, SGD step) as a closure, on
    ``device``: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast and a gradient scaler, as the trainer does)."""
    dev = torch.device(device)
    cfg = load_config(
        {
            "method": "allspark",
            "data": {"crop_size": crop},
            "train": {"iterations": 1, "precision": precision, "channels_last": channels_last},
        }
    )
    model = model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer("sgd", param_groups(model, LR, LR_MULTI), LR, momentum=0.9, weight_decay=1e-4)
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16

        def autocast() -> contextlib.AbstractContextManager:
            return torch.autocast(dev.type, dtype=dtype)

    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    net = torch.compile(model) if compile_model else model
    ctx = StepContext(
        cfg=cfg,
        net=net,
        teacher=None,
        criterion_l=build_loss("ce"),
        device=dev,
        autocast=autocast,
        channels_last=channels_last,
    )
    x_l, y_l, x_u = (t.to(dev) for t in batch(crop, classes))

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        out = self_training_step(ctx, {"image": x_l, "mask": y_l}, {"image": x_u}, use_memory=True)
        scaler.scale(out.loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return out.loss.detach()

    return step


def baseline_step_fn(
    model: AllSparkSegmentor, crop: int, classes: int, official: str | None = None, device: str = "cpu"
) -> Callable[[], torch.Tensor]:
    """One ``train_allspark.py`` iteration of the baseline (the official code from the folder ``official``, else
    the restatement) as a closure on ``device``: teacher pass in eval mode, setters, student pass on the labeled +
    unlabeled batch (the memory update runs inside it), losses, backward, SGD step. The allspark-seg model is not
    kept."""
    ref = baseline_twin(model, crop, official).to(device)
    optimizer = literal_optimizer(ref, LR, LR_MULTI)
    x_l, y_l, x_u = (t.to(device) for t in batch(crop, classes))
    return lambda: literal_train_step(ref, optimizer, x_l, y_l, x_u)


# -- workloads --------------------------------------------------------------------------------------------------------
def _step_for(
    variant: dict[str, Any], encoder: str, crop: int, classes: int, head_dim: int = HEAD_DIM, device: str = "cpu"
) -> Callable[[], torch.Tensor]:
    """A training-iteration closure for ``variant`` = ``{"impl", "precision", "channels_last", "compile_model"}``
    (``{"impl": "official", "path": DIR}`` for the official code) on ``device``; all start from the same seeded
    weights."""
    impl = variant["impl"]
    model = build_ours(encoder, classes, crop, head_dim)
    if impl in ("literal", "official"):
        if variant.get("precision", "fp32") != "fp32" or variant.get("channels_last") or variant.get("compile_model"):
            raise ValueError(f"The {impl} baseline runs in fp32, contiguous, eager only.")
        return baseline_step_fn(model, crop, classes, variant["path"] if impl == "official" else None, device)
    if impl != "ours":
        raise ValueError(f"Unknown implementation {impl!r}.")
    return our_step_fn(
        model,
        crop,
        classes,
        variant.get("precision", "fp32"),
        bool(variant.get("channels_last")),
        bool(variant.get("compile_model")),
        device,
    )


def train_pair(
    base: dict[str, Any],
    other: dict[str, Any],
    encoder: str,
    crop: int,
    classes: int,
    warmup: int = 1,
    repeats: int = 5,
    flops: bool = False,
    head_dim: int = HEAD_DIM,
) -> dict[str, Any]:
    """Training-iteration times of two variants measured alternately in one process (base, other, base, ...), so
    both see the same machine conditions; the ratio is the median of the per-pair ratios ``other / base``.

    Args:
        base: The reference variant, e.g. ``{"impl": "official", "path": DIR}``.
        other: The measured variant, e.g. ``{"impl": "ours", "precision": "bf16", "channels_last": True}``.
        encoder: MiT variant.
        crop: Square crop (not a multiple of 32, as the official memory formula needs).
        classes: K.
        warmup: Untimed iterations of each first (the first one is reported separately).
        repeats: Timed iterations of each.
        flops: Also count the FLOPs of one more iteration of each.
        head_dim: SegFormer head width of both.
    """
    steps = [_step_for(base, encoder, crop, classes, head_dim), _step_for(other, encoder, crop, classes, head_dim)]
    gc.collect()
    first = []
    for step in steps:
        start = time.perf_counter()
        step()  # allocations, oneDNN primitives, compilation
        first.append(time.perf_counter() - start)
    for _ in range(max(warmup - 1, 0)):
        for step in steps:
            step()
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(*times, strict=True)]
    out: dict[str, Any] = {
        "base": {**summary(times[0]), "first": first[0]},
        "other": {**summary(times[1]), "first": first[1]},
        "ratio": statistics.median(ratios),
        "ratios": ratios,
    }
    if flops:
        out["base"]["flops"] = count_flops(steps[0])
        out["other"]["flops"] = count_flops(steps[1])
    return out


def train_time(
    variant: dict[str, Any],
    encoder: str,
    crop: int,
    classes: int,
    warmup: int = 1,
    repeats: int = 5,
    head_dim: int = HEAD_DIM,
) -> dict[str, Any]:
    """Training-iteration time of one variant alone (when there is no baseline to alternate with)."""
    step = _step_for(variant, encoder, crop, classes, head_dim)
    gc.collect()
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    return {**summary(timed(step, warmup - 1, repeats)), "first": first}


def train_memory(
    variant: dict[str, Any], encoder: str, crop: int, classes: int, iterations: int = 2, head_dim: int = HEAD_DIM
) -> dict[str, Any]:
    """Peak resident memory of one variant alone in this process over ``iterations`` training iterations (two: the
    second one also holds the optimiser's momentum buffers)."""
    step = _step_for(variant, encoder, crop, classes, head_dim)
    gc.collect()
    rss_before = current_rss_mb()
    for _ in range(iterations):
        step()
    return {"peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before}


def _peak_memory_mb(
    variant: dict[str, Any], encoder: str, crop: int, classes: int, head_dim: int, device: str, iterations: int
) -> dict[str, Any]:
    """Peak memory of ``variant`` alone over ``iterations`` iterations: on CUDA ``torch.cuda.max_memory_allocated``
    above what was allocated before its model was built (weights, gradients, momentum, activations); on the CPU the
    process's peak resident memory (cumulative: only meaningful for the first variant of a process)."""
    cuda = torch.device(device).type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    step = _step_for(variant, encoder, crop, classes, head_dim, device)
    for _ in range(iterations):
        step()
    synchronize(device)
    if not cuda:
        return {"peak_rss_mb": peak_rss_mb()}
    out = {
        "peak_mb": (torch.cuda.max_memory_allocated(device) - before) / 2**20,
        "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
    }
    del step
    gc.collect()
    torch.cuda.empty_cache()
    return out


def device_train(
    variants: list[dict[str, Any]],
    encoder: str,
    crop: int,
    classes: int,
    device: str = "cuda",
    warmup: int = 3,
    repeats: int = 10,
    head_dim: int = HEAD_DIM,
    memory_iterations: int = 2,
) -> dict[str, Any]:
    """Peak memory (each variant alone) and training-iteration time (all variants alternately) on ``device``.

    First each variant alone: its peak memory over ``memory_iterations`` iterations (:func:`_peak_memory_mb`), its
    model freed before the next. Then every variant is built again, run once (``first``: allocations, kernel
    selection), ``warmup - 1`` more times, and timed ``repeats`` times in turn (variant 0, 1, ..., 0, 1, ...), each
    iteration between two ``torch.cuda.synchronize`` calls so the time is the device's, not the launch queue's.
    Ratios are the medians of the per-round ratios ``variant / variants[0]``.

    Args:
        variants: The first is the reference, e.g. ``{"impl": "official", "path": DIR}``, then ours in each precision.
        encoder: MiT variant.
        crop: Square crop (not a multiple of 32, as the official memory formula needs).
        classes: K.
        device: ``cuda``, ``cuda:N`` or ``cpu`` (a dry run of the same code).
        warmup: Untimed iterations of each (the first one is reported separately).
        repeats: Timed iterations of each.
        head_dim: SegFormer head width.
        memory_iterations: Iterations of the peak-memory run (two: the second also holds the momentum buffers).
    """
    if torch.device(device).type == "cuda":  # cuBLAS handles and workspaces persist: made before any variant runs
        a = torch.ones(64, 64, device=device)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            torch.mm(a.to(dtype), a.to(dtype))
        synchronize(device)
    memory = [_peak_memory_mb(v, encoder, crop, classes, head_dim, device, memory_iterations) for v in variants]
    steps = [_step_for(v, encoder, crop, classes, head_dim, device) for v in variants]
    first = []
    for step in steps:
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        first.append(time.perf_counter() - start)
    for _ in range(max(warmup - 1, 0)):
        for step in steps:
            step()
    synchronize(device)
    times: list[list[float]] = [[] for _ in steps]
    losses: list[float] = [0.0 for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            loss = step()
            synchronize(device)
            times[i].append(time.perf_counter() - start)
            losses[i] = float(loss)
    results = []
    for i, variant in enumerate(variants):
        ratios = [t / t0 for t, t0 in zip(times[i], times[0], strict=True)]
        results.append(
            {
                "variant": variant,
                **summary(times[i]),
                "first": first[i],
                "ratio": statistics.median(ratios),
                "last_loss": losses[i],
                **memory[i],
            }
        )
    return {"device": str(device), "encoder": encoder, "crop": crop, "classes": classes, "results": results}


def memory_update(
    classes: int = 81,
    batch_u: int = 4,
    channels: int = 512,
    grid: int = 17,
    warmup: int = 3,
    repeats: int = 20,
    official: str | None = None,
) -> dict[str, Any]:
    """The Semantic Memory update alone: the official per-sample, per-class loop vs the vectorised enqueue.

    The loop is the official ``CrossAttnMem._dequeue_and_enqueue`` itself when ``official`` (the checkout) is
    given, else the restatement's copy of it. Both start from the same memory and receive the same channel maps
    and classes (from the channel grouping of random LayerNormed features against random guide logits); they must
    end in the same state.
    """
    n = grid * grid
    torch.manual_seed(0)
    memory_class = official_memory_class(official) if official else R.CrossAttnMem
    literal = memory_class(2, channels, 0.1, classes, n)
    ours = SemanticMemory(classes, channels, (grid, grid))
    ours.bank.copy_(literal.kv_queue)
    gen = torch.Generator().manual_seed(1)
    z_u = nn.functional.layer_norm(torch.randn(batch_u, n, channels, generator=gen), (channels,))
    guide = torch.randn(batch_u, classes, grid, grid, generator=gen)
    cls = channel_grouping(z_u, guide, (grid, grid))  # (B_u, C)

    def run_literal() -> None:
        for b in range(batch_u):
            literal._dequeue_and_enqueue(z_u[b], cls[b])

    def run_ours() -> None:
        ours.enqueue(z_u.transpose(1, 2), cls)  # as update_memory calls it: (B_u, C, N) view, (B_u, C) classes

    t_lit = timed(run_literal, warmup, repeats)
    t_ours = timed(run_ours, warmup, repeats)
    same = torch.equal(ours.ptr, literal.queue_ptr) and torch.equal(ours.bank, literal.kv_queue)
    return {
        "baseline": baseline_name(official),
        "base": summary(t_lit),
        "ours": summary(t_ours),
        "same_state": bool(same),
        "classes_per_sample": [int(c.unique().numel()) for c in cls],
        "shape": {"K": classes, "B_u": batch_u, "C": channels, "N": n},
    }


def _ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _ImageToLogits(nn.Module):
    """``image -> logits`` with a single positional input, as the TorchScript-based exporter wants it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)


def _export_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    """Trace the eval model at the size of ``x`` (static shapes) into an ONNX file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _ImageToLogits(model).eval(),
            (x,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            opset_version=17,
            dynamo=False,
        )


def inference(
    encoder: str = "mit_b0",
    size: int = 512,
    classes: int = 21,
    warmup: int = 2,
    repeats: int = 10,
    onnx: bool = True,
    bf16: bool = True,
    threads: int = 2,
    official: str | None = None,
) -> dict[str, Any]:
    """Single-image inference latency: ours (fp32, bf16 autocast, onnxruntime) and, when ``official`` (the
    checkout) is given, the official model with the same weights.

    Ours uses its default per-image inference (the cross branch only, once); the official model duplicates the
    input and computes the discarded self-attention branch. Also checks that both give the same logits. Without
    the official code only ours is timed (the restatement would compare several design choices at once).
    """
    model = build_ours(encoder, classes, 513, per_image_eval=True).eval()  # 513: the official 17 x 17 memory grid
    models: dict[str, nn.Module] = {"ours": model}
    if official:
        models["official"] = official_twin(model, 513, official).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    results: dict[str, Any] = {}

    def torch_run(m: nn.Module, bf16: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return m(x)

        return run

    for name, m in models.items():
        for precision in ("fp32", "bf16") if bf16 else ("fp32",):
            results[f"{name} {precision}"] = summary(timed(torch_run(m, precision == "bf16"), warmup, repeats))
    with torch.inference_mode():
        outputs = {name: m(x) for name, m in models.items()}
    checks = {}
    if official:
        checks["ours vs official (fp32)"] = rel(outputs["ours"], outputs["official"])
    if onnx:
        with tempfile.TemporaryDirectory() as tmp:
            for name, m in models.items():
                expected = outputs[name]
                path = Path(tmp) / f"{name}.onnx"
                _export_onnx(m, x, path)
                session = _ort_session(path, threads)
                feed = {"image": x.numpy()}
                results[f"{name} onnxruntime"] = summary(
                    timed(lambda s=session, f=feed: s.run(None, f), warmup, repeats)
                )
                checks[f"{name} onnxruntime vs PyTorch"] = rel(torch.from_numpy(session.run(None, feed)[0]), expected)
    return {
        "latency": results,
        "checks": checks,
        "size": size,
        "encoder": encoder,
        "classes": classes,
        "baseline": "official" if official else None,
    }


def _gradient_errors(
    model: nn.Module, truth: nn.Module, key: Callable[[str], str] = lambda n: n, norm: bool = False
) -> dict[str, float]:
    """Per-parameter relative gradient error against ``truth``: ``max |d| / max |g|`` (or ``||d|| / ||g||`` with
    ``norm``). The head's per-stage biases feed a training-mode batch norm that removes them: their exact gradient
    is 0, so they are compared relative to the largest gradient of the model."""
    true_params = dict(truth.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in truth.parameters() if p.grad is not None)
    out = {}
    for name, p in model.named_parameters():
        mine, other = p.grad.double(), true_params[key(name)].grad.double()
        if "linear_c" in name and name.endswith(".bias"):
            out[name] = float((mine - other).abs().max()) / scale
        elif norm:
            out[name] = float((mine - other).norm() / other.norm().clamp_min(1e-30))
        else:
            out[name] = rel(mine, other)
    return out


def _iteration(model: nn.Module, baseline: bool, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor) -> tuple:
    """The official iteration up to backward (dropout off): teacher logits, student logits (labeled, unlabeled).
    ``baseline``: ``model`` is the official code or the restatement (state through setters, one batch)."""
    dtype = next(model.parameters()).dtype
    x_l, x_u = x_l.to(dtype), x_u.to(dtype)
    with torch.no_grad():
        model.eval()
        teacher = model(x_u)
    model.train()
    if baseline:
        model.decoder.set_pseudo_prob_map(teacher)
        model.decoder.set_SMem_status(epoch=model.decoder.warmup_epoch)
        logits_l, logits_u = model(torch.cat([x_l, x_u])).split([x_l.shape[0], x_u.shape[0]])
    else:
        logits_l, logits_u = model(x_l, x_u, guide_logits=teacher, use_memory=True)
    loss = nn.functional.cross_entropy(logits_l, y_l, ignore_index=255)
    loss = (loss + nn.functional.cross_entropy(logits_u, teacher.argmax(dim=1))) / 2
    model.zero_grad()
    loss.backward()
    return teacher, logits_l, logits_u


def _interop_round_trip(ref: nn.Module, crop: int, x: torch.Tensor) -> dict[str, float]:
    """Save the baseline's ``state_dict`` as ``train_allspark.py`` does (``{"model": ...}``), read it back with
    :func:`allspark_seg.interop.load_official_checkpoint`; the tensors and the eval logits must come back."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "latest.pth"
        torch.save({"model": ref.state_dict(), "epoch": 0}, path)
        loaded = load_official_checkpoint(path, crop_size=crop)
    state = ref.state_dict()
    back = to_official_state_dict(loaded)
    tensors = max(rel(v, state[k]) for k, v in back.items() if v.is_floating_point())
    with torch.no_grad():
        ref.eval()
        loaded.eval()
        logits = rel(loaded(x), ref(x))
    return {"checkpoint tensors": tensors, "eval logits": logits}


def equivalence(
    encoder: str = "mit_b0",
    crop: int = 257,
    classes: int = 81,
    steps: int = 2,
    official: str | None = None,
    head_dim: int = HEAD_DIM,
) -> dict[str, Any]:
    """Our model against the baseline (the official code from the folder ``official``, else the restatement) with
    the same weights, dropout off, the memory read, ``steps`` SGD steps.

    - float64: ours vs baseline (teacher logits, training logits, every gradient, the memory, the state after the
      steps): the algorithms are the same up to rounding, so the differences are ~1e-13.
    - float32: ours vs baseline logits; and the gradient error of each implementation against its float64 run (the
      official code's own float32 error reaches 1e-4..1e-3 for some parameters at this size, so "ours vs
      official" in float32 would measure the official code's rounding, not ours).
    - the baseline's float32 state after the steps, saved as an official checkpoint and read back with
      ``load_official_checkpoint``: the same tensors and eval logits.
    """
    b = baseline_name(official)
    base = no_dropout(build_ours(encoder, classes, crop, head_dim, drop_path=0.0))
    models = {"ours": base, b: baseline_twin(base, crop, official)}
    models = {
        **{f"{k} float32": v for k, v in models.items()},
        **{f"{k} float64": copy.deepcopy(v).double() for k, v in models.items()},
    }
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9) for k, m in models.items()}
    worst: dict[str, float] = {}
    worst_param: dict[str, tuple[str, float]] = {}
    baseline_at_ours_worst = 0.0

    def record(key: str, value: float) -> None:
        worst[key] = max(worst.get(key, 0.0), value)

    for step in range(steps):
        x_l, y_l, x_u = batch(crop, classes)
        x_l, x_u = x_l + step, x_u - step  # a different batch per step
        outs = {k: _iteration(m, k.startswith(b), x_l, y_l, x_u) for k, m in models.items()}
        for dtype in ("float64", "float32"):
            o, li = outs[f"ours {dtype}"], outs[f"{b} {dtype}"]
            record(f"{dtype}: teacher logits, ours vs {b}", rel(o[0], li[0]))
            record(f"{dtype}: training logits, ours vs {b}", max(rel(o[1], li[1]), rel(o[2], li[2])))
        ours64, ref64 = models["ours float64"], models[f"{b} float64"]
        ours32, ref32 = models["ours float32"], models[f"{b} float32"]
        comparisons = {
            f"float64: gradients, ours vs {b}": _gradient_errors(ours64, ref64, official_key),
            "float32: gradients, ours vs float64": _gradient_errors(ours32, ours64),
            f"float32: gradients, {b} vs float64": _gradient_errors(ref32, ref64),
            "float32: gradients (norm-wise), ours vs float64": _gradient_errors(ours32, ours64, norm=True),
            f"float32: gradients (norm-wise), {b} vs float64": _gradient_errors(ref32, ref64, norm=True),
        }
        for label, errors in comparisons.items():
            name = max(errors, key=errors.get)
            record(label, errors[name])
            if errors[name] >= worst_param.get(label, ("", -1.0))[1]:
                worst_param[label] = (name, errors[name])
                if label == "float32: gradients, ours vs float64":  # the baseline's error on the same gradient
                    baseline_at_ours_worst = comparisons[f"float32: gradients, {b} vs float64"][official_key(name)]
        for dtype in ("float64", "float32"):
            mem, ref = models[f"ours {dtype}"].allspark.memory, models[f"{b} {dtype}"].decoder.allspark.attn
            record(f"{dtype}: memory bank, ours vs {b}", rel(mem.bank, ref.kv_queue))
            record(f"{dtype}: memory pointers differ", float(not torch.equal(mem.ptr, ref.queue_ptr)))
        for opt in optimizers.values():
            opt.step()
    for dtype in ("float64", "float32"):
        exported = to_official_state_dict(models[f"ours {dtype}"])
        reference = models[f"{b} {dtype}"].state_dict()
        diff = max(rel(v, reference[k]) for k, v in exported.items() if v.is_floating_point())
        record(f"{dtype}: state after {steps} SGD steps, ours vs {b}", diff)
    x_eval = batch(crop, classes)[2][:1]
    round_trip = _interop_round_trip(models[f"{b} float32"], crop, x_eval)
    for what, value in round_trip.items():
        record(f"float32: {b} checkpoint read by load_official_checkpoint, {what}", value)
    return {
        "baseline": b,
        "max_rel": worst,
        "worst_parameter": {k: v[0] for k, v in worst_param.items()},
        "baseline_error_at_ours_worst": baseline_at_ours_worst,
        "encoder": encoder,
        "crop": crop,
        "classes": classes,
        "steps": steps,
    }


# -- where the time goes, and FLOPs at the paper's sizes ------------------------------------------------------------
def _component_closures(
    impl: str, model: AllSparkSegmentor, crop: int, classes: int, device: str = "cpu", official: str | None = None
) -> dict[str, Callable[[], Any]]:
    """One closure per part of a training iteration, each running forward and backward of that part alone with
    fixed random upstream gradients: teacher pass, encoder, AllSpark block, head, loss (upsampling + cross-entropy),
    SGD step. ``impl``: ``ours``, ``official`` (the checkout ``official``) or ``literal`` (the restatement).
    ``device="meta"`` builds shape-only closures for FLOP counting."""
    x_l, y_l, x_u = (t.to(device) for t in batch(crop, classes))
    x = torch.cat([x_l, x_u])
    net: nn.Module
    if impl != "ours":
        net = baseline_twin(model, crop, official if impl == "official" else None).to(device)
        encoder, block, head = net.backbone, net.decoder.allspark, net.decoder.decoder
        if device == "meta":  # the per-class loop reads values on the host; it has no FLOPs
            block.attn._dequeue_and_enqueue = lambda *args: None
    else:
        net = model.to(device)
        encoder, block, head = net.encoder, net.allspark, net.head
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    with torch.no_grad():
        net.eval()
        teacher = net(x_u)
        net.train()
        feats = [f.detach().requires_grad_() for f in encoder(x)]
        if impl != "ours":
            net.decoder.set_pseudo_prob_map(teacher)
            net.decoder.set_SMem_status(epoch=net.decoder.warmup_epoch)
            e4 = block(feats[3], None, teacher, True)
        else:
            e4 = torch.cat(block(feats[3][:2], feats[3][2:], guide_logits=teacher, use_memory=True))
        head_in = [*feats[:3], e4.detach().requires_grad_()]
        logits = (head(head_in) if impl == "ours" else head(*head_in)).detach().requires_grad_()
    grads = [torch.randn_like(f) for f in feats]
    head_grad = torch.randn_like(logits)
    pseudo = teacher.argmax(dim=1)

    def teacher_pass() -> None:
        with torch.no_grad():
            net.eval()
            net(x_u)
            net.train()

    def encoder_part() -> None:
        torch.autograd.backward(encoder(x), grads)

    def block_part() -> None:
        if impl != "ours":
            out = block(feats[3], None, teacher, True)
        else:
            out = torch.cat(block(feats[3][:2], feats[3][2:], guide_logits=teacher, use_memory=True))
        out.backward(grads[3])

    def head_part() -> None:
        out = head(head_in) if impl == "ours" else head(*head_in)
        out.backward(head_grad)

    def loss_part() -> None:
        up = nn.functional.interpolate(logits, size=(crop, crop), mode="bilinear", align_corners=False)
        pred_l, pred_u = up.split([2, 2])
        loss = nn.functional.cross_entropy(pred_l, y_l, ignore_index=255) + nn.functional.cross_entropy(pred_u, pseudo)
        (loss / 2).backward()

    def optimizer_step() -> None:
        optimizer.step()

    return {
        "teacher pass": teacher_pass,
        "encoder fwd+bwd": encoder_part,
        "AllSpark block fwd+bwd": block_part,
        "head fwd+bwd": head_part,
        "loss (upsample + CE) fwd+bwd": loss_part,
        "SGD step": optimizer_step,
    }


def components(
    impl: str,
    encoder: str,
    crop: int,
    classes: int,
    warmup: int = 1,
    repeats: int = 3,
    official: str | None = None,
) -> dict[str, Any]:
    """Median time and FLOPs of each part of a training iteration (``impl`` = ``ours``, ``official`` with the
    checkout ``official``, or ``literal``: the restatement)."""
    model = build_ours(encoder, classes, crop)
    parts = _component_closures(impl, model, crop, classes, official=official)
    out: dict[str, Any] = {}
    for name, fn in parts.items():
        times = timed(fn, warmup, repeats)
        out[name] = {**summary(times), "flops": count_flops(fn)}
    out["peak_rss_mb"] = peak_rss_mb()
    params = sum(p.numel() for p in model.parameters())
    return {"parts": out, "params": params, "impl": impl, "encoder": encoder, "crop": crop, "classes": classes}


def flops_at(encoder: str, crop: int, classes: int, official: str | None = None) -> dict[str, Any]:
    """FLOPs of each part of a training iteration for both implementations (the baseline: the official code from
    the folder ``official``, else the restatement), counted on the meta device (shapes only: no memory, no
    compute), for sizes this machine cannot run, such as MiT-B5 at 801."""
    result = {}
    model = build_ours(encoder, classes, crop)
    params = sum(p.numel() for p in model.parameters())
    for impl in (baseline_name(official), "ours"):  # the baseline is built from the real weights before ours moves
        parts = _component_closures(impl, model, crop, classes, device="meta", official=official)
        result[impl] = {name: count_flops(fn) for name, fn in parts.items()}
        del parts
        gc.collect()
    return {"flops": result, "params": params, "encoder": encoder, "crop": crop, "classes": classes}
