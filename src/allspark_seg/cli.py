"""The ``allspark-seg`` command (also ``python -m allspark_seg`` and ``torchrun -m allspark_seg``).

Subcommands: ``demo``, ``train``, ``eval``, ``predict``, ``export``, ``splits``, ``coco-masks`` and ``synthetic``.
This module parses arguments, sets logging up once and calls the library; it holds no ML logic. Mistakes a user can
make (a wrong path, a config typo, a checkpoint of another model, a missing optional package) are printed as one
sentence on stderr with exit status 2; ``--debug`` prints the traceback as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .errors import AllSparkError, ConfigError
from .utils.logs import file_handler

__all__ = ["build_parser", "main", "parse_scales", "parse_size", "setup_logging"]

log = logging.getLogger("allspark_seg.cli")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
_HANDLER_FLAG = "_allspark_seg_cli"


# ------------------------------------------------------------------------------------------------- logging


def setup_logging(rank: int = 0, log_file: str | Path | None = None, *, debug: bool = False) -> list[logging.Handler]:
    """Send the package's log records to stderr (and a file) once per command.

    Rank 0 logs INFO (DEBUG with ``debug``) to the console and, when given, to ``log_file``; other ranks log
    warnings only, to the console. Handlers from an earlier call in the same process are replaced.

    Returns:
        The handlers installed (closed by :func:`_teardown_logging`).
    """
    logger = logging.getLogger("allspark_seg")
    _teardown_logging()
    level = logging.WARNING if rank != 0 else (logging.DEBUG if debug else logging.INFO)
    logger.setLevel(level)
    logger.propagate = False
    prefix = f"[rank {rank}] " if rank else ""
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S"))
    handlers: list[logging.Handler] = [console]
    if log_file is not None and rank == 0:
        handlers.append(file_handler(log_file))
    for handler in handlers:
        setattr(handler, _HANDLER_FLAG, True)
        handler.setLevel(level)
        logger.addHandler(handler)
    return handlers


def _teardown_logging() -> None:
    """Remove and close the handlers :func:`setup_logging` installed and give the logger its defaults back."""
    logger = logging.getLogger("allspark_seg")
    ours = [handler for handler in logger.handlers if getattr(handler, _HANDLER_FLAG, False)]
    for handler in ours:
        logger.removeHandler(handler)
        handler.close()
    if ours:
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


# ------------------------------------------------------------------------------------------- value parsers


def parse_scales(text: str) -> list[float]:
    """``"0.75,1,1.25"`` -> ``[0.75, 1.0, 1.25]`` (argparse type)."""
    try:
        scales = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None
    if not scales or any(s <= 0 for s in scales):
        raise argparse.ArgumentTypeError(f"'{text}' must list positive scale factors, e.g. 0.75,1,1.25")
    return scales


def parse_size(text: str) -> tuple[int, int]:
    """``"512"`` -> ``(512, 512)``; ``"512x1024"`` -> ``(512, 1024)`` (height x width; argparse type)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 512 or 512x1024") from None
    if len(values) not in (1, 2) or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 512 or 512x1024")
    return (values[0], values[-1])


# --------------------------------------------------------------------------------------------- subcommands


def _print_metrics(title: str, metrics: object, class_names: Sequence[str]) -> None:
    print(title)
    print(metrics.table(class_names))  # type: ignore[attr-defined]


def cmd_train(args: argparse.Namespace) -> int:
    """``train``: validate the config, then train (resuming from OUT/last.pt when it exists)."""
    from .config import load_config
    from .dist import destroy
    from .engine.train import fit

    cfg = load_config(args.config, args.set)
    try:
        result = fit(cfg, args.out, resume=args.resume)
    finally:
        destroy()
    if _rank() == 0 and result.final is not None:  # the per-class table is in the log (and OUT/results.json)
        print(
            f"Final mIoU {100 * result.final.miou:.2f} after {result.step} iterations; best mIoU "
            f"{100 * result.best_miou:.2f} at iteration {result.best_step}. Checkpoints: {Path(args.out) / 'best.pt'}, "
            f"{Path(args.out) / 'last.pt'}; metrics: {Path(args.out) / 'results.json'}."
        )
    return 0


def _eval_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.set)
    if args.mode is not None:
        overrides.append(f"eval.mode={args.mode}")
    if args.window is not None:
        overrides.append(f"eval.window=[{args.window[0]}, {args.window[1]}]")
    if args.stride is not None:
        overrides.append(f"eval.stride=[{args.stride[0]}, {args.stride[1]}]")
    if args.flip:
        overrides.append("eval.flip=true")
    if args.scales is not None:
        overrides.append(f"eval.scales={json.dumps(args.scales)}")
    return overrides


def cmd_eval(args: argparse.Namespace) -> int:
    """``eval``: rebuild the model from the checkpoint's config, evaluate, print the table and write JSON."""
    from .engine.predict import evaluate_checkpoint, load_trained_model

    trained = load_trained_model(args.checkpoint, args.device)
    result, cfg = evaluate_checkpoint(trained, data_root=args.data_root, overrides=_eval_overrides(args))
    ev = cfg.eval
    how = f"{ev.mode}" + (f" window {ev.window} stride {ev.stride}" if ev.mode == "slide" else "")
    how += (" + flip" if ev.flip else "") + (f" scales {ev.scales}" if list(ev.scales) != [1.0] else "")
    _print_metrics(
        f"{trained.path} (iteration {trained.step}) on {result.num_images} images of {cfg.data.root} ({how}):",
        result.metrics,
        trained.class_names,
    )
    if args.out is not None:
        report = {
            "checkpoint": str(trained.path),
            "step": trained.step,
            "method": cfg.method,
            "data_root": cfg.data.root,
            "eval": {"mode": ev.mode, "window": ev.window, "stride": ev.stride, "flip": ev.flip, "scales": ev.scales},
            "seconds": result.seconds,
            "metrics": result.metrics.to_dict(list(trained.class_names)),
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"Wrote {out}.")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """``predict``: class-id masks, colour masks and overlays for images, folders and glob patterns."""
    from .engine.predict import PredictSettings, load_trained_model, predict_paths

    settings = PredictSettings(
        mode=args.mode,
        slide_above=args.slide_above,
        window=args.window,
        stride=args.stride,
        flip=args.flip,
        scales=tuple(args.scales or (1.0,)),
        alpha=args.alpha,
    )
    settings.check()
    trained = load_trained_model(args.checkpoint, args.device)
    written = predict_paths(trained, args.inputs, args.out, settings)
    print(f"Wrote {len(written)} masks to {Path(args.out) / 'masks'} (colour: color/, overlays: overlay/).")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``export``: ONNX with dynamic height and width, checked in onnxruntime against PyTorch."""
    from .engine.export import export_onnx
    from .engine.predict import load_trained_model

    trained = load_trained_model(args.checkpoint, "cpu")
    report = export_onnx(trained, args.out, size=args.size, opset=args.opset, check=not args.no_check)
    print(f"Wrote {report.path} (opset {report.opset}, input 'image' (B, 3, H, W), output 'logits').")
    for (h, w), diff in report.max_abs_diff.items():
        print(f"  onnxruntime vs PyTorch on a random {h}x{w} image: max |difference| {diff:.2e}")
    return 0


def _split_role(path: str) -> str:
    """The role of a split file from its name: ``unlabeled``, ``val`` or (otherwise) ``labeled``."""
    name = Path(path).name.lower()
    if "unlabeled" in name:
        return "unlabeled"
    return "val" if name.startswith("val") else "labeled"


def cmd_splits(args: argparse.Namespace) -> int:
    """``splits``: draw a seeded labeled/unlabeled split, or ``--check`` existing split files."""
    from .data import list_train_items, make_split, open_split

    if args.check:
        if args.root is None:
            raise ConfigError("splits --check needs --root, the data root the split paths are relative to.")
        for path in args.check:
            role = _split_role(path)
            items = open_split(
                args.format, args.root, role, num_classes=args.num_classes, split_file=path, check=not args.no_scan
            )  # type: ignore[arg-type]
            with_masks = sum(item.mask is not None for item in items)
            print(f"{path}: {len(items)} {role} images ({with_masks} with masks) under {args.root}: all files OK.")
        return 0
    if args.labeled is None and args.fraction is None:
        raise ConfigError("splits needs --labeled N or --fraction F (or --check FILE to check split files).")
    if args.source is not None:
        source: object = args.source
    elif args.root is not None:
        source = list_train_items(args.format, args.root)
    else:
        raise ConfigError("splits needs --list FILE, or --root DIR to draw from the dataset's training images.")
    if args.out is None:
        raise ConfigError("splits needs --out DIR for labeled.txt and unlabeled.txt.")
    labeled, unlabeled = make_split(
        source,  # type: ignore[arg-type]
        args.labeled,
        args.fraction,
        args.seed,
        args.out,
        root=args.root,
    )
    n_l, n_u = (sum(1 for line in p.read_text().splitlines() if line.strip()) for p in (labeled, unlabeled))
    print(f"Wrote {n_l} labeled lines to {labeled} and {n_u} unlabeled lines to {unlabeled}.")
    return 0


def cmd_coco_masks(args: argparse.Namespace) -> int:
    """``coco-masks``: paint the 81-class masks from COCO instance annotations (needs pycocotools)."""
    from .data.coco import coco_to_masks

    written = coco_to_masks(args.annotations, args.images, args.out)
    print(f"Wrote {written} masks to {args.out}.")
    return 0


def cmd_synthetic(args: argparse.Namespace) -> int:
    """``synthetic``: write the built-in synthetic dataset in the folder layout."""
    from .data import generate_synthetic

    root = generate_synthetic(
        args.out,
        seed=args.seed,
        num_labeled=args.labeled,
        num_unlabeled=args.unlabeled,
        num_val=args.val,
        image_size=args.size,
        num_classes=args.classes if args.classes is not None else (6 if args.kind == "shapes" else 2),
        kind=args.kind,
    )
    print(f"Wrote the synthetic dataset to {root} (labeled/, unlabeled/, val/, classes.txt).")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``demo``: labels only vs the semi-supervised recipes on the synthetic data; table, pictures and index.html."""
    from .demo import run_demo

    result = run_demo(args.out, quick=args.quick, overrides=args.set, threads=args.threads or None, jobs=args.jobs)
    print(result.table)
    if result.verdict:
        print(result.verdict[:1].upper() + result.verdict[1:])
    print(f"Demo finished in {result.seconds / 60:.1f} min. Open {result.files['index']} in a browser.")
    return 0


# ------------------------------------------------------------------------------------------------- parser


def _add_set(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help=f"override {what} (YAML values: 1e-3, true, [1, 2]); repeatable",
    )


def _add_inference(parser: argparse.ArgumentParser, *, mode_choices: Sequence[str], mode_help: str) -> None:
    parser.add_argument("--mode", choices=mode_choices, default=None, help=mode_help)
    parser.add_argument("--window", type=parse_size, metavar="HxW", help="sliding window (default: eval.window)")
    parser.add_argument("--stride", type=parse_size, metavar="HxW", help="sliding stride (default: eval.stride)")
    parser.add_argument("--flip", action="store_true", help="add horizontally flipped passes (test-time aug)")
    parser.add_argument(
        "--scales", type=parse_scales, metavar="S,S,...", help="multi-scale test-time aug, e.g. 0.75,1,1.25"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``allspark-seg``."""
    parser = argparse.ArgumentParser(
        prog="allspark-seg",
        description="Semi-supervised semantic segmentation with AllSpark (CVPR 2024).",
        epilog="Run 'allspark-seg COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"allspark-seg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="labels only vs unlabeled images too, on built-in synthetic data, with pictures")
    p.add_argument("--quick", action="store_true", help="a shorter run (about 3 minutes on a 2-core CPU)")
    p.add_argument("--out", default=None, help="output folder (default runs/demo, or runs/demo-quick)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="PyTorch CPU threads of each training (default 1, fastest on a busy machine; 0: one per core)",
    )
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time, each in its own process (default 2)")
    _add_set(p, "demo settings for every recipe, e.g. train.iterations=500")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", "-c", required=True, help="YAML config file (see configs/)")
    p.add_argument("--out", "-o", required=True, help="run folder; running again with it resumes from last.pt")
    p.add_argument("--resume", default=None, metavar="CKPT", help="resume from this checkpoint instead")
    _add_set(p, "config keys, e.g. train.lr=0.01 data.root=/data/voc")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on its validation set")
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a training run")
    p.add_argument("--data-root", default=None, help="data root (default: the one the model was trained with)")
    p.add_argument("--out", default=None, help="write the metrics to this JSON file")
    _add_inference(p, mode_choices=("whole", "slide"), mode_help="whole image or sliding window (default: eval.mode)")
    _add_set(p, "data.* and eval.* keys, e.g. data.val_split=splits/val.txt eval.shift_edges=false")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="segment images, folders or glob patterns")
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a training run")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or quoted glob patterns")
    p.add_argument("--out", required=True, help="output folder (masks/, color/, overlay/)")
    p.add_argument(
        "--slide-above",
        type=int,
        default=None,
        metavar="PIXELS",
        help="in auto mode, slide when the long side exceeds this (default: twice the training crop)",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the colour mask in overlays")
    _add_inference(p, mode_choices=("auto", "whole", "slide"), mode_help="auto (default), whole or slide")
    p.set_defaults(func=cmd_predict, mode="auto")

    p = sub.add_parser("export", help="export the inference graph to ONNX and check it in onnxruntime")
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a training run")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="export format")
    p.add_argument("--out", required=True, help="output file, e.g. model.onnx")
    p.add_argument("--size", type=parse_size, default=None, metavar="HxW", help="tracing size (default: the crop)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("splits", help="draw a seeded labeled/unlabeled split, or check split files")
    p.add_argument("--list", dest="source", default=None, metavar="FILE", help="draw from this list (lines kept)")
    p.add_argument("--root", default=None, help="data root (draw from its training images; paths relative to it)")
    p.add_argument("--format", default="folder", help="voc, cityscapes, coco or folder (default folder)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--labeled", type=int, default=None, metavar="N", help="number of labeled images")
    group.add_argument("--fraction", type=float, default=None, help="labeled fraction, e.g. 0.0625 for 1/16")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw")
    p.add_argument("--out", default=None, help="folder receiving labeled.txt and unlabeled.txt")
    p.add_argument(
        "--check",
        nargs="+",
        default=None,
        metavar="FILE",
        help="instead, read these split files (e.g. the published ones) and check every file they name under --root",
    )
    p.add_argument("--num-classes", type=int, default=None, help="with --check on folder data without classes.txt")
    p.add_argument("--no-scan", action="store_true", help="with --check, only check that the files exist")
    p.set_defaults(func=cmd_splits)

    p = sub.add_parser("coco-masks", help="write COCO 81-class masks from instances_*.json (needs pycocotools)")
    p.add_argument("--annotations", required=True, help="instances_train2017.json or instances_val2017.json")
    p.add_argument("--images", default=None, help="the matching image folder (skip images missing there)")
    p.add_argument("--out", required=True, help="mask folder, e.g. ROOT/masks/train2017")
    p.set_defaults(func=cmd_coco_masks)

    p = sub.add_parser("synthetic", help="write the built-in synthetic dataset to a folder")
    p.add_argument("--out", required=True, help="target folder (new, empty, or an earlier synthetic dataset)")
    p.add_argument("--labeled", type=int, default=24, help="labeled images")
    p.add_argument("--unlabeled", type=int, default=400, help="unlabeled images")
    p.add_argument("--val", type=int, default=100, help="validation images")
    p.add_argument("--size", type=int, default=96, help="image side in pixels")
    p.add_argument(
        "--classes",
        type=int,
        default=None,
        help="classes incl. background (shapes 2..10, default 6; digits 2..11, cells 2..3, default 2)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument(
        "--kind",
        choices=("shapes", "digits", "cells"),
        default="shapes",
        help="shapes (generated), digits (MNIST digits on photographs) or cells (microscopy); docs/data.md",
    )
    p.set_defaults(func=cmd_synthetic)

    from .experiment import add_experiment_parser  # the study runner's options live next to its logic

    add_experiment_parser(sub)
    return parser


def _log_file(args: argparse.Namespace) -> Path | None:
    if args.command == "train":
        return Path(args.out) / "train.log"
    if args.command == "demo":
        return Path(args.out) / "demo.log"
    return None


def _describe(error: BaseException) -> str:
    """One sentence for a user error."""
    if isinstance(error, OSError) and not isinstance(error, AllSparkError):
        what = error.strerror or type(error).__name__
        where = f": '{error.filename}'" if error.filename else ""
        return f"{what}{where}."
    return str(error).strip() or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and args.out is None:
        args.out = "runs/demo-quick" if args.quick else "runs/demo"
    run: Callable[[argparse.Namespace], int] = args.func
    try:
        setup_logging(_rank(), _log_file(args), debug=args.debug)
        return run(args)
    except (AllSparkError, OSError) as error:
        if args.debug:
            traceback.print_exc()
        prefix = f"[rank {_rank()}] " if _rank() else ""
        print(f"{prefix}error: {_describe(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        _teardown_logging()
