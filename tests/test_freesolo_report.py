"""The results report's acceptance checks and tables, on hand-made rows (the numbers come from real runs only in
the report itself; here the rules that judge them)."""

from __future__ import annotations

from typing import Any

from studies.freesolo_report import checks, tables
from studies.rows import NOT_MADE
from training.report import STAGE_KEYS

STAGES = ("colour", "coarse", "weak", "final", "control")
COARSE = "coarse AP >= 8 and >= the colour baseline"
WEAK = "weak AP >= 1.5 x its coarse masks"
ROUND = "self-training above its teacher and its control"


def rows(**ap: float | None) -> list[dict[str, Any]]:
    values = {"colour": 0.08, "coarse": 0.10, "weak": 0.20, "final": 0.28, "control": 0.21, **ap}
    made = [{"name": name, **dict.fromkeys(STAGE_KEYS, values[name])} for name in STAGES]
    return [row if row["AP"] is not None else {**row, "name": row["name"] + NOT_MADE} for row in made]


def test_every_check_holds_on_a_pipeline_that_learns() -> None:
    assert checks(rows()) == {COARSE: True, WEAK: True, ROUND: True}


def test_each_check_fails_on_its_own_rule() -> None:
    assert checks(rows(coarse=0.079, colour=0.05))[COARSE] is False  # under 8 AP
    assert checks(rows(colour=0.11))[COARSE] is False  # below the colour baseline on the same images
    assert checks(rows(weak=0.149))[WEAK] is False  # under 1.5 x its coarse masks
    assert checks(rows(control=0.28))[ROUND] is False  # a tie with the control is not a gain
    assert checks(rows(final=0.20))[ROUND] is False  # no gain over the teacher


def test_unmeasured_rows_leave_their_checks_open() -> None:
    verdicts = checks(rows(control=None))
    assert verdicts == {COARSE: True, WEAK: True, ROUND: None}


def test_tables_show_verdicts_and_dashes() -> None:
    seed = {"val": rows(), "held-out": rows(control=None, weak=0.1)}
    report = {
        "seeds": {0: seed},
        "checks": {0: {where: checks(found) for where, found in seed.items()}},
        "val_extra": [],
        "rounds_held_out": rows(final=None)[3:4],
        "ladder": [],
    }
    text = tables(report)
    assert "| colour | 8.0 | 8.0 |" in text  # AP by seed: val, then held-out
    assert "| control | 21.0 | - |" in text
    assert f"| 0 | held-out | {WEAK} | NO |" in text and f"| 0 | held-out | {ROUND} | not measured |" in text
    assert f"| 0 | val | {ROUND} | yes |" in text
    assert f"| final{NOT_MADE} | - | - |" in text  # the held-out rounds' folds: dashes until it is trained
