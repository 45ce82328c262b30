"""`freesolo serve prepare`: every flavour's configs parse against Triton's model-config schema, the ensemble is
wired to its steps' real inputs and outputs, sizes come from the model, and user mistakes get clear errors. What a
model file states is data: metadata cannot add config syntax, and external data cannot point outside the model's
folder.

The ONNX files here are stand-ins built by hand (prepare reads only the input shape and the metadata), so these
tests need neither torch nor a server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import model_config_pb2

from export.onnx_inputs import OnnxModel
from serving.contract import CONFIG_TYPES, ENSEMBLE, INPUT, OUTPUTS
from serving.repository import Settings, prepare_repository
from serving.step_guard import KEY_FILE
from training.cli import main
from training.errors import UserError

CLASSES = ["ellipse", 'star "quoted"']


def stand_in_onnx(
    path: Path,
    height: int | str = 128,
    width: int | str = 96,
    metadata: bool = True,
    overrides: dict[str, str] | None = None,
    external: str | None = None,
    sizes: bool = False,
) -> Path:
    """An ONNX file with the contract's input (and the ``image_sizes`` input when ``sizes``) and a freesolo metadata
    block (K = 7), metadata ``overrides``, and an initializer stored at the external-data ``location`` given as
    ``external``."""
    inputs = [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 3, height, width])]
    if sizes:
        inputs.append(helper.make_tensor_value_info("image_sizes", TensorProto.INT32, ["batch", 2]))
    out = helper.make_tensor_value_info("num_dets", TensorProto.UINT8, ["batch", 3, height, width])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["num_dets"])], "g", inputs, [out])
    if external is not None:
        weights = numpy_helper.from_array(np.arange(4, dtype=np.float32), "weights")
        weights.ClearField("raw_data")
        weights.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external), ("offset", "0"), ("length", "16")):
            weights.external_data.add(key=key, value=value)
        graph.initializer.append(weights)
    model = helper.make_model(graph)
    if metadata:
        size = {"height": 160, "width": 224, "dynamic": isinstance(height, str), "test_size": 128, "max_size": 224}
        props = {
            "freesolo.input_size": json.dumps(size),
            "freesolo.max_per_img": "7",
            "freesolo.class_names": json.dumps(CLASSES),
            "freesolo.category_ids": json.dumps([1, 2]),
        }
        helper.set_model_props(model, props | (overrides or {}))
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


UPSTREAM = {"freesolo.masks": "probability", "freesolo.padding": "normalized"}  # an imported model's variant


@pytest.mark.parametrize("upstream", [False, True], ids=["binary", "upstream"])
@pytest.mark.parametrize("backend", ["python", "onnxruntime", "tensorrt"])
def test_each_flavour_parses_and_the_ensemble_is_wired(tmp_path: Path, backend: str, upstream: bool) -> None:
    """Every flavour, for a model of the default variant and for one that pads and resizes masks as upstream does:
    image sizes go from preprocess to the model step, probability masks from the model to postprocess."""
    stand_in = stand_in_onnx(tmp_path / "fixed.onnx", overrides=UPSTREAM if upstream else None, sizes=upstream)
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
    sizes = {"image_sizes": (model_config_pb2.TYPE_INT32, [2])} if upstream else {}
    assert tensors(model.input) == {"images": (model_config_pb2.TYPE_UINT8, [3, 128, 96]), **sizes}
    mask_type = model_config_pb2.TYPE_FP32 if upstream else model_config_pb2.TYPE_UINT8
    assert tensors(model.output)["masks"] == (mask_type, [7, 32, 24])
    assert tensors(configs["postprocess"].input)["raw_masks"] == (mask_type, [7, 32, 24])
    model_file = {"python": "model.onnx", "onnxruntime": "model.onnx", "tensorrt": "model.plan"}[backend]
    assert (repo / "model" / "1" / model_file).is_file() and (repo / "freesolo" / "1").is_dir()

    ensemble = configs[ENSEMBLE]
    assert tensors(ensemble.input) == {INPUT: (model_config_pb2.TYPE_STRING, [1])}
    wanted = {s.name: (model_config_pb2.DataType.Value(CONFIG_TYPES[s.dtype]), [7 if d == "K" else d for d in s.dims])
              for s in OUTPUTS}  # fmt: skip
    assert tensors(ensemble.output) == wanted
    produced = tensors(ensemble.input)  # ensemble tensor name -> (dtype, dims), filled step by step
    read = set()
    for step in ensemble.ensemble_scheduling.step:
        inputs, outputs = tensors(configs[step.model_name].input), tensors(configs[step.model_name].output)
        assert set(step.input_map) == set(inputs), step.model_name  # every input of every step is fed
        for key, value in step.input_map.items():
            assert produced[value][0] == inputs[key][0], f"{step.model_name}.{key}"
            read.add(value)
        for key, value in step.output_map.items():
            produced[value] = outputs[key]
    assert {name: produced[name] for name in wanted} == wanted
    assert set(produced) - set(wanted) == read  # Triton refuses an ensemble tensor nobody reads
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


INJECTION = '128" } } parameters { key: "EXECUTION_ENV_PATH" value { string_value: "/attacker/env" } } # '
POLICY = {"height": 160, "width": 224, "test_size": 128, "max_size": 224}
# The parameters each step's config may hold: all written by `serve prepare` itself, none named by the model file.
STEP_PARAMETERS = {
    "freesolo": {"class_names", "category_ids", "dynamic_input"},
    "preprocess": {"EXECUTION_ENV_PATH", "test_size", "max_size", "resize_filter", "resize_rounding"},
    "postprocess": {"EXECUTION_ENV_PATH", "test_size", "max_size", "resize_filter", "resize_rounding", "max_side"},
    "model": {"EXECUTION_ENV_PATH", "intra_op_thread_count", "max_side"},
}


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("freesolo.input_size", json.dumps(POLICY | {"test_size": INJECTION}), "test_size must be an integer"),
        ("freesolo.input_size", json.dumps(POLICY | {"max_size": INJECTION}), "max_size must be an integer"),
        ("freesolo.input_size", json.dumps(POLICY | {"height": 10**9}), "height must be an integer from 1 to"),
        ("freesolo.input_size", json.dumps(POLICY | {"test_size": True}), "test_size must be an integer"),
        ("freesolo.input_size", INJECTION, "freesolo.input_size is not a JSON dict"),
        ("freesolo.input_size", "[128, 128]", "freesolo.input_size is not a JSON dict"),
        ("freesolo.max_per_img", "7 ] }\n" + INJECTION, "max_per_img must be an integer"),
        ("freesolo.max_per_img", "100000", "max_per_img must be an integer from 1 to"),
        ("freesolo.category_ids", json.dumps([1, INJECTION]), "category id must be an integer"),
        ("freesolo.class_names", json.dumps(["ok", "tab\there"]), "printable characters"),
        ("freesolo.class_names", json.dumps({"0": "a"}), "freesolo.class_names is not a JSON list"),
        ("freesolo.masks", "soft", "metadata freesolo.masks is 'soft', not one of binary, probability; refusing"),
        ("freesolo.padding", INJECTION, "metadata freesolo.padding is .*, not one of input, normalized; refusing"),
        ("freesolo.padding", "normalized", r"inputs \['images'\] are not the \['images', 'image_sizes'\] it declares"),
    ],
)
def test_metadata_that_is_not_plain_data_is_refused(tmp_path: Path, key: str, value: str, message: str) -> None:
    model = stand_in_onnx(tmp_path / "crafted.onnx", "height", "width", overrides={key: value})
    repo = tmp_path / "repo"
    with pytest.raises(UserError, match=message) as error:
        prepare_repository(model, repo, Settings())
    assert "\n" not in str(error.value)  # one line
    assert not repo.exists()  # refused before anything was written


def test_a_bad_masks_value_is_refused_by_every_reader(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``freesolo.masks`` names a dtype every consumer follows: `serve prepare` and the ONNX Runtime wrapper (what
    parity, evaluation and benchmarks run) refuse a value outside the contract's set with one clear line."""
    model = stand_in_onnx(tmp_path / "crafted.onnx", overrides={"freesolo.masks": "float16"})
    message = "metadata freesolo.masks is 'float16', not one of binary, probability; refusing this model"
    assert main(["serve", "prepare", "--onnx", str(model), "--repo", str(tmp_path / "repo")]) == 2
    assert capsys.readouterr().err == f"freesolo serve: error: {model}: {message}\n"
    with pytest.raises(UserError, match=message):
        OnnxModel(model)


def test_strings_from_the_model_reach_the_configs_as_data(tmp_path: Path) -> None:
    names = [INJECTION, 'a "quoted" \\ name', "défini 🐈"]
    model = stand_in_onnx(tmp_path / "crafted.onnx", overrides={"freesolo.class_names": json.dumps(names)})
    prepare_repository(model, tmp_path / "repo", Settings())
    configs = parse_configs(tmp_path / "repo")
    for step, config in configs.items():
        assert set(config.parameters) <= STEP_PARAMETERS[step], step
        assert all("/attacker/env" not in v.string_value for k, v in config.parameters.items() if k != "class_names")
    assert configs["preprocess"].parameters["EXECUTION_ENV_PATH"].string_value != "/attacker/env"
    assert json.loads(configs["freesolo"].parameters["class_names"].string_value) == names
    assert (tmp_path / "repo" / KEY_FILE).stat().st_mode & 0o077 == 0  # the step key: the owner's only


def test_external_data_must_stay_in_the_models_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(bytes(16))
    models = tmp_path / "models"
    (models / "data").mkdir(parents=True)
    (models / "link.bin").symlink_to(outside)
    (models / "data" / "weights.bin").write_bytes(bytes(16))
    for location in ("../outside.bin", str(outside), "link.bin", "data/../../outside.bin"):
        model = stand_in_onnx(models / "crafted.onnx", external=location)
        repo = tmp_path / "repo"
        with pytest.raises(UserError, match="leaves the model's folder") as error:
            prepare_repository(model, repo, Settings())
        assert "\n" not in str(error.value) and not repo.exists(), location
        assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "outside.bin"]  # nothing written beside

    model = stand_in_onnx(models / "inside.onnx", external="data/weights.bin")
    prepare_repository(model, tmp_path / "repo", Settings())
    assert (tmp_path / "repo" / "model" / "1" / "data" / "weights.bin").read_bytes() == bytes(16)
    with pytest.raises(UserError, match=r"external data file 'missing\.bin' is missing"):
        prepare_repository(stand_in_onnx(models / "m.onnx", external="missing.bin"), tmp_path / "r2", Settings())


@pytest.mark.parametrize("folder", ["with space", "naïve", "semi;colon", "$(touch x)"])
def test_repository_paths_the_python_backend_cannot_start_from_are_refused(
    stand_in: Path, tmp_path: Path, folder: str
) -> None:
    repo = tmp_path / folder / "repo"
    with pytest.raises(UserError, match="python backend cannot start models from a path") as error:
        prepare_repository(stand_in, repo, Settings())
    assert "\n" not in str(error.value) and not repo.exists()
    assert os.listdir(tmp_path) == ["fixed.onnx"]
