"""The training loop's overhead with few labels: ``allspark-seg train`` s/iteration against the bare step.

Usage::

    python bench/loop_overhead.py [--iterations 60] [--log-every 10] [--repeats 3] [--method supervised]
                                  [--out bench/results]

Writes a folder-layout dataset (docs/data.md) of 4 labeled 64 x 64 tiles (with 4 unlabeled and 2 validation tiles,
which the layout requires) into a temporary folder, then, for the default threads (``OMP_NUM_THREADS`` unset) and
for ``OMP_NUM_THREADS=1``, alternately ``--repeats`` times, each in a fresh process:

- the bare step: forward, loss, backward and AdamW step of the model ``configs/folder.yaml`` builds (MobileNetV2
  with the installed ImageNet weights, crop 64, 3 classes) on a fixed ``4 x 3 x 64 x 64`` batch, nothing else
  (median of 30 steps after 5 warm-ups);
- ``allspark-seg train -c configs/folder.yaml`` with ``method=supervised`` on those tiles (one step per epoch),
  validation and checkpoints pushed past the end of the run: the median of the logged ``sec_per_iter`` without
  the first logging window (start-up and warm-up).

The ratio CLI / bare step is the loop's overhead (data loading, loader start-up, logging); the issue's target is
<= 1.2. ``--method allspark`` times the semi-supervised run instead (two loaders; the bare step stays the
supervised one, so its ratio is not an overhead). Writes ``OUT/loop_overhead.json`` and ``OUT/loop_overhead.md``
(``loop_overhead_METHOD.*`` for another method) and prints the Markdown. Only an idle machine gives meaningful
times: the 1-minute load average is recorded around every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIG = REPO / "configs" / "folder.yaml"
RESULT_PREFIX = "BENCH-RESULT "
NUM_CLASSES = 3
SIDE = 64
COUNTS = {"labeled": 4, "unlabeled": 4, "val": 2}
THREADS = ("default", "1")


def write_tiles(root: Path) -> Path:
    """The folder layout with :data:`COUNTS` tiles of ``SIDE x SIDE`` pixels (synthetic shapes, exact masks)."""
    from allspark_seg.data.synthetic import render_sample

    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("background\ndisc\nsquare\n")
    folders = {"labeled": root / "labeled/images", "unlabeled": root / "unlabeled", "val": root / "val/images"}
    rng = np.random.default_rng(0)
    for role, count in COUNTS.items():
        folders[role].mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = render_sample(rng, SIDE, NUM_CLASSES)
            Image.fromarray(image).save(folders[role] / f"{role}{i}.png")
            if role != "unlabeled":
                (folders[role].parent / "masks").mkdir(exist_ok=True)
                Image.fromarray(mask).save(folders[role].parent / "masks" / f"{role}{i}.png")
    return root


def overrides(root: Path) -> list[str]:
    """The ``--set`` values of every measurement (the bare step builds its model from the same config)."""
    return [f"data.root={root}", "method=supervised"]


def bare_step(root: Path, steps: int = 30, warmup: int = 5) -> dict[str, Any]:
    """Median seconds of forward + loss + backward + AdamW on a fixed batch (runs in the measuring process)."""
    import torch

    from allspark_seg.config import load_config
    from allspark_seg.engine.data import prepare_data
    from allspark_seg.losses import build_loss
    from allspark_seg.models.factory import build_model_from_config
    from allspark_seg.optim import build_optimizer, param_groups

    with tempfile.TemporaryDirectory() as out:
        cfg = prepare_data(load_config(CONFIG, overrides(root)), Path(out)).cfg
    t = cfg.train
    torch.manual_seed(0)
    model = build_model_from_config(cfg).train()
    groups = param_groups(model, t.lr, t.lr_multi)
    optimizer = build_optimizer(t.optimizer, groups, t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    criterion = build_loss(t.loss, thresh=t.ohem_thresh, min_kept=t.ohem_min_kept)
    x = torch.randn(t.batch_size, 3, SIDE, SIDE)
    y = torch.randint(0, NUM_CLASSES, (t.batch_size, SIDE, SIDE))
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits, _ = model(x)
        criterion(logits.float(), y).backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "threads": torch.get_num_threads(), "crop": cfg.data.crop_size}


def _env(threads: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads != "default":
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = threads
    return env


def run_bare(root: Path, threads: str) -> dict[str, Any]:
    """:func:`bare_step` in a fresh process with ``threads``."""
    cmd = [sys.executable, str(HERE / "loop_overhead.py"), "--bare", str(root)]
    proc = subprocess.run(cmd, env=_env(threads), capture_output=True, text=True, check=False, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bare step failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def run_cli(
    root: Path, run_dir: Path, threads: str, iterations: int, log_every: int, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``allspark-seg train`` in a fresh process with ``threads``; the logged s/iteration past the first window."""
    shutil.rmtree(run_dir, ignore_errors=True)
    never = str(100 * iterations)
    sets = [*overrides(root), *extra, f"train.iterations={iterations}", f"train.log_every={log_every}"]
    sets += [f"train.eval_every={never}", f"train.checkpoint_every={never}"]
    cmd = [sys.executable, "-m", "allspark_seg", "train", "-c", str(CONFIG), "--out", str(run_dir), "--set", *sets]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(threads), capture_output=True, text=True, check=False, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"train failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r["sec_per_iter"] for r in rows if r["type"] == "train"][1:]
    notes = [line for line in proc.stderr.splitlines() if "num_workers" in line or "threads" in line]
    return {"median_s": statistics.median(windows), "windows": windows, "wall_s": wall, "log": notes}


def machine() -> dict[str, Any]:
    """CPU model, usable cores, torch and Python versions, the commit and package timed, the date."""
    import torch

    import allspark_seg

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return {
        "cpu": cpu,
        "cores": cores,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit.stdout.strip(),
        "package": str(Path(allspark_seg.__file__).parent),  # the code timed (PYTHONPATH can point elsewhere)
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def measure(root: Path, work: Path, iterations: int, log_every: int, repeats: int, method: str) -> dict[str, Any]:
    """Bare step and CLI, for each thread setting, alternately ``repeats`` times."""
    rows: dict[str, dict[str, list[Any]]] = {t: {"bare": [], "cli": [], "load": []} for t in THREADS}
    for r in range(repeats):
        for threads in THREADS:
            load = os.getloadavg()[0]
            bare = run_bare(root, threads)
            extra = (f"method={method}",)
            cli = run_cli(root, work / f"run_{threads}_{r}", threads, iterations, log_every, extra)
            rows[threads]["bare"].append(bare)
            rows[threads]["cli"].append(cli)
            rows[threads]["load"].append([load, os.getloadavg()[0]])
            print(
                f"threads {threads}, repeat {r + 1}: bare {bare['median_s']:.4f} s ({bare['threads']} threads), "
                f"CLI {cli['median_s']:.4f} s/iteration",
                flush=True,
            )
    summary = {}
    for threads, row in rows.items():
        bare_s = statistics.median(b["median_s"] for b in row["bare"])
        cli_s = statistics.median(c["median_s"] for c in row["cli"])
        summary[threads] = {"bare_s": bare_s, "cli_s": cli_s, "ratio": cli_s / bare_s}
    one = summary["1"]
    summary["default_vs_1"] = summary["default"]["cli_s"] / one["cli_s"]
    summary["default_cli_vs_1_thread_bare"] = summary["default"]["cli_s"] / one["bare_s"]
    return {"rows": rows, "summary": summary}


def render(result: dict[str, Any], info: dict[str, Any], iterations: int, log_every: int, method: str) -> str:
    """The results as Markdown."""
    s = result["summary"]
    loads = [x for row in result["rows"].values() for pair in row["load"] for x in pair]
    lines = [
        "# Loop overhead with few labels",
        "",
        f"`python bench/loop_overhead.py`: {info['cpu']}, {info['cores']} usable cores, torch {info['torch']}, "
        f"commit {info['commit']}, {info['date']}; 1-minute load {min(loads):.2f}-{max(loads):.2f}. "
        f"configs/folder.yaml, method={method}, 4 labeled 64 x 64 tiles (one step per epoch), {iterations} "
        f"iterations logged every {log_every}, first window skipped; medians over the repeats.",
        "",
        "| threads | bare step s | CLI s/iteration | CLI / bare step (target <= 1.2) |",
        "| --- | --- | --- | --- |",
    ]
    for threads in THREADS:
        row = s[threads]
        name = "default (OMP_NUM_THREADS unset)" if threads == "default" else f"OMP_NUM_THREADS={threads}"
        lines.append(f"| {name} | {row['bare_s']:.4f} | {row['cli_s']:.4f} | {row['ratio']:.2f} |")
    lines += [
        "",
        f"CLI default / CLI one thread: {s['default_vs_1']:.2f}; CLI default / bare step with one thread: "
        f"{s['default_cli_vs_1_thread_bare']:.2f}.",
    ]
    notes = sorted({n.split(" ", 1)[-1] for row in result["rows"].values() for c in row["cli"] for n in c["log"]})
    if notes:
        lines += ["", "The trainings logged:", "", *[f"- `{n.strip()}`" for n in notes]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=60, help="training iterations per CLI run")
    parser.add_argument("--log-every", type=int, default=10, help="logging window (the first is skipped)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per thread setting")
    parser.add_argument("--method", default="supervised", help="the CLI run's method (the bare step is supervised)")
    parser.add_argument("--out", default=None, help="folder for loop_overhead.{json,md}")
    parser.add_argument("--bare", default=None, help=argparse.SUPPRESS)  # worker: time the bare step on this root
    args = parser.parse_args(argv)
    if args.bare:
        print(RESULT_PREFIX + json.dumps(bare_step(Path(args.bare))), flush=True)
        return 0
    work = Path(tempfile.mkdtemp(prefix="allspark_loop_overhead_"))
    try:
        root = write_tiles(work / "data")
        result = measure(root, work, args.iterations, args.log_every, args.repeats, args.method)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = machine()
    text = render(result, info, args.iterations, args.log_every, args.method)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"machine": info, "method": args.method, "iterations": args.iterations, "log_every": args.log_every}
        payload.update(result)
        name = "loop_overhead" if args.method == "supervised" else f"loop_overhead_{args.method}"
        (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
        (out / f"{name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
