"""The label-efficiency benchmark's plan and arithmetic (the training itself is the experiment command's)."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest

from allspark_seg import experiment as E

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import label_efficiency as LE  # noqa: E402


def test_every_planned_run_has_a_valid_config_and_the_promised_seeds(tmp_path: Path) -> None:
    total = 0
    for task in LE.TASKS:
        for budget in task.budgets:
            settings = E.expand_settings([E.parse_variant(v) for v in LE.variants(task, budget, tmp_path)], [])
            overrides = [*task.overrides, f"data.synthetic.num_labeled={budget}", "model.pretrained="]
            runs = E.plan_runs(LE.CONFIG, tmp_path, settings, list(LE.SEEDS), overrides)  # validates every config
            seeds = {s.name: sorted(r.seed for r in runs if r.setting == s) for s in settings}
            for key in ("labels-only", "all-labels", "allspark", "allspark+", "fixmatch+class_thresh+area_cap"):
                assert seeds[key] == [0, 1, 2]
            search = budget == task.budgets[0]
            for key in LE.SEARCH_ROWS:
                three = search or (task.name == "shapes" and key.startswith("fixmatch+teacher+area_cap"))
                assert seeds[key] == ([0, 1, 2] if three else [0])
            capped = ("labels-only", "fixmatch+teacher+area_cap", *(f"fixmatch+teacher+area_cap_r{k}" for k in (2, 3)))
            rounds = ("labels-only", "fixmatch+teacher", *(f"fixmatch+teacher_r{k}" for k in (2, 3, 4)))
            ablation = (task.name, budget) in LE.ABLATION_STUDIES
            assert ("fixmatch+teacher" in seeds) == ablation
            pairs = [*itertools.pairwise(capped), *(itertools.pairwise(rounds) if ablation else ())]
            pairs.append(("fixmatch+class_thresh+area_cap", "fixmatch+class_thresh+area_cap_r2"))
            for teacher, key in pairs:
                one = key in LE.SEARCH_ROWS and not search and not (task.name == "shapes" and key in capped)
                assert seeds[key] == ([0] if one else [0, 1, 2])
                for run in (r for r in runs if r.setting.name == key):
                    path = tmp_path / "runs" / teacher / f"seed{run.seed}" / "last.pt"
                    assert f"semi.teacher_checkpoint={path}" in run.overrides
            assert seeds["fixmatch"] == [0]
            assert seeds["allspark++area_cap"] == ([0, 1, 2] if task.name == "shapes" else [0])
            full = next(r for r in runs if r.setting.name == "all-labels")
            assert f"data.synthetic.num_labeled={budget + LE.UNLABELED}" in full.overrides
            total += len(runs)
    with_scratch = [
        (t.name, b) for t in LE.TASKS for b in t.budgets if any("scratch" in v for v in LE.variants(t, b, tmp_path))
    ]
    assert with_scratch == [LE.SCRATCH_STUDY]
    assert total > 40


def test_gap_closed_and_separation() -> None:
    few = {"best_mean": 50.0, "best_std": 1.0}
    full = {"best_mean": 70.0, "best_std": 1.0}
    semi = {"best_mean": 58.0, "best_std": 2.0}
    assert LE.gap_closed(semi, few, full) == pytest.approx(0.4)
    assert LE.gap_closed(few, few, full) == 0.0
    assert LE.gap_closed(semi, few, {"best_mean": 49.0}) is None  # no gap to close
    assert LE.separation(semi, few) == pytest.approx(8.0 / math.sqrt(2.5))
    assert LE.separation({"best_mean": 58.0, "best_std": None}, few) is None  # one seed: no std


def test_table_lists_every_row_with_gap_and_separation() -> None:
    row = {"task": "digits", "labeled": 4, "recipe": "allspark", "runs": 3, "best_mean": 58.0, "best_std": 2.0}
    row |= {"final_mean": 57.0, "final_std": 1.5, "gap_closed": 0.4, "vs_labels_only": 5.06, "pseudo_acc": 91.25}
    row |= {"minutes": 3.0}
    text = LE.table([row])
    assert "| digits | 4 | allspark | 3 | 58.00 ± 2.00 | 57.00 ± 1.50 | 40% | +5.1 | 91.2 | 3.0 |" in text


def test_studies_run_in_the_order_given_and_unknown_names_are_refused() -> None:
    every = LE.studies(None)
    assert [(t.name, b) for t, b in every] == [(t.name, b) for t in LE.TASKS for b in t.budgets]
    picked = LE.studies("shapes-24, digits-4")
    assert [(t.name, b) for t, b in picked] == [("shapes", 24), ("digits", 4)]
    with pytest.raises(SystemExit, match="unknown study 'shapes-7'"):
        LE.studies("shapes-24,shapes-7")
