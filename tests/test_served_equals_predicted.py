"""Served equals predicted: ``freesolo infer`` through a real tritonserver gives ``freesolo predict``'s detections,
for a ``--dynamic`` export (each image on its own canvas) and a fixed-size one (``predict --height/--width``), on a
square and two non-square photographs and synthetic scenes; and an image's detections from ``freesolo predict``
do not depend on the other images given with it (``training.geometry``: a batch holds one canvas only)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import skimage.data
from PIL import Image

from export.parity import Results, results_by_image, results_mismatches
from serving.launcher import ServerState
from serving.server_binary import pytriton_root
from training.cli import main

needs_server = pytest.mark.skipif(
    pytriton_root() is None and shutil.which("tritonserver") is None, reason="no tritonserver (nvidia-pytriton)"
)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, synth_data: Path) -> list[Path]:
    """A square photograph (512 x 512), two non-square ones (400 x 600, 300 x 451) and two synthetic scenes."""
    folder = tmp_path_factory.mktemp("images")
    files = []
    for name, picture in (("astronaut", skimage.data.astronaut()), ("coffee", skimage.data.coffee())):
        files.append(folder / f"{name}.png")
        Image.fromarray(picture).save(files[-1])
    files.append(folder / "chelsea.jpg")
    Image.fromarray(skimage.data.chelsea()).save(files[-1], quality=90)
    return [*files, *sorted((synth_data / "val").glob("*.png"))[:2]]


def predict(checkpoint: Path, files: list[Path], out: Path, *extra: str) -> list[Results]:
    """``freesolo predict`` results, grouped by image (image_id = index in ``files``)."""
    assert main(["predict", "--checkpoint", str(checkpoint), *map(str, files), "--out", str(out), *extra]) == 0
    return results_by_image(json.loads(out.read_text()), len(files))


def infer(url: str, files: list[Path], out: Path) -> list[Results]:
    assert main(["infer", "--url", url, *map(str, files), "--out", str(out)]) == 0
    return results_by_image(json.loads(out.read_text()), len(files))


def assert_equal_detections(predicted: list[Results], served: list[Results], files: list[Path]) -> None:
    assert sum(map(len, predicted)) >= len(files)  # the comparison is not of empty sets
    problems = [
        f"{file.name}: {p}"
        for file, a, b in zip(files, predicted, served, strict=True)
        for p in results_mismatches(a, b)
    ]
    assert problems == []


@needs_server
def test_a_dynamic_export_serves_what_predict_predicts(
    lively_checkpoint: Path,
    dynamic_onnx: Path,
    start_triton: Callable[..., ServerState],
    images: list[Path],
    tmp_path: Path,
) -> None:
    server = start_triton(dynamic_onnx)  # served dynamic: each image on its own canvas
    try:
        served = infer(server.grpc_url, images, tmp_path / "served.json")
    finally:
        main(["serve", "stop", "--repo", str(Path(server.log).parent)])
    predicted = predict(lively_checkpoint, images, tmp_path / "predicted.json", "--batch-size", "4")
    assert_equal_detections(predicted, served, images)


@needs_server
def test_a_fixed_export_serves_what_predict_predicts_on_its_canvas(
    lively_checkpoint: Path,
    start_triton: Callable[..., ServerState],
    images: list[Path],
    tmp_path: Path,
) -> None:
    onnx = tmp_path / "fixed.onnx"
    export = ["export", "onnx", "--checkpoint", str(lively_checkpoint), "--out", str(onnx), "--no-simplify"]
    assert main([*export, "--height", "128", "--width", "160"]) == 0
    server = start_triton(onnx)
    try:
        served = infer(server.grpc_url, images, tmp_path / "served.json")
    finally:
        main(["serve", "stop", "--repo", str(Path(server.log).parent)])
    canvas = ["--height", "128", "--width", "160"]
    predicted = predict(lively_checkpoint, images, tmp_path / "predicted.json", "--batch-size", "4", *canvas)
    assert_equal_detections(predicted, served, images)


def test_an_images_detections_do_not_depend_on_the_others(
    lively_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    together = predict(lively_checkpoint, images, tmp_path / "together.json", "--batch-size", "8")
    alone = [predict(lively_checkpoint, [file], tmp_path / f"alone{i}.json")[0] for i, file in enumerate(images)]
    assert_equal_detections(alone, together, images)  # the same up to float rounding of a batched convolution
