"""`freesolo serve prepare`: every flavour's configs parse against Triton's model-config schema, the ensemble is
wired to its steps' real inputs and outputs, sizes come from the model, and user mistakes get clear errors.

The ONNX files here are stand-ins built by hand (prepare reads only the input shape and the metadata), so these
tests need neither torch nor a server."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2

from serving.contract import CONFIG_TYPES, ENSEMBLE, INPUT, OUTPUTS
from serving.repository import Settings, prepare_repository
from training.cli import main
from training.errors import UserError

CLASSES = ["ellipse", 'star "quoted"']


def stand_in_onnx(path: Path, height: int | str = 128, width: int | str = 96, metadata: bool = True) -> Path:
    """An ONNX file with the contract's input and a freesolo metadata block (K = 7)."""
    images = helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 3, height, width])
    out = helper.make_tensor_value_info("num_dets", TensorProto.UINT8, ["batch", 3, height, width])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["num_dets"])], "g", [images], [out])
    model = helper.make_model(graph)
    if metadata:
        size = {"height": 160, "width": 224, "dynamic": isinstance(height, str), "test_size": 128, "max_size": 224}
        props = {
            "freesolo.input_size": json.dumps(size),
            "freesolo.max_per_img": "7",
            "freesolo.class_names": json.dumps(CLASSES),
            "freesolo.category_ids": json.dumps([1, 2]),
        }
        helper.set_model_props(model, props)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    return stand_in_onnx(tmp_path / "fixed.onnx")


def parse_configs(repo: Path) -> dict[str, model_config_pb2.ModelConfig]:
    configs = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        configs[path.parent.name] = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return configs


def tensors(entries: list) -> dict[str, tuple[int, list[int]]]:
    return {t.name: (t.data_type, list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)) for t in entries}


@pytest.mark.parametrize("backend", ["python", "onnxruntime", "tensorrt"])
def test_each_flavour_parses_and_the_ensemble_is_wired(stand_in: Path, tmp_path: Path, backend: str) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine")
    settings = Settings(backend=backend, max_batch=4, instances=2, io_instances=3)
    repo = tmp_path / "repo"
    prepare_repository(stand_in, repo, settings, plan if backend == "tensorrt" else None)
    configs = parse_configs(repo)
    assert set(configs) == {"freesolo", "preprocess", "model", "postprocess"}
    model = configs["model"]
    platform = {"python": "", "onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}[backend]
    assert model.platform == platform and model.max_batch_size == 4 and model.instance_group[0].count == 2
    assert configs["preprocess"].instance_group[0].count == 3
    assert all(c.max_batch_size == 4 for c in configs.values())
    assert list(model.dynamic_batching.preferred_batch_size) == [2, 4]
    assert not configs["preprocess"].HasField("dynamic_batching")  # a malformed request must not fail its batch
    assert tensors(model.input)["images"] == (model_config_pb2.TYPE_UINT8, [3, 128, 96])
    assert tensors(model.output)["masks"] == (model_config_pb2.TYPE_UINT8, [7, 32, 24])
    model_file = {"python": "model.onnx", "onnxruntime": "model.onnx", "tensorrt": "model.plan"}[backend]
    assert (repo / "model" / "1" / model_file).is_file() and (repo / "freesolo" / "1").is_dir()

    ensemble = configs[ENSEMBLE]
    assert tensors(ensemble.input) == {INPUT: (model_config_pb2.TYPE_STRING, [1])}
    wanted = {s.name: (model_config_pb2.DataType.Value(CONFIG_TYPES[s.dtype]), [7 if d == "K" else d for d in s.dims])
              for s in OUTPUTS}  # fmt: skip
    assert tensors(ensemble.output) == wanted
    produced = tensors(ensemble.input)  # ensemble tensor name -> (dtype, dims), filled step by step
    for step in ensemble.ensemble_scheduling.step:
        inputs, outputs = tensors(configs[step.model_name].input), tensors(configs[step.model_name].output)
        for key, value in step.input_map.items():
            assert produced[value][0] == inputs[key][0], f"{step.model_name}.{key}"
        for key, value in step.output_map.items():
            produced[value] = outputs[key]
    assert {name: produced[name] for name in wanted} == wanted
    parameters = {key: value.string_value for key, value in ensemble.parameters.items()}
    assert json.loads(parameters["class_names"]) == CLASSES


def test_every_template_is_used_and_python_env_can_be_omitted(stand_in: Path, tmp_path: Path) -> None:
    templates = Path(__file__).parents[1] / "serving" / "model_repository"
    assert {p.parent.name for p in templates.glob("*/config.pbtxt")} == {
        "freesolo", "preprocess", "postprocess", "model_python", "model_onnxruntime", "model_tensorrt",
    }  # fmt: skip
    prepare_repository(stand_in, tmp_path / "repo", Settings(python_env="none"))
    configs = parse_configs(tmp_path / "repo")
    assert "EXECUTION_ENV_PATH" not in configs["preprocess"].parameters
    assert configs["preprocess"].parameters["test_size"].string_value == "128"


def test_dynamic_models_are_served_dynamic_or_at_the_asked_size(tmp_path: Path) -> None:
    dynamic = stand_in_onnx(tmp_path / "dynamic.onnx", "height", "width")
    served = prepare_repository(dynamic, tmp_path / "a", Settings())
    assert served.dynamic and served.k == 7 and served.max_side == 224  # max_size 224 is a multiple of 32
    configs = parse_configs(tmp_path / "a")
    assert tensors(configs["preprocess"].output)["images"][1] == [3, -1, -1]  # each image on its own canvas
    assert tensors(configs["model"].input)["images"][1] == [3, -1, -1]
    assert tensors(configs["postprocess"].input)["raw_masks"][1] == [7, -1, -1]
    assert configs["model"].parameters["max_side"].string_value == "224"
    assert configs[ENSEMBLE].parameters["dynamic_input"].string_value == "true"
    served = prepare_repository(dynamic, tmp_path / "b", Settings(), height=64, width=320)
    assert (served.height, served.width) == (64, 320)
    with pytest.raises(UserError, match="multiple of 32"):
        prepare_repository(dynamic, tmp_path / "c", Settings(), height=100, width=96)


def test_user_mistakes_get_clear_errors(stand_in: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cases = [
        (lambda: prepare_repository(tmp_path / "missing.onnx", repo, Settings()), "ONNX model not found"),
        (lambda: prepare_repository(stand_in_onnx(tmp_path / "plain.onnx", metadata=False), repo, Settings()),
         "not a `freesolo export onnx` model"),
        (lambda: prepare_repository(stand_in, repo, Settings(), height=64, width=64), "fixed at 128x96"),
        (lambda: prepare_repository(stand_in, repo, Settings(backend="tensorrt")), "needs --plan"),
        (lambda: prepare_repository(stand_in, repo, Settings(max_batch=0)), "--max-batch must be at least 1"),
        (lambda: prepare_repository(stand_in, repo, Settings(python_env=str(tmp_path))), "no bin/activate"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(UserError, match=message):
            call()
    prepare_repository(stand_in, repo, Settings())
    with pytest.raises(UserError, match="not empty"):
        prepare_repository(stand_in, repo, Settings())
    prepare_repository(stand_in, repo, Settings(backend="onnxruntime"), force=True)
    assert parse_configs(repo)["model"].platform == "onnxruntime_onnx"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no freesolo repository"):
        prepare_repository(stand_in, other, Settings(), force=True)


def test_cli_prepare(stand_in: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    args = ["serve", "prepare", "--onnx", str(stand_in), "--repo", str(repo), "--max-batch", "2"]
    assert main(args) == 0
    assert "128x96 input, K=7, max batch 2" in capsys.readouterr().out
    assert main(args) == 2
    assert "is not empty" in capsys.readouterr().err
