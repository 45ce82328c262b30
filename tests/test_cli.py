"""The `freesolo` command line: help texts, one-line errors for bad input, and train -> eval -> predict."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from training.cli import main

SUBCOMMANDS = [
    ["data"],
    ["data", "synth"],
    ["train"],
    ["eval"],
    ["predict"],
    ["pretrain"],
    ["freemask"],
    ["selftrain"],
    ["pipeline"],
    ["export-backbone"],
    ["export"],
    ["export", "onnx"],
    ["export", "trt"],
    ["parity"],
    ["infer"],
]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("data", "train", "eval", "predict"):
        assert name in out


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_subcommand_help_describes_arguments(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: freesolo" in out and "-h, --help" in out
    options = [line for line in out.splitlines() if line.strip().startswith("--")]
    assert all(len(line.strip().split(maxsplit=2)) >= 2 for line in options), "every option has a description"


def write_corrupt_png(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    return path


def copy_dataset_with_corrupt_image(synth_data: Path, tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(synth_data, target)
    first = json.loads((target / "val.json").read_text())["images"][0]["file_name"]
    write_corrupt_png(target / "val" / first)
    return target / "val" / first


ONE_STEP = ["--preset", "tiny", "--iters", "1"]  # where a refusal is missing, the run ends soon instead of hanging
BROKEN_ANNOTATIONS = {  # name -> (list, key of its last entry, bad value)
    "polygon of one point": ("annotations", "segmentation", [[1, 2]]),
    "RLE size of one number": ("annotations", "segmentation", {"size": [5], "counts": "PPYo1"}),
    "negative width": ("images", "width", -5),
    "height not a number": ("images", "height", "x"),
}


def bad_input_cases(synth_data: Path, checkpoint: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, text the error line must contain)."""
    val, val_json = str(synth_data / "val"), str(synth_data / "val.json")
    bad_schema = tmp / "bad_schema.json"
    bad_schema.write_text(json.dumps({"images": "nope", "annotations": [], "categories": []}))
    empty = tmp / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    not_json = tmp / "not_json.json"
    not_json.write_text("{ this is not json")
    corrupt_ckpt = tmp / "corrupt.pt"
    corrupt_ckpt.write_bytes(b"garbage" * 100)
    corrupt_image = write_corrupt_png(tmp / "corrupt.png")
    broken = {name: tmp / f"{name}.json" for name in BROKEN_ANNOTATIONS}
    for name, (where, key, value) in BROKEN_ANNOTATIONS.items():
        data = json.loads((synth_data / "val.json").read_text())
        data[where][-1][key] = value  # the last entry: the whole file is checked before training starts
        broken[name].write_text(json.dumps(data))
    existing_run = tmp / "existing_run"
    existing_run.mkdir()
    (existing_run / "model.pt").write_bytes(b"")
    return {
        "missing checkpoint": (
            ["eval", "--checkpoint", str(tmp / "nope.pt"), "--images", val, "--ann", val_json],
            "nope.pt",
        ),
        "corrupt checkpoint": (
            ["predict", "--checkpoint", str(corrupt_ckpt), str(corrupt_image), "--out", str(tmp / "p.json")],
            "corrupt.pt",
        ),
        "missing image": (
            ["predict", "--checkpoint", str(checkpoint), str(tmp / "missing.png"), "--out", str(tmp / "p.json")],
            "missing.png",
        ),
        "corrupt image": (
            ["predict", "--checkpoint", str(checkpoint), str(corrupt_image), "--out", str(tmp / "p.json")],
            "corrupt.png",
        ),
        "bad schema": (
            ["eval", "--checkpoint", str(checkpoint), "--images", val, "--ann", str(bad_schema)],
            "bad_schema.json",
        ),
        "not json": (["train", "--images", val, "--ann", str(not_json), "--out", str(tmp / "r1")], "not_json.json"),
        "empty dataset": (["train", "--images", val, "--ann", str(empty), "--out", str(tmp / "r2")], "empty.json"),
        "missing annotation": (
            ["train", "--images", val, "--ann", str(tmp / "absent.json"), "--out", str(tmp / "r3")],
            "absent.json",
        ),
        "missing image folder": (
            ["train", "--images", str(tmp / "no_dir"), "--ann", val_json, "--out", str(tmp / "r4")],
            "no_dir",
        ),
        "existing run": (["train", "--images", val, "--ann", val_json, "--out", str(existing_run)], "existing_run"),
        "nothing to resume": (
            ["train", "--images", val, "--ann", val_json, "--out", str(tmp / "mistyped_run"), "--resume", *ONE_STEP],
            "mistyped_run",
        ),
        **{
            name: (["train", "--images", val, "--ann", str(path), "--out", str(tmp / "r5"), *ONE_STEP], path.name)
            for name, path in broken.items()
        },
        "empty image folder": (
            ["predict", "--checkpoint", str(checkpoint), str(tmp / "existing_run"), "--out", str(tmp / "p.json")],
            "existing_run",
        ),
    }


CASE_NAMES = [
    "missing checkpoint",
    "corrupt checkpoint",
    "missing image",
    "corrupt image",
    "bad schema",
    "not json",
    "empty dataset",
    "missing annotation",
    "missing image folder",
    "existing run",
    "nothing to resume",
    *BROKEN_ANNOTATIONS,
    "empty image folder",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_is_one_clear_error_line(
    case: str, synth_data: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, must_name = bad_input_cases(synth_data, tiny_checkpoint, tmp_path)[case]
    code, _, err = run_cli([*argv, "--no-progress"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1, err
    assert lines[0].startswith(f"freesolo {argv[0]}: error: ") and must_name in lines[0]
    assert "Traceback" not in err


def test_corrupt_image_inside_a_dataset_names_the_file(
    synth_data: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = copy_dataset_with_corrupt_image(synth_data, tmp_path)
    code, _, err = run_cli(
        [
            "eval",
            "--checkpoint",
            str(tiny_checkpoint),
            "--images",
            str(corrupt.parent),
            "--ann",
            str(corrupt.parent.parent / "val.json"),
            "--no-progress",
        ],
        capsys,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(corrupt) in err


def test_corrupt_image_read_by_a_worker_process_is_still_one_line(
    synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "data"
    shutil.copytree(synth_data, target)
    for image in (target / "train").iterdir():
        write_corrupt_png(image)
    code, _, err = run_cli(
        [
            "train",
            "--images",
            str(target / "train"),
            "--ann",
            str(target / "train.json"),
            "--out",
            str(tmp_path / "run"),
            "--iters",
            "2",
            "--batch-size",
            "2",
            "--workers",
            "1",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot read image" in err and str(target / "train") in err and "Traceback" not in err


def test_console_script_reports_errors_without_traceback(tmp_path: Path) -> None:
    """The installed entry point (a real process) prints one line and exits 2."""
    freesolo = shutil.which("freesolo", path=str(Path(sys.executable).parent))
    assert freesolo, "the freesolo console script is installed in the environment"
    done = subprocess.run(
        [
            freesolo,
            "eval",
            "--checkpoint",
            str(tmp_path / "x.pt"),
            "--images",
            str(tmp_path),
            "--ann",
            str(tmp_path / "a.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"freesolo eval: error: checkpoint not found: {tmp_path / 'x.pt'}"]


def test_train_eval_predict_end_to_end(synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    code, out, _ = run_cli(
        [
            "train",
            "--images",
            str(synth_data / "train"),
            "--ann",
            str(synth_data / "train.json"),
            "--out",
            str(run),
            "--iters",
            "3",
            "--batch-size",
            "2",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0 and "model.pt" in out
    for name in ("config.yaml", "checkpoint.pt", "model.pt", "log.jsonl", "loss_curve.png"):
        assert (run / name).is_file(), name
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["iter"] == 3 and all(k in log[-1] for k in ("loss", "loss_mask", "loss_cate", "lr"))
    assert Image.open(run / "loss_curve.png").size[0] > 100

    metrics_file = tmp_path / "metrics.json"
    code, out, _ = run_cli(
        [
            "eval",
            "--checkpoint",
            str(run / "model.pt"),
            "--images",
            str(synth_data / "val"),
            "--ann",
            str(synth_data / "val.json"),
            "--class-agnostic",
            "--json",
            str(metrics_file),
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0 and "| mask |" in out
    metrics = json.loads(metrics_file.read_text())
    for iou_type in ("segm", "bbox"):
        for key in ("AP", "AP50", "AP75", "AR100"):
            assert 0.0 <= metrics[iou_type][key] <= 1.0

    preds, vis = tmp_path / "preds.json", tmp_path / "vis"
    images = sorted((synth_data / "val").iterdir())[:2]
    code, out, _ = run_cli(
        [
            "predict",
            "--checkpoint",
            str(run / "model.pt"),
            *map(str, images),
            "--out",
            str(preds),
            "--vis",
            str(vis),
            "--vis-thr",
            "0",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0
    results = json.loads(preds.read_text())
    for result in results:
        assert mask_utils.decode(result["segmentation"]).shape == (128, 128)
        assert result["file_name"] in {str(p) for p in images} and len(result["bbox"]) == 4
    pictures = sorted(vis.glob("*.png"))
    assert len(pictures) == 2 and Image.open(pictures[0]).size[0] >= 128
