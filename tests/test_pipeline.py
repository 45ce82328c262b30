"""`freesolo pipeline` end to end on a handful of images: every stage, the report, and resuming after a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import training.pipeline as pipeline
from benchmarks.freesolo_report import holdout_rows
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
    out = tmp_path / "run"

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

    # The results report's held-out rows, given the pipeline's own evaluation set, measure its models alike.
    rows = holdout_rows(out, None, synth_data, load_ground_truth(synth_data / "val.json"))
    assert [row["name"] for row in rows] == ["freemask", "weak", "selftrain1"]
    assert rows[1:] == report["stages"][1:]
    assert (out / "freemask" / "holdout.json").is_file() and all(0.0 <= rows[0][key] <= 1.0 for key in STAGE_KEYS)


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
