"""`freesolo export trt` and `freesolo parity --trt`.

TensorRT cannot be installed on the development machines, so what does not need it is tested everywhere: the
optimisation profile, the version rule for the MatrixNMS function, the ONNX copy the parser reads, and the errors.
The engine build and the TensorRT parity run are marked ``gpu``/``tensorrt`` and skip without TensorRT and CUDA.
The MatrixNMS plugin is used when ``FREESOLO_MATRIX_NMS_PLUGIN`` names a built library (as in
test_matrix_nms_plugin.py); without it the engine runs the node's function body.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import onnx
import pytest
import torch

from export.tensorrt_build import (
    Profile,
    input_dims,
    must_strip_function,
    optimisation_profile,
    parse_size,
    parse_version,
    without_matrix_nms_function,
)
from training.cli import main
from training.errors import UserError

DYNAMIC = [None, 3, None, None]
TINY_METADATA = {"freesolo.input_size": json.dumps({"size_divisor": 32, "test_size": 128, "max_size": 224})}


def test_profile_of_a_fixed_size_model_comes_from_the_model(fixed_onnx: Path) -> None:
    dims = input_dims(onnx.load(str(fixed_onnx), load_external_data=False))
    assert dims == [None, 3, 128, 128]
    assert optimisation_profile(dims, {}) == Profile((1, 3, 128, 128), (1, 3, 128, 128), (8, 3, 128, 128))
    assert optimisation_profile(dims, {}, batch=(2, 4, 16)).max == (16, 3, 128, 128)
    with pytest.raises(UserError, match="fixed input size 128x128"):
        optimisation_profile(dims, {}, sizes=(None, None, (256, 256)))
    assert optimisation_profile([2, 3, 128, 128], {}).opt == (2, 3, 128, 128)  # a fixed batch (not ours) is kept
    with pytest.raises(UserError, match="batch is fixed at 2"):
        optimisation_profile([2, 3, 128, 128], {}, batch=(1, None, None))


def test_profile_of_a_dynamic_model_defaults_to_its_metadata(dynamic_onnx: Path) -> None:
    model = onnx.load(str(dynamic_onnx), load_external_data=False)
    metadata = {p.key: p.value for p in model.metadata_props}
    profile = optimisation_profile(input_dims(model), metadata)
    # 32 x 32 up to the tiny preset's max size (224) rounded up to a multiple of 32, square for both orientations
    assert profile == Profile((1, 3, 32, 32), (1, 3, 128, 128), (8, 3, 224, 224))
    custom = optimisation_profile(DYNAMIC, TINY_METADATA, (1, 2, 4), (None, (128, 192), (256, 320)))
    assert custom == Profile((1, 3, 32, 32), (2, 3, 128, 192), (4, 3, 256, 320))
    assert custom.sizes_shapes() == ((1, 2), (2, 2), (4, 2))  # image_sizes of a pad_normalized model: same batches


@pytest.mark.parametrize(
    ("batch", "sizes", "message"),
    [
        ((4, 2, 8), (None, None, None), "min <= opt <= max"),
        ((0, None, None), (None, None, None), "min <= opt <= max"),
        ((None, None, None), (None, None, (100, 224)), "multiples of 32"),
        ((None, None, None), (None, (256, 256), (224, 224)), "min <= opt <= max on each side"),
    ],
)
def test_profile_errors(batch: tuple, sizes: tuple, message: str) -> None:
    with pytest.raises(UserError, match=message):
        optimisation_profile(DYNAMIC, TINY_METADATA, batch, sizes)


def test_the_parser_gets_the_function_body_only_where_it_prefers_the_plugin(dynamic_onnx: Path) -> None:
    assert parse_version("10.7.0.23") == (10, 7) and parse_version("8.6.1") == (8, 6) and parse_version("11") == (11, 0)
    assert must_strip_function((10, 3), plugin_loaded=True)
    assert not must_strip_function((10, 7), plugin_loaded=True)
    assert not must_strip_function((10, 3), plugin_loaded=False)  # no plugin: the body is all there is
    model = onnx.load(str(dynamic_onnx))
    stripped = without_matrix_nms_function(model)
    assert [f.name for f in stripped.functions] == [] and [f.name for f in model.functions] == ["MatrixNMS"]
    assert [n.domain for n in stripped.graph.node if n.op_type == "MatrixNMS"] == ["freesolo"]  # the node stays
    assert len(stripped.graph.node) == len(model.graph.node)


def test_sizes_parse_as_h_x_w() -> None:
    assert parse_size("800x1344") == (800, 1344) and parse_size("128X96") == (128, 96)
    for bad in ("800", "axb", "1x2x3"):
        with pytest.raises(ValueError, match="HxW"):
            parse_size(bad)


def test_without_tensorrt_the_build_is_a_clear_user_error(
    dynamic_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError, on any host
    out = tmp_path / "model.plan"
    assert main(["export", "trt", "--onnx", str(dynamic_onnx), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "TensorRT is needed" in error and "pip install tensorrt" in error and len(error.splitlines()) == 1
    assert not out.exists()


def test_parity_with_an_engine_but_without_tensorrt_is_a_clear_user_error(
    lively_checkpoint: Path,
    dynamic_onnx: Path,
    synth_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"an engine")
    image = sorted((synth_data / "val").iterdir())[0]
    args = ["--checkpoint", str(lively_checkpoint), "--onnx", str(dynamic_onnx), "--trt", str(plan), str(image)]
    assert main(["parity", *args]) == 2
    assert "TensorRT is needed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--onnx", "{missing}"], "ONNX model not found"),
        (["--onnx", "{onnx}", "--plugin-lib", "{missing}"], "plugin library not found"),
        (["--onnx", "{onnx}", "--max-batch", "0"], "min <= opt <= max"),
    ],
    ids=["missing-onnx", "missing-plugin", "bad-batch"],
)
def test_build_user_errors_come_before_tensorrt_is_needed(
    args: list[str], message: str, dynamic_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    paths = {"missing": tmp_path / "missing", "onnx": dynamic_onnx}
    filled = [a.format(**paths) for a in args]
    assert main(["export", "trt", *filled, "--out", str(tmp_path / "m.plan")]) == 2
    assert message in capsys.readouterr().err


def test_a_bad_size_is_a_usage_error(dynamic_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "trt", "--onnx", str(dynamic_onnx), "--out", str(tmp_path / "m.plan"), "--max-size", "big"])
    assert exit_info.value.code == 2 and "--max-size: a size is HxW" in capsys.readouterr().err


# --- On a GPU host with TensorRT --------------------------------------------------------------------------------------


def _plugin_args() -> list[str]:
    library = os.environ.get("FREESOLO_MATRIX_NMS_PLUGIN")
    return ["--plugin-lib", library] if library else []


@pytest.fixture(scope="module")
def engine(dynamic_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = tmp_path_factory.mktemp("trt") / "model.plan"
    profile = ["--max-batch", "4", "--opt-size", "128x128", "--max-size", "256x256"]
    assert main(["export", "trt", "--onnx", str(dynamic_onnx), "--out", str(out), *profile, *_plugin_args()]) == 0
    return out


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_matches_pytorch_in_the_parity_table(
    engine: Path, lively_checkpoint: Path, dynamic_onnx: Path, synth_data: Path, capsys: pytest.CaptureFixture
) -> None:
    images = [str(p) for p in sorted((synth_data / "val").iterdir())]
    args = ["--checkpoint", str(lively_checkpoint), "--onnx", str(dynamic_onnx), "--trt", str(engine), *images]
    code = main(["parity", *args, "--batch-size", "2", *_plugin_args()])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count(" tensorrt ") == len(images) and "parity: PASS" in out


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_fp16_engine_of_the_fixed_model_builds(fixed_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = tmp_path / "fixed_fp16.plan"
    assert main(["export", "trt", "--onnx", str(fixed_onnx), "--out", str(out), "--fp16", *_plugin_args()]) == 0
    log = capsys.readouterr().out
    assert out.stat().st_size > 0 and "fp16" in log and "1x3x128x128 / 1x3x128x128 / 8x3x128x128" in log
    if _plugin_args():
        assert "Matrix NMS as fused plugin" in log
