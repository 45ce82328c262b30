"""Training and Free Mask killed with a real SIGKILL resume to exactly what an uninterrupted run gives
(``benchmarks.training_reliability`` in its quick form: subprocesses in their own process group, os.killpg), run
through ``freesolo bench`` so that the report it assembles is checked too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.run import run_benchmarks
from benchmarks.training_reliability import ATOL, QUICK, STEM
from training.errors import UserError


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path: Path) -> None:
    assert run_benchmarks(tmp_path, ["training_reliability"], quick=True) == 0
    part = tmp_path / "training_reliability"
    report = json.loads((part / f"{STEM}.json").read_text())

    training = report["training"]
    assert len(training["kills"]) == len(QUICK.kills)
    for kill in training["kills"]:
        # killed mid-run: past the first checkpoint, before the end; the checkpoint it left loads and is not ahead
        assert QUICK.checkpoint_period < kill["iterations_done_at_kill"] < QUICK.iters
        assert QUICK.checkpoint_period <= kill["checkpoint_iteration"] <= kill["iterations_done_at_kill"]
        assert not kill["model_pt_exists"]
    assert training["tensors"] > 100
    assert training["max_abs_weight_difference"] <= ATOL and training["weights_equal_within_atol"]
    assert training["log_iterations_once_each"] and training["max_abs_loss_difference"] <= ATOL
    assert training["stale_temporaries_after_resume"] == 0  # what a kill during a checkpoint write left is gone

    freemask = report["freemask"]
    assert 0 < freemask["images_done_at_kill"] < QUICK.images and not freemask["output_written_before_rerun"]
    assert freemask["images"] == QUICK.images and freemask["annotations"] > 0
    for key in ("duplicate_images", "missing_images", "unexpected_images", "duplicate_image_ids"):
        assert freemask[key] == 0, key
    assert freemask["duplicate_annotation_ids"] == 0 and freemask["orphan_annotations"] == 0
    assert freemask["identical"] and freemask["parts_removed"]

    assert report["passed"]
    assert (part / f"{STEM}.md").read_text().startswith("# Reliability under SIGKILL")
    assert (part / f"{STEM}.png").stat().st_size > 0

    # the bench report: headline rows from the part's numbers, the part's section with its picture relinked
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["parts"]["training_reliability"]["ok"] and summary["quick"]
    assert [row["part"] for row in summary["headlines"]] == ["training_reliability"] * 2
    text = (tmp_path / "report.md").read_text()
    assert "vs an uninterrupted run (pass)" in text
    assert f"](training_reliability/{STEM}.png)" in text


def test_bench_refuses_unknown_parts(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown benchmark part"):
        run_benchmarks(tmp_path, ["latency", "warp_speed"], quick=True)
    assert not any(tmp_path.iterdir())
