"""`freesolo export onnx --precision int8 | bf16` and `--preset`: a quantised graph that still follows the contract,
keeps post-processing and Matrix NMS in float, runs in a plain ONNX Runtime session and finds what fp32 finds.

The checkpoint is conftest's sharpened random tiny one (its docstring says why): confident, image-dependent
detections, so agreement between precisions is measurable. Quantisation error is real, so int8 is
held to "the same objects" (masks matched at IoU >= 0.5) rather than to fp32 parity's tolerances.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import skimage.data
import torch

from export.graph_contract import OUTPUT_NAMES
from export.onnx_inputs import OnnxModel, calibration_images
from export.parity import greedy_match, mask_iou
from export.quantize import QDQ_OPS, check_float_post_processing
from training.cli import main
from training.geometry import InputPolicy, prepare_image
from training.inference import Predictor
from triton_plugins.matrix_nms import onnx_function

POLICY = InputPolicy(128, 128, dynamic=False, test_size=128, max_size=224)


def export(args: list[str]) -> None:
    assert main(["export", "onnx", *args]) == 0


@pytest.fixture(scope="module")
def int8_onnx(lively_checkpoint: Path, synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "int8.onnx"
    calibration = ["--calib-images", str(synth_data / "train"), "--calib-count", "6"]
    export(["--checkpoint", str(lively_checkpoint), "--out", str(out), "--precision", "int8", *calibration])
    return out


@pytest.fixture(scope="module")
def preset_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32, random weights of the tiny preset: the same architecture as the int8 model's."""
    out = tmp_path_factory.mktemp("preset") / "tiny.onnx"
    export(["--preset", "tiny", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def images(pictures: list[np.ndarray]) -> np.ndarray:
    """Synthetic val scenes (the calibration set's distribution) and photographs (not), as 128 x 128 inputs."""
    return np.stack([prepare_image(p, POLICY)[0] for p in pictures])


def op_counts(model: onnx.ModelProto, skip: tuple[str, ...] = ()) -> Counter:
    return Counter(f"{n.domain}::{n.op_type}" for n in model.graph.node if n.op_type not in skip)


def test_int8_graph_quantises_convolutions_only_and_keeps_one_float_matrix_nms(
    int8_onnx: Path, preset_onnx: Path
) -> None:
    model = onnx.load(str(int8_onnx))
    onnx.checker.check_model(model, full_check=True)
    assert [n.domain for n in model.graph.node if n.op_type == "MatrixNMS"] == ["freesolo"]
    assert [f.SerializeToString() for f in model.functions] == [onnx_function.function_proto().SerializeToString()]
    assert {p.key: p.value for p in model.metadata_props}["freesolo.precision"] == "int8"
    counts = op_counts(model)
    assert counts["::QuantizeLinear"] > 0 and counts["::DequantizeLinear"] > counts["::Conv"]
    # the same nodes as an fp32 graph of the same architecture, plus Q/DQ pairs only
    assert op_counts(model, QDQ_OPS) == op_counts(onnx.load(str(preset_onnx)))
    # every quantised tensor is a convolution's input or output (a residual Add or a Resize may share it), so
    # the post-processing after the heads stays float
    producer = {out: n.op_type for n in model.graph.node for out in n.output}
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    dequantizers = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for node in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        assert producer.get(node.input[0]) == "Conv" or "Conv" in consumers[dequantizers[node.output[0]]], node.name
    weights = {t.name for t in model.graph.initializer}
    dequantized_weights = [n.output[0] for n in model.graph.node if n.op_type in QDQ_OPS and n.input[0] in weights]
    assert dequantized_weights and all(consumers[t] == {"Conv"} for t in dequantized_weights)


def matched_fraction(
    reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], min_score: float, shift: int = 0
) -> float:
    """Fraction of the detections scoring at least ``min_score`` (on either side) that have a partner of the same
    label at mask IoU >= 0.5 on the other side (of any score), image by image; ``shift`` pairs image i of the
    reference with image i + shift of the candidate (a negative control)."""
    matched = total = 0
    batch = len(reference["num_dets"])
    for i in range(batch):
        j = (i + shift) % batch
        na, nb = int(reference["num_dets"][i]), int(candidate["num_dets"][j])
        iou = mask_iou(reference["masks"][i, :na] > 0, candidate["masks"][j, :nb] > 0)
        same = reference["labels"][i, :na, None] == candidate["labels"][j, None, :nb]
        pairs = [(a, b) for a, b in greedy_match(iou, same) if iou[a, b] >= 0.5]
        confident_a = reference["scores"][i, :na] >= min_score
        confident_b = candidate["scores"][j, :nb] >= min_score
        matched += sum(int(confident_a[a]) + int(confident_b[b]) for a, b in pairs)
        total += int(confident_a.sum() + confident_b.sum())
    return matched / max(total, 1)


def test_int8_runs_in_a_plain_session_and_finds_what_fp32_finds(
    int8_onnx: Path, lively_checkpoint: Path, images: np.ndarray
) -> None:
    """fp32 is PyTorch here (test_onnx_export.py holds the fp32 graph to PyTorch within tight tolerances). Matrix
    NMS leaves decayed detections below the score threshold (down to update_thr): those come and go with small
    score changes, so agreement is asked of the detections above it."""
    predictor = Predictor.from_checkpoint(lively_checkpoint)
    dets, _ = predictor.detections(torch.from_numpy(images))
    reference = {name: getattr(dets, name).numpy() for name in OUTPUT_NAMES}
    got = OnnxModel(int8_onnx).run(images)  # a plain CPU session, no custom-op library
    assert reference["num_dets"].min() > 0
    score_thr = predictor.config.inference.score_thr
    agreement = matched_fraction(reference, got, score_thr)
    assert agreement >= 0.8, f"only {agreement:.0%} of the detections above the score threshold agree"  # 92% here
    assert matched_fraction(reference, got, score_thr, shift=1) < 0.3  # the criterion tells other images apart


def test_calibration_images_follow_the_input_policy(synth_data: Path) -> None:
    inputs = calibration_images(synth_data / "train", 3, POLICY)
    assert len(inputs) == 3 and all(
        x["images"].shape == (1, 3, 128, 128) and x["images"].dtype == np.uint8 for x in inputs
    )
    assert all(x["image_sizes"].tolist() == [[128, 128]] and x["image_sizes"].dtype == np.int32 for x in inputs)
    assert len(calibration_images(synth_data / "train", 100, POLICY)) == 8  # at most the folder's images
    tensor, geometry = prepare_image(skimage.data.astronaut(), InputPolicy(64, 96, False, 128, 224))  # 512 x 512
    assert tuple(tensor.shape) == (3, 64, 96) and (geometry.resized_height, geometry.resized_width) == (64, 64)
    tensor, _ = prepare_image(np.zeros((100, 170, 3), np.uint8), InputPolicy(128, 128, True, 128, 224))
    assert tuple(tensor.shape) == (3, 128, 224)  # resized to 128 x 218, padded to multiples of 32


def test_quantisation_check_rejects_changes_to_post_processing() -> None:
    original = onnx_function.standalone_model()
    check_float_post_processing(original, original)
    other_body = onnx.ModelProto()
    other_body.CopyFrom(original)
    other_body.functions[0].node.pop()
    with pytest.raises(RuntimeError, match="function body"):
        check_float_post_processing(original, other_body)
    extra = onnx.ModelProto()
    extra.CopyFrom(original)
    extra.graph.node.append(onnx.helper.make_node("Relu", ["decayed_scores"], ["relu"]))
    with pytest.raises(RuntimeError, match="changed nodes"):
        check_float_post_processing(original, extra)


def test_preset_export_is_a_random_tiny_model(preset_onnx: Path) -> None:
    props = {p.key: p.value for p in onnx.load(str(preset_onnx), load_external_data=False).metadata_props}
    assert props["freesolo.preset"] == "tiny" and props["freesolo.precision"] == "fp32"
    assert "random weights" in props["freesolo.checkpoint"]
    outputs = OnnxModel(preset_onnx).run(np.zeros((1, 3, 128, 128), np.uint8))
    assert outputs["masks"].shape == (1, 100, 32, 32)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint", "{ckpt}", "--precision", "int8"], "--precision int8 needs --calib-images DIR"),
        (["--checkpoint", "{ckpt}", "--precision", "int8", "--calib-images", "{empty}"], "--calib-images: no images"),
        (["--checkpoint", "{ckpt}", "--precision", "int8", "--calib-images", "{missing}"], "folder not found"),
        (["--checkpoint", "{ckpt}", "--calib-images", "{empty}"], "for --precision int8 only"),
        (["--checkpoint", "{ckpt}", "--precision", "bf16"], "no bfloat16 kernels for Conv"),
        (["--preset", "r33"], "unknown preset 'r33' (available: r101, r50, tiny)"),
    ],
    ids=["int8-no-calibration", "empty-calibration", "missing-calibration", "calibration-not-int8", "bf16", "preset"],
)
def test_precision_and_preset_errors_are_one_line_and_exit_2(
    args: list[str], message: str, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "empty").mkdir()
    paths = {"ckpt": tiny_checkpoint, "empty": tmp_path / "empty", "missing": tmp_path / "nope"}
    filled = [a.format(**paths) for a in args]
    assert main(["export", "onnx", *filled, "--out", str(tmp_path / "m.onnx")]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_checkpoint_and_preset_are_exclusive(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage and exit 2
        main(["export", "onnx", "--checkpoint", str(tiny_checkpoint), "--preset", "tiny", "--out", str(tmp_path / "m")])
    assert exit_info.value.code == 2
