"""`freesolo pipeline` end to end on a handful of images: every stage, the report, and resuming after a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import training.pipeline as pipeline
from studies.freesolo_report import CACHE, checks, seed_rows
from studies.rows import NOT_MADE, folds, measured_row
from training.cli import main
from training.evaluate import load_ground_truth
from training.report import STAGE_KEYS

FEW_ITERATIONS = [
    "--set",
    "pretrain.solver.iters=2",
    "--set",
    "pretrain.solver.batch_size=4",
    "--set",
    "pretrain.queue_size=64",
    "--set",
    "weak.solver.iters=2",
    "--set",
    "weak.selftrain_iters=2",
    "--set",
    "weak.solver.batch_size=2",
    "--set",
    "freemask.score_thr=0.3",
    "--set",
    "weak.selftrain_score_thr=0",
]


def pipeline_args(synth_data: Path, out: Path) -> list[str]:
    return [
        "pipeline",
        "--images",
        str(synth_data / "train"),
        "--out",
        str(out),
        "--eval-images",
        str(synth_data / "val"),
        "--eval-ann",
        str(synth_data / "val.json"),
        "--no-progress",
        *FEW_ITERATIONS,
    ]


def test_pipeline_crash_resume_and_report(
    synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pipeline"  # where the results report keeps its main run

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash during self-training")

    monkeypatch.setattr(pipeline, "self_train", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(pipeline_args(synth_data, out))
    finished = {
        path: path.stat().st_mtime_ns
        for path in (
            out / "pretrain" / "model.pt",
            out / "backbone.pth",
            out / "freemask" / "train.json",
            out / "freemask" / "eval.json",
            out / "weak" / "model.pt",
        )
    }
    monkeypatch.undo()

    assert main(pipeline_args(synth_data, out)) == 0
    assert {path: path.stat().st_mtime_ns for path in finished} == finished, "finished stages are not redone"
    report = json.loads((out / "report.json").read_text())
    assert [stage["name"] for stage in report["stages"]] == ["freemask", "weak", "selftrain1"]
    for stage in report["stages"]:
        assert all(0.0 <= stage[key] <= 1.0 for key in ("AP", "AP50", "AP75", "AR100"))
    assert "| freemask |" in (out / "report.md").read_text() and (out / "overlays.png").stat().st_size > 1000
    assert "| selftrain1 |" in capsys.readouterr().out
    assert (out / "selftrain" / "model.pt").is_file()

    # The results report's rows of a seed, given the pipeline's own evaluation set, measure its models alike, with
    # dashes for what is not made (here the colour baseline and the control) and per-fold rows.
    ground_truth = load_ground_truth(synth_data / "val.json")
    rows = seed_rows(tmp_path, 0, synth_data / "val", synth_data / "val.json", "eval", folds(ground_truth, 2))
    metrics = [{key: row[key] for key in STAGE_KEYS} for row in rows]
    assert metrics[1:4] == [{key: stage[key] for key in STAGE_KEYS} for stage in report["stages"]]
    assert all(len(row["folds"]) == 2 for row in rows[1:4])
    assert [row["name"].endswith(NOT_MADE) for row in rows] == [True, False, False, False, True]
    assert metrics[0] == metrics[4] == dict.fromkeys(STAGE_KEYS)
    assert checks(rows)["weak AP >= 1.5 x its coarse masks"] is not None
    assert checks(rows)["self-training above its teacher and its control"] is None
    # one cached result per model, which a second measurement reads instead of predicting again
    stored = sorted((tmp_path / CACHE).glob("*.json"))
    assert len(stored) == 2
    truth = [{**annotation, "score": 1.0} for annotation in ground_truth.dataset["annotations"]]
    for path in stored:  # results no 2-step model could give
        path.write_text(json.dumps(truth))
    again = seed_rows(tmp_path, 0, synth_data / "val", synth_data / "val.json", "eval", [])
    assert again[1]["AP"] == rows[1]["AP"] and again[2]["AP"] == again[3]["AP"] == pytest.approx(1.0)


def test_holdout_folds_partition_the_set_and_are_measured_alone(synth_data: Path) -> None:
    ground_truth = load_ground_truth(synth_data / "val.json")
    parts = folds(ground_truth, 2)
    image_ids = [sorted(part.getImgIds()) for part in parts]
    assert set(image_ids[0]).isdisjoint(image_ids[1]) and image_ids[0] and image_ids[1]
    assert sorted(image_ids[0] + image_ids[1]) == sorted(ground_truth.getImgIds())
    assert sum(len(part.getAnnIds()) for part in parts) == len(ground_truth.getAnnIds())
    # the ground truth as detections: perfect on the whole set and on each fold
    truth = [{**annotation, "score": 1.0} for annotation in ground_truth.dataset["annotations"]]
    row = measured_row("truth", ground_truth, truth, parts)
    assert row["AP"] == pytest.approx(1.0) and all(fold["AP"] == pytest.approx(1.0) for fold in row["folds"])
    # half the objects found: each fold is measured on its own images only
    first_fold = [t for t in truth if t["image_id"] in set(image_ids[0])]
    row = measured_row("first fold found", ground_truth, first_fold, parts)
    assert row["folds"][0]["AR100"] == pytest.approx(1.0) and row["folds"][1]["AR100"] == 0.0
    assert 0.0 < row["AR100"] < 1.0


def test_eval_arguments_go_together(synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "pipeline",
            "--images",
            str(synth_data / "train"),
            "--out",
            str(tmp_path / "run"),
            "--eval-images",
            str(synth_data / "val"),
            "--no-progress",
        ]
    )
    assert code == 2 and "--eval-images and --eval-ann go together" in capsys.readouterr().err
