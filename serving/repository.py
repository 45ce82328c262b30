"""``freesolo serve prepare``: the templates of ``serving/model_repository`` -> a ready Triton model repository.

The served input is fixed-size: H x W come from the ONNX model's input shape. A dynamic model is served at
``--height/--width`` when given, else at the size its metadata records (the preset's test size), so clients never
need to know the size. K, the input-size policy and the class names come from the model's metadata.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template

from export.graph_contract import INPUT_NAME, MASK_STRIDE, SIZE_DIVISOR
from serving.contract import ENSEMBLE, MODEL, POSTPROCESS, PREPROCESS
from training.data.resize_modes import RESIZE_FILTERS, SIZE_ROUNDINGS
from training.errors import UserError

TEMPLATES = Path(__file__).parent / "model_repository"
FLAVOURS = {"python": "model_python", "onnxruntime": "model_onnxruntime", "tensorrt": "model_tensorrt"}
MODEL_FILES = {"python": "model.onnx", "onnxruntime": "model.onnx", "tensorrt": "model.plan"}
STEPS = (ENSEMBLE, PREPROCESS, MODEL, POSTPROCESS)
NO_ENV = "none"


@dataclass(frozen=True)
class ServedModel:
    """What the configs need to know about the exported model."""

    height: int
    width: int
    k: int
    test_size: int
    max_size: int
    class_names: list[str]
    category_ids: list[int]
    resize_filter: str = "antialias"  # InputConfig.resize_filter and resize_rounding; absent from older exports'
    resize_rounding: str = "half_even"  # metadata


@dataclass(frozen=True)
class Settings:
    """The knobs of ``serve prepare``."""

    backend: str = "python"
    max_batch: int = 8
    instances: int = 1
    io_instances: int = 1
    queue_delay_us: int = 0  # batch only what is queued; a delay costs batch-1 latency (benchmarks/serving_latency)
    threads: int = 0
    python_env: str = sys.prefix


def read_model(path: Path, height: int | None = None, width: int | None = None) -> ServedModel:
    """The served size, K, resize policy and class names of an exported ONNX model."""
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}")
    import onnx  # here, so that building the CLI parser does not import it

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise UserError(f"cannot read ONNX model {path}: {error}") from None
    props = {p.key: p.value for p in model.metadata_props}
    missing = [key for key in ("freesolo.input_size", "freesolo.max_per_img") if key not in props]
    inputs = {i.name: i for i in model.graph.input}
    if missing or INPUT_NAME not in inputs:
        raise UserError(f"{path} is not a `freesolo export onnx` model (no {missing or [INPUT_NAME]})")
    policy = json.loads(props["freesolo.input_size"])
    resize_filter = policy.get("resize_filter", "antialias")
    resize_rounding = policy.get("resize_rounding", "half_even")
    if resize_filter not in RESIZE_FILTERS or resize_rounding not in SIZE_ROUNDINGS:
        unknown = f"resize filter {resize_filter!r}, rounding {resize_rounding!r}"
        raise UserError(f"{path}: unknown {unknown} in its metadata (known: {RESIZE_FILTERS}, {SIZE_ROUNDINGS})")
    dims = [d.dim_value or None for d in inputs[INPUT_NAME].type.tensor_type.shape.dim]
    height, width = served_size(path, dims[2:], (height, width), (policy["height"], policy["width"]))
    class_names = json.loads(props.get("freesolo.class_names", "[]"))
    category_ids = [int(c) for c in json.loads(props.get("freesolo.category_ids", "[]"))]
    return ServedModel(
        height,
        width,
        int(props["freesolo.max_per_img"]),
        policy["test_size"],
        policy["max_size"],
        class_names,
        category_ids,
        resize_filter,
        resize_rounding,
    )


def served_size(
    path: Path, model_dims: list[int | None], asked: tuple[int | None, int | None], default: tuple[int, int]
) -> tuple[int, int]:
    """A fixed model's own H x W (``--height/--width`` must agree); for a dynamic one, the asked or default size."""
    if (asked[0] is None) != (asked[1] is None):
        raise UserError("give both --height and --width, or neither")
    if None not in model_dims:
        if asked[0] is not None and tuple(asked) != tuple(model_dims):
            raise UserError(f"{path} is fixed at {model_dims[0]}x{model_dims[1]}; --height/--width must match or go")
        return int(model_dims[0]), int(model_dims[1])  # type: ignore[arg-type]
    height, width = default if asked[0] is None else asked
    for name, value in (("height", height), ("width", width)):
        if value is None or value <= 0 or value % SIZE_DIVISOR:
            raise UserError(f"--{name} must be a positive multiple of {SIZE_DIVISOR}, got {value}")
    return int(height), int(width)  # type: ignore[arg-type]


def pbtxt_string(text: str) -> str:
    """Escape a string for a protobuf text-format string literal."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def fill(template: Path, values: dict[str, str], python_env: str) -> str:
    """A template config with every ``${NAME}`` replaced (KeyError on an unknown name: a template bug)."""
    lines = template.read_text().splitlines(keepends=True)
    if python_env == NO_ENV:
        lines = [line for line in lines if "EXECUTION_ENV_PATH" not in line]
    return Template("".join(lines)).substitute(values)


def template_values(model: ServedModel, settings: Settings) -> dict[str, str]:
    preferred = sorted({max(1, settings.max_batch // 2), settings.max_batch})
    return {
        "MAX_BATCH": str(settings.max_batch),
        "PREFERRED": ", ".join(str(p) for p in preferred),
        "QUEUE_DELAY_US": str(settings.queue_delay_us),
        "K": str(model.k),
        "HEIGHT": str(model.height),
        "WIDTH": str(model.width),
        "MASK_HEIGHT": str(model.height // MASK_STRIDE),
        "MASK_WIDTH": str(model.width // MASK_STRIDE),
        "MODEL_INSTANCES": str(settings.instances),
        "IO_INSTANCES": str(settings.io_instances),
        "THREADS": str(settings.threads),
        "ENV_PATH": pbtxt_string(settings.python_env),
        "TEST_SIZE": str(model.test_size),
        "MAX_SIZE": str(model.max_size),
        "RESIZE_FILTER": pbtxt_string(model.resize_filter),
        "RESIZE_ROUNDING": pbtxt_string(model.resize_rounding),
    }


def ensemble_parameters(model: ServedModel) -> str:
    """Class names and category ids as ensemble parameters, so a client can read them from the model config."""
    entries = {"class_names": json.dumps(model.class_names), "category_ids": json.dumps(model.category_ids)}
    return "".join(
        f'parameters: {{ key: "{key}" value: {{ string_value: "{pbtxt_string(value)}" }} }}\n'
        for key, value in entries.items()
    )


def check_settings(settings: Settings) -> None:
    if settings.backend not in FLAVOURS:
        raise UserError(f"--backend must be one of {', '.join(FLAVOURS)}, got {settings.backend}")
    for name, value, low in (
        ("--max-batch", settings.max_batch, 1),
        ("--instances", settings.instances, 1),
        ("--io-instances", settings.io_instances, 1),
        ("--queue-delay-us", settings.queue_delay_us, 0),
        ("--threads", settings.threads, 0),
    ):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    env = settings.python_env
    if env != NO_ENV and not (Path(env) / "bin" / "activate").is_file():
        raise UserError(f"--python-env {env} is not a virtual environment (no bin/activate); give one, or 'none'")


def clear_target(repo: Path, force: bool) -> None:
    """Refuse a non-empty folder unless --force, and then only one that holds a freesolo repository."""
    if repo.exists() and not repo.is_dir():
        raise UserError(f"--repo {repo} exists and is not a folder")
    if not repo.exists() or not any(repo.iterdir()):
        return
    if not force:
        raise UserError(f"--repo {repo} is not empty (add --force to replace the freesolo repository in it)")
    if not (repo / ENSEMBLE / "config.pbtxt").is_file():
        raise UserError(f"--repo {repo} is not empty and holds no freesolo repository; refusing to replace it")
    for step in STEPS:
        shutil.rmtree(repo / step, ignore_errors=True)


def copy_model_file(source: Path, target: Path) -> None:
    """Copy the model file and, for ONNX with external data, the data files it names."""
    shutil.copyfile(source, target)
    if source.suffix != ".onnx":
        return
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and not (target.parent / entry.value).exists():
                shutil.copyfile(source.parent / entry.value, target.parent / entry.value)


def prepare_repository(
    onnx_path: Path,
    repo: Path,
    settings: Settings,
    plan: Path | None = None,
    height: int | None = None,
    width: int | None = None,
    force: bool = False,
) -> ServedModel:
    """Write a model repository for ``settings.backend`` into ``repo``; returns what it serves."""
    check_settings(settings)
    if settings.backend == "tensorrt" and (plan is None or not plan.is_file()):
        raise UserError("--backend tensorrt needs --plan model.plan (from `freesolo export trt`)")
    if settings.backend != "tensorrt" and plan is not None:
        raise UserError("--plan is for --backend tensorrt only")
    model = read_model(onnx_path, height, width)
    if model.height % MASK_STRIDE or model.width % MASK_STRIDE:
        raise UserError(f"the served size {model.height}x{model.width} must be a multiple of {MASK_STRIDE}")
    clear_target(repo, force)
    values = template_values(model, settings)
    for step, template in (
        (ENSEMBLE, ENSEMBLE),
        (PREPROCESS, PREPROCESS),
        (POSTPROCESS, POSTPROCESS),
        (MODEL, FLAVOURS[settings.backend]),
    ):
        shutil.copytree(TEMPLATES / template, repo / step, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (repo / step / "1").mkdir(exist_ok=True)
        config = fill(TEMPLATES / template / "config.pbtxt", values, settings.python_env)
        if step == ENSEMBLE:
            config += ensemble_parameters(model)
        (repo / step / "config.pbtxt").write_text(config)
    source = plan if settings.backend == "tensorrt" else onnx_path
    copy_model_file(Path(str(source)), repo / MODEL / "1" / MODEL_FILES[settings.backend])
    return model
