"""`freesolo export onnx`: one checked graph of the graph contract, Matrix NMS inside as one node with a function
body, running in a plain ONNX Runtime session with the same detections as PyTorch.

The checkpoint under test is the random tiny one, sharpened (``lively_checkpoint`` in conftest.py says how); the
exported models (``dynamic_onnx``, ``fixed_onnx``) are session fixtures there too, shared with the parity tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import skimage.data
import torch

from export.graph_contract import INPUT_NAME, METADATA_KEYS, OUTPUT_NAMES
from export.onnx_export import choose_input_size, default_input_size
from export.onnx_inputs import OnnxModel
from export.parity import Tolerance, compare_outputs, summary
from training.cli import main
from training.config import load_preset
from training.data.batching import pad_to
from training.data.images import read_rgb
from training.data.transforms import resize_image, to_tensor_image
from training.errors import UserError
from training.geometry import MASK_STRIDE, fit_within, resized_shape, round_up
from training.inference import Predictor

SIZES = [(128, 128), (160, 192)]


def plain_session(path: Path) -> ort.InferenceSession:
    """No custom-op library, no extensions: what any ONNX Runtime user has."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def session(dynamic_onnx: Path) -> ort.InferenceSession:
    return plain_session(dynamic_onnx)


@pytest.fixture(scope="module")
def predictor(lively_checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(lively_checkpoint)


def prepare(image: np.ndarray, height: int, width: int) -> torch.Tensor:
    """The project's test resize (shorter side to test_size, longer at most max_size), fitted into H x W, padded."""
    config = load_preset("tiny").input
    size = fit_within(*resized_shape(*image.shape[:2], config.test_size, config.max_size), height, width)
    return pad_to(resize_image(to_tensor_image(image), size), (height, width))


@pytest.fixture(scope="module")
def pictures(synth_data: Path) -> list[np.ndarray]:
    """Four synthetic val scenes and two real photographs."""
    synthetic = [read_rgb(p) for p in sorted((synth_data / "val").iterdir())]
    return [*synthetic, skimage.data.astronaut(), skimage.data.coffee()]


def run_onnx(session: ort.InferenceSession, images: torch.Tensor) -> dict[str, np.ndarray]:
    return dict(zip(OUTPUT_NAMES, session.run(None, {INPUT_NAME: images.numpy()}), strict=True))


def run_torch(predictor: Predictor, images: torch.Tensor) -> dict[str, np.ndarray]:
    dets, _ = predictor.detections(images)
    return {name: getattr(dets, name).numpy() for name in OUTPUT_NAMES}


def test_file_passes_the_full_checker_with_one_matrix_nms_node_and_its_function(dynamic_onnx: Path) -> None:
    model = onnx.load(str(dynamic_onnx))
    onnx.checker.check_model(model, full_check=True)
    nms = [n for n in model.graph.node if n.op_type == "MatrixNMS"]
    assert len(nms) == 1 and nms[0].domain == "freesolo"
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in nms[0].attribute}
    assert attributes == {"kernel": b"gaussian", "sigma": pytest.approx(2.0)}
    assert [(f.domain, f.name) for f in model.functions] == [("freesolo", "MatrixNMS")]
    assert {(o.domain, o.version) for o in model.opset_import} >= {("freesolo", 1)}


def test_inputs_outputs_and_metadata_follow_the_contract(dynamic_onnx: Path, fixed_onnx: Path) -> None:
    def signature(path: Path) -> dict[str, tuple[int, list]]:
        model = onnx.load(str(path), load_external_data=False)
        return {
            v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in [*model.graph.input, *model.graph.output]
        }

    uint8, int32, float32 = onnx.TensorProto.UINT8, onnx.TensorProto.INT32, onnx.TensorProto.FLOAT
    assert signature(fixed_onnx) == {
        "images": (uint8, ["batch", 3, 128, 128]),
        "num_dets": (int32, ["batch"]),
        "scores": (float32, ["batch", 100]),
        "labels": (int32, ["batch", 100]),
        "boxes": (float32, ["batch", 100, 4]),
        "masks": (uint8, ["batch", 100, 32, 32]),
    }
    dynamic = signature(dynamic_onnx)
    assert dynamic["images"] == (uint8, ["batch", 3, "height", "width"])
    assert dynamic["masks"][1][:2] == ["batch", 100]

    metadata = {p.key: p.value for p in onnx.load(str(dynamic_onnx)).metadata_props}
    assert set(METADATA_KEYS) <= metadata.keys()
    assert metadata["freesolo.preset"] == "tiny"
    assert metadata["freesolo.max_per_img"] == "100"
    assert json.loads(metadata["freesolo.inference"])["score_thr"] == 0.3
    assert json.loads(metadata["freesolo.input_size"])["dynamic"] is True
    assert json.loads(metadata["freesolo.class_names"])[:2] == ["ellipse", "rectangle"]
    assert json.loads(metadata["freesolo.category_ids"]) == [1, 2, 3, 4, 5, 6]
    assert metadata["freesolo.checkpoint"] == "model.pt" and metadata["freesolo.run_id"]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_onnx_runtime_matches_pytorch_at_batch_1_and_3(
    size: tuple[int, int], session: ort.InferenceSession, predictor: Predictor, pictures: list[np.ndarray]
) -> None:
    images = torch.stack([prepare(p, *size) for p in pictures])
    expected = run_torch(predictor, images)
    assert expected["num_dets"].min() > 0 and expected["num_dets"].max() < 100  # something to compare, below K
    singles = [run_onnx(session, images[i : i + 1]) for i in range(len(images))]
    single = {name: np.concatenate([s[name] for s in singles]) for name in OUTPUT_NAMES}
    batched = [run_onnx(session, images[i : i + 3]) for i in range(0, len(images), 3)]
    triple = {name: np.concatenate([b[name] for b in batched]) for name in OUTPUT_NAMES}
    for got in (single, triple):
        results = compare_outputs(expected, got)
        assert all(r.ok for r in results), summary(results)
    # a batch gives each image what it gets alone
    exact = Tolerance(num_dets=0, unmatched=0, mask_iou=1.0, score=1e-5, box=0.0)
    results = compare_outputs(single, triple, exact)
    assert all(r.ok for r in results), summary(results)


@pytest.mark.parametrize("size", [(256, 128), (128, 256)], ids=["tall", "wide"])
def test_dynamic_graph_is_right_beyond_the_example_size(
    size: tuple[int, int], session: ort.InferenceSession, predictor: Predictor, pictures: list[np.ndarray]
) -> None:
    """The graph is traced at 128 x 128: a value frozen at that size would show on objects far from the origin."""
    images = torch.zeros(2, 3, *size, dtype=torch.uint8)
    images[0, :, -128:, -128:] = prepare(pictures[-2], 128, 128)
    images[1, :, -128:, -128:] = prepare(pictures[-1], 128, 128)
    expected = run_torch(predictor, images)
    assert expected["boxes"][..., 2:].max() > 128  # objects beyond the traced size
    results = compare_outputs(expected, run_onnx(session, images))
    assert all(r.ok for r in results), summary(results)


@pytest.mark.parametrize("size", [(97, 211), (300, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_any_input_size_is_padded_inside_pytorch_and_the_graph_alike(
    size: tuple[int, int], session: ort.InferenceSession, predictor: Predictor, pictures: list[np.ndarray]
) -> None:
    """H and W need not be multiples of 32: the model pads bottom/right with zeros itself, exactly as a caller
    would, and masks come back at the padded size / 4 (the graph contract)."""
    images = torch.stack([resize_image(to_tensor_image(p), size) for p in pictures[-2:]])
    expected = run_torch(predictor, images)
    got = run_onnx(session, images)
    assert expected["num_dets"].min() > 0  # something to compare
    results = compare_outputs(expected, got)
    assert all(r.ok for r in results), summary(results)
    masks = (2, 100, round_up(size[0]) // MASK_STRIDE, round_up(size[1]) // MASK_STRIDE)
    assert expected["masks"].shape == got["masks"].shape == masks
    padded = pad_to(images, (round_up(size[0]), round_up(size[1])))
    exact = Tolerance(num_dets=0, unmatched=0, mask_iou=1.0, score=0.0, box=0.0)
    for runtime, outputs in ((lambda x: run_torch(predictor, x), expected), (lambda x: run_onnx(session, x), got)):
        results = compare_outputs(runtime(padded), outputs, exact)
        assert all(r.ok for r in results), summary(results)


@pytest.mark.parametrize("fixture", ["fixed_onnx", "dynamic_onnx"])
def test_an_input_the_graph_cannot_take_is_one_clear_error(fixture: str, request: pytest.FixtureRequest) -> None:
    model = OnnxModel(request.getfixturevalue(fixture))
    wrong, message = (
        (np.zeros((1, 3, 97, 211), np.uint8), r"exported at a fixed 128 x 128: .* got uint8 \[1, 3, 97, 211\]")
        if fixture == "fixed_onnx"
        else (np.zeros((1, 3, 97, 211), np.float32), r"takes uint8 images \[B, 3, H, W\], got float32")
    )
    with pytest.raises(UserError, match=message) as error:
        model.run(wrong)
    assert len(str(error.value).splitlines()) == 1


def test_black_images_give_no_detections(fixed_onnx: Path) -> None:
    outputs = run_onnx(plain_session(fixed_onnx), torch.zeros(2, 3, 128, 128, dtype=torch.uint8))
    assert outputs["num_dets"].tolist() == [0, 0]
    assert all(not outputs[name].any() for name in OUTPUT_NAMES)


def test_fixed_size_model_without_simplification_matches_pytorch(
    fixed_onnx: Path, tiny_checkpoint: Path, pictures: list[np.ndarray]
) -> None:
    images = torch.stack([prepare(p, 128, 128) for p in pictures[-2:]])
    got = run_onnx(plain_session(fixed_onnx), images)
    results = compare_outputs(run_torch(Predictor.from_checkpoint(tiny_checkpoint), images), got)
    assert all(r.ok for r in results), summary(results)
    assert sum(1 for n in onnx.load(str(fixed_onnx)).graph.node if n.op_type == "MatrixNMS") == 1


def test_parity_catches_differences() -> None:
    masks = np.zeros((1, 3, 8, 8), np.uint8)
    masks[0, 0, :4, :4] = masks[0, 1, 4:, 4:] = 1
    reference = {
        "num_dets": np.array([2], np.int32),
        "scores": np.array([[0.9, 0.5, 0.0]], np.float32),
        "labels": np.array([[0, 1, 0]], np.int32),
        "boxes": np.array([[[0, 0, 16, 16], [16, 16, 32, 32], [0, 0, 0, 0]]], np.float32),
        "masks": masks,
    }
    swapped = {k: v.copy() for k, v in reference.items()}
    for key in ("scores", "labels", "boxes", "masks"):
        swapped[key][0, [0, 1]] = reference[key][0, [1, 0]]
    assert all(r.ok for r in compare_outputs(reference, swapped))  # order does not matter

    def problems(change: str, tolerance: Tolerance | None = None) -> list[str]:
        other = {k: v.copy() for k, v in reference.items()}
        if change == "score":
            other["scores"][0, 1] += 0.01
        elif change == "mask":
            other["masks"][0, 1, 4:6, 4:] = 0
        elif change == "label":
            other["labels"][0, 1] = 2
        else:
            other["num_dets"][0] = 1
        return compare_outputs(reference, other, tolerance)[0].problems

    assert "score difference" in " ".join(problems("score"))
    assert "mask IoU" in " ".join(problems("mask"))
    assert problems("label") == []  # one unmatched detection on each side is within tolerance ...
    assert "unmatched" in " ".join(problems("label", Tolerance(unmatched=0)))
    assert problems("count") == []  # ... and so is num_dets off by one
    assert "num_dets" in " ".join(problems("count", Tolerance(num_dets=0)))


def test_input_size_policy() -> None:
    config = load_preset("tiny")
    assert default_input_size(config) == (128, 128)
    assert default_input_size(load_preset("r50")) == (800, 800)
    assert choose_input_size(config, 160, 192, dynamic=False).width == 192
    with pytest.raises(UserError, match="multiple of 32"):
        choose_input_size(config, 100, 128, dynamic=False)
    assert fit_within(128, 192, 128, 128) == (85, 128)
    assert fit_within(128, 128, 160, 192) == (128, 128)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint", "{missing}"], "checkpoint not found"),
        (["--checkpoint", "{text}"], "cannot read checkpoint"),
        (["--checkpoint", "{ckpt}", "--height", "100", "--width", "128"], "multiple of 32"),
        (["--checkpoint", "{ckpt}", "--height", "128"], "both --height and --width"),
        (["--checkpoint", "{ckpt}", "--precision", "int8"], "needs --calib-images"),
    ],
    ids=["missing", "unreadable", "not-multiple-of-32", "height-only", "precision"],
)
def test_cli_errors_are_one_line_and_exit_2(
    args: list[str], message: str, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    paths = {"missing": tmp_path / "nope.pt", "text": text, "ckpt": tiny_checkpoint}
    filled = [a.format(**paths) for a in args]
    assert main(["export", "onnx", *filled, "--out", str(tmp_path / "m.onnx")]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


STALE_TEMPORARY = ".model.onnx.k3x9q2.tmp"  # the name a killed export's atomic write leaves beside model.onnx


@pytest.fixture(scope="module")
def export_after_a_kill(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A real ``freesolo export onnx`` process (its whole stdout and stderr captured) into a folder where an earlier
    export of the same file was killed mid-write: (the folder, the finished process)."""
    folder = tmp_path_factory.mktemp("rerun")
    (folder / STALE_TEMPORARY).write_bytes(b"half an onnx file")
    (folder / ".other.onnx.k3x9q2.tmp").write_bytes(b"another file's temporary")
    command = [sys.executable, "-m", "training.cli", "export", "onnx", "--preset", "tiny", "--no-simplify"]
    done = subprocess.run(
        [*command, "--out", str(folder / "model.onnx")], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return folder, done


def test_export_removes_what_a_killed_export_of_the_same_file_left(
    export_after_a_kill: tuple[Path, subprocess.CompletedProcess],
) -> None:
    folder, _ = export_after_a_kill
    assert sorted(p.name for p in folder.iterdir()) == [".other.onnx.k3x9q2.tmp", "model.onnx"]
    onnx.checker.check_model(str(folder / "model.onnx"))


def test_export_prints_no_signature_warning(export_after_a_kill: tuple[Path, subprocess.CompletedProcess]) -> None:
    """The exporter warned "Failed to infer the signature for function translate" on every export until the
    MatrixNMS translation's parameters were annotated with ONNX tensor types."""
    _, done = export_after_a_kill
    output = done.stdout + done.stderr
    assert "Failed to infer the signature" not in output
    assert "wrote" in done.stdout
