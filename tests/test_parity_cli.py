"""`freesolo parity`: PyTorch vs ONNX Runtime on real photographs of any size, raw heads and detections, with a
table and an exit code; it must fail when the model is not the checkpoint's, or it proves nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import skimage.data
from PIL import Image

from export.parity import Tolerance, compare_heads
from export.parity_cli import head_tensors
from training.checkpoint import load_checkpoint, save_checkpoint
from training.cli import main


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, synth_data: Path) -> list[Path]:
    """A 512 x 512 PNG, a 400 x 600 JPEG and a 128 x 128 synthetic scene."""
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(skimage.data.coffee()).save(folder / "coffee.jpg", quality=90)
    return [folder / "astronaut.png", folder / "coffee.jpg", sorted((synth_data / "val").iterdir())[0]]


def parity(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["parity", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows(out: str) -> dict[str, list[str]]:
    """Table rows by image name."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("image "))
    body = [line.split() for line in lines[start + 1 :] if line and not line.startswith((" ", "parity:"))]
    return {cells[0]: cells for cells in body}


def test_onnx_runtime_matches_pytorch_on_photographs_of_any_size(
    lively_checkpoint: Path, dynamic_onnx: Path, photos: list[Path], capsys: pytest.CaptureFixture
) -> None:
    args = ["--checkpoint", str(lively_checkpoint), "--onnx", str(dynamic_onnx), *map(str, photos)]
    code, out, _ = parity([*args, "--batch-size", "2"], capsys)
    assert code == 0, out
    table = rows(out)
    assert set(table) >= {"astronaut.png", "coffee.jpg", photos[2].name}
    for cells in table.values():
        assert cells[2] == "onnxruntime" and cells[-1] == "PASS"
        expected, got = (int(v) for v in cells[3].split("/"))
        assert expected > 0 and abs(expected - got) <= 1  # detections were compared, not two empty sets
        assert float(cells[7]) < 1e-3  # raw heads compared
    # each image on its own canvas (a batch holds one canvas only): the square photograph is not padded to the wide one
    assert table["astronaut.png"][1] == "128x128" and table["coffee.jpg"][1] == "128x192"
    assert out.strip().splitlines()[-1].startswith("parity: PASS, 3 image/runtime comparisons")


def test_fixed_size_model_gets_images_fitted_into_its_size(
    tiny_checkpoint: Path, fixed_onnx: Path, photos: list[Path], capsys: pytest.CaptureFixture
) -> None:
    code, out, _ = parity(["--checkpoint", str(tiny_checkpoint), "--onnx", str(fixed_onnx), str(photos[1])], capsys)
    assert code == 0, out
    cells = rows(out)["coffee.jpg"]
    assert cells[1] == "128x128" and cells[-1] == "PASS"
    assert "fixed 128 x 128" in out


@pytest.fixture(scope="module")
def perturbed_checkpoint(lively_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exported checkpoint with its mask features 2% stronger (the GroupNorm scale after the last conv): a small
    change the raw heads show even where the detections barely move."""
    payload = load_checkpoint(lively_checkpoint)
    payload["model"]["mask_branch.project.1.weight"] *= 1.02
    path = tmp_path_factory.mktemp("perturbed") / "model.pt"
    save_checkpoint(path, payload)
    return path


@pytest.mark.parametrize("which", ["perturbed", "untrained"])
def test_a_model_from_another_checkpoint_fails(
    which: str,
    perturbed_checkpoint: Path,
    tiny_checkpoint: Path,
    dynamic_onnx: Path,
    photos: list[Path],
    capsys: pytest.CaptureFixture,
) -> None:
    checkpoint = perturbed_checkpoint if which == "perturbed" else tiny_checkpoint
    code, out, _ = parity(["--checkpoint", str(checkpoint), "--onnx", str(dynamic_onnx), str(photos[0])], capsys)
    assert code == 1, out
    assert rows(out)["astronaut.png"][-1] == "FAIL"
    assert out.strip().splitlines()[-1].startswith("parity: FAIL, 1 of 1")
    assert "heads outside tolerance" in out
    if which == "untrained":  # the untrained model detects nothing, the exported one a few dozen objects
        assert "num_dets 0 vs" in out


def test_heads_are_found_by_the_exporter_scopes_or_not_at_all(
    lively_checkpoint: Path, dynamic_onnx: Path, photos: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = onnx.load(str(dynamic_onnx))
    tensors = head_tensors(model, levels=5)
    assert list(tensors) == [
        *(f"cate_logits.{i}" for i in range(5)),
        *(f"kernels.{i}" for i in range(5)),
        "mask_features",
    ]
    assert head_tensors(model, levels=4) == {}  # a count that does not fit the checkpoint finds nothing
    for node in model.graph.node:
        del node.metadata_props[:]
    assert head_tensors(model, levels=5) == {}
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    code, out, _ = parity(["--checkpoint", str(lively_checkpoint), "--onnx", str(bare), str(photos[2])], capsys)
    assert code == 0, out
    assert "raw heads are not compared" in out and rows(out)[photos[2].name][7] == "n/a"


def test_head_comparison_uses_absolute_and_relative_tolerance() -> None:
    reference = {"x": np.array([[100.0, 1.0]]), "y": np.zeros((1, 2))}
    close = {"x": np.array([[100.05, 1.0005]]), "y": np.zeros((1, 2))}
    assert compare_heads(reference, close, 0, Tolerance()).ok  # 0.05 <= 1e-3 + 1e-3 * 100
    far = {"x": np.array([[100.0, 1.01]]), "y": np.array([[0.0, np.nan]])}
    problems = compare_heads(reference, far, 0, Tolerance()).problems
    assert problems == [
        "head y has NaN or inf",
        "heads outside tolerance: 1 of 2 tensors (worst x, max |diff| 1.00e-02)",
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("onnx", "ONNX model not found"),
        ("checkpoint", "checkpoint not found"),
        ("image", "image not found"),
        ("trt", "TensorRT engine not found"),
        ("corrupt", "cannot read ONNX model"),
        ("batch", "--batch-size must be at least 1"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    change: str,
    message: str,
    lively_checkpoint: Path,
    dynamic_onnx: Path,
    photos: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a model")
    paths = {"checkpoint": lively_checkpoint, "onnx": dynamic_onnx, "image": photos[2]}
    extra: list[str] = []
    if change in paths:
        paths[change] = tmp_path / f"missing-{change}"
    elif change == "corrupt":
        paths["onnx"] = corrupt
    elif change == "trt":
        extra = ["--trt", str(tmp_path / "missing.plan")]
    else:
        extra = ["--batch-size", "0"]
    args = ["--checkpoint", str(paths["checkpoint"]), "--onnx", str(paths["onnx"]), str(paths["image"]), *extra]
    code, _, err = parity(args, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
