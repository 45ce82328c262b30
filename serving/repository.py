"""``freesolo serve prepare``: the templates of ``serving/model_repository`` -> a ready Triton model repository.

A fixed-size model is served at its own H x W. A dynamic model is served dynamic (dims -1: each image on its own
canvas, as ``freesolo predict`` sees it), or at ``--height/--width`` when given. K, the input-size policy and the
class names come from the model's metadata.

Everything read from the model file is data: each value is type- and range-checked (``read_model``; the model's
variant, ``export.graph_contract.variant``, is one of a closed set), the templates take only integers and the fixed
fragments of this module that the variant selects (``TEMPLATE_FRAGMENTS``), and every string (class names, paths)
reaches config.pbtxt as a typed protobuf field printed by ``text_format``, so no metadata can add config syntax (a
parameter, a second model).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from export.graph_contract import DEFAULT_VARIANT, INPUT_NAME, SIZES_NAME, Variant, variant
from serving.contract import CONFIG_TYPES, ENSEMBLE, MAX_IMAGE_SIDE, MODEL, POSTPROCESS, PREPROCESS
from serving.server_binary import check_backend_path
from serving.step_guard import TAG_BYTES, write_key
from training.errors import UserError
from training.fileio import atomic_write
from training.geometry import MASK_STRIDE, RESIZE_FILTERS, SIZE_DIVISOR, SIZE_ROUNDINGS, round_up

TEMPLATES = Path(__file__).parent / "model_repository"
FLAVOURS = {"python": "model_python", "onnxruntime": "model_onnxruntime", "tensorrt": "model_tensorrt"}
MODEL_FILES = {"python": "model.onnx", "onnxruntime": "model.onnx", "tensorrt": "model.plan"}
STEPS = (ENSEMBLE, PREPROCESS, MODEL, POSTPROCESS)
PYTHON_BACKEND = (PREPROCESS, POSTPROCESS, FLAVOURS["python"])  # templates run by the python backend
NO_ENV = "none"

# Bounds on what a model file may state (the presets: K = 100, sides <= 1333).
MAX_DETECTIONS = 1000  # K, max_per_img
MAX_SERVED_SIDE = 4096  # the served H and W
MAX_CLASSES = 10_000
MAX_NAME_CHARS = 200
MAX_CATEGORY_ID = 2**31 - 1
DIGITS = re.compile(r"[0-9]{1,9}")
# The only text a template takes besides integers, chosen by the model's variant (never text from the model file):
# the masks' Triton type (Variant.mask_dtype -> config type), and, for a model that takes image sizes, these
# fragments (empty otherwise: Triton refuses an ensemble tensor nobody reads).
MASK_CONFIG_TYPES = {"uint8": CONFIG_TYPES["UINT8"], "float32": CONFIG_TYPES["FP32"]}
SIZES_FRAGMENTS = {
    "SIZES_INPUT": f',\n  {{ name: "{SIZES_NAME}" data_type: {CONFIG_TYPES["INT32"]} dims: [ 2 ] }}',  # model step
    "SIZES_FROM_PREPROCESS": f'\n      output_map {{ key: "{SIZES_NAME}" value: "{SIZES_NAME}" }}',  # ensemble
    "SIZES_TO_MODEL": f'\n      input_map {{ key: "{SIZES_NAME}" value: "{SIZES_NAME}" }}',  # ensemble
}


@dataclass(frozen=True)
class ServedModel:
    """What the configs need to know about the exported model."""

    height: int  # -1 when dynamic
    width: int
    k: int
    test_size: int
    max_size: int
    class_names: list[str]
    category_ids: list[int]
    resize_filter: str = "antialias"  # InputConfig.resize_filter and resize_rounding; absent from older exports'
    resize_rounding: str = "half_even"  # metadata
    variant: Variant = DEFAULT_VARIANT  # probability masks, image sizes as a second input (export.graph_contract)

    @property
    def dynamic(self) -> bool:
        return self.height == -1

    @property
    def max_side(self) -> int:
        """The largest input side the model step accepts: a dynamic model's canvas holds the test resize's longer
        side (at most ``max_size``), padded to a multiple of 32."""
        return max(self.height, self.width) if not self.dynamic else round_up(self.max_size)


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


def bounded_int(value: Any, what: str, low: int, high: int) -> int:
    """``value`` if it is an int (not a bool) from ``low`` to ``high``, else UserError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{what} must be an integer from {low} to {high}, got {str(value)[:80]!r}")
    return value


def metadata_json(path: Path, props: dict[str, str], key: str, kind: type, default: str | None = None) -> Any:
    """Metadata ``key`` parsed as JSON of type ``kind``; UserError when it is missing, malformed or another type."""
    text = props.get(key, default)
    try:
        value = json.loads(text) if text is not None else None
    except ValueError:
        value = None
    if not isinstance(value, kind):
        raise UserError(f"{path}: metadata {key} is not a JSON {kind.__name__}; refusing to serve this model")
    return value


def class_names(path: Path, props: dict[str, str]) -> tuple[list[str], list[int]]:
    """The class names and category ids of the metadata: bounded lists of printable names and ints."""
    names = metadata_json(path, props, "freesolo.class_names", list, "[]")
    ids = metadata_json(path, props, "freesolo.category_ids", list, "[]")
    if len(names) > MAX_CLASSES or len(ids) > MAX_CLASSES:
        raise UserError(f"{path}: metadata lists more than {MAX_CLASSES} classes")
    for name in names:
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
            raise UserError(
                f"{path}: metadata class name {str(name)[:80]!r} is not 1 to {MAX_NAME_CHARS} printable characters"
            )
    return names, [bounded_int(c, f"{path}: metadata category id", 0, MAX_CATEGORY_ID) for c in ids]


def read_model(path: Path, height: int | None = None, width: int | None = None) -> ServedModel:
    """The served size, K, resize policy and class names of an exported ONNX model, every value checked."""
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
    policy = metadata_json(path, props, "freesolo.input_size", dict)
    sizes = {
        key: bounded_int(policy.get(key), f"{path}: metadata freesolo.input_size {key}", 1, MAX_IMAGE_SIDE)
        for key in ("height", "width", "test_size", "max_size")
    }
    k_text = props["freesolo.max_per_img"]
    k = bounded_int(int(k_text) if DIGITS.fullmatch(k_text) else k_text, f"{path}: metadata freesolo.max_per_img",
                    1, MAX_DETECTIONS)  # fmt: skip
    declared = variant(props, str(path))
    if list(inputs) != list(declared.inputs):
        raise UserError(f"{path}: the graph's inputs {list(inputs)} are not the {list(declared.inputs)} it declares")
    dims = [d.dim_value or None for d in inputs[INPUT_NAME].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise UserError(f"{path}: input {INPUT_NAME} has rank {len(dims)}, expected [batch, 3, height, width]")
    height, width = served_size(path, dims[2:], (height, width))
    names, category_ids = class_names(path, props)
    resize_filter = policy.get("resize_filter", "antialias")  # absent from older exports' metadata
    resize_rounding = policy.get("resize_rounding", "half_even")
    if resize_filter not in RESIZE_FILTERS or resize_rounding not in SIZE_ROUNDINGS:
        unknown = f"resize filter {resize_filter!r}, rounding {resize_rounding!r}"
        raise UserError(f"{path}: unknown {unknown} in its metadata (known: {RESIZE_FILTERS}, {SIZE_ROUNDINGS})")
    served = ServedModel(
        height,
        width,
        k,
        sizes["test_size"],
        sizes["max_size"],
        names,
        category_ids,
        resize_filter,
        resize_rounding,
        declared,
    )
    if served.max_side > MAX_SERVED_SIDE:
        raise UserError(f"{path}: max_size {served.max_size} is too large to serve dynamic; give --height/--width")
    return served


def served_size(path: Path, model_dims: list[int | None], asked: tuple[int | None, int | None]) -> tuple[int, int]:
    """A fixed model's own H x W (``--height/--width`` must agree); for a dynamic one, the asked size, or -1 x -1
    (served dynamic) when none is asked."""
    if (asked[0] is None) != (asked[1] is None):
        raise UserError("give both --height and --width, or neither")
    if None not in model_dims:
        if asked[0] is not None and tuple(asked) != tuple(model_dims):
            raise UserError(f"{path} is fixed at {model_dims[0]}x{model_dims[1]}; --height/--width must match or go")
        for name, value in (("height", model_dims[0]), ("width", model_dims[1])):
            bounded_int(value, f"{path}: the input's {name}", 1, MAX_SERVED_SIDE)
        return int(model_dims[0]), int(model_dims[1])  # type: ignore[arg-type]
    if asked[0] is None:
        return -1, -1
    height, width = asked
    for name, value in (("height", height), ("width", width)):
        if value is None or not 0 < value <= MAX_SERVED_SIDE or value % SIZE_DIVISOR:
            raise UserError(f"--{name} must be a multiple of {SIZE_DIVISOR} from 1 to {MAX_SERVED_SIDE}, got {value}")
    return int(height), int(width)  # type: ignore[arg-type]


def template_values(model: ServedModel, settings: Settings) -> dict[str, int | list[int] | str]:
    """The templates' ``${NAME}`` placeholders: integers, and the fragments of this module the model's variant
    selects, so a template fills with numbers and this module's own text, nothing else."""
    takes_sizes = SIZES_NAME in model.variant.inputs
    return {
        "MAX_BATCH": settings.max_batch,
        "PREFERRED": sorted({max(1, settings.max_batch // 2), settings.max_batch}),
        "QUEUE_DELAY_US": settings.queue_delay_us,
        "K": model.k,
        "HEIGHT": model.height,
        "WIDTH": model.width,
        "MASK_HEIGHT": model.height // MASK_STRIDE if not model.dynamic else -1,
        "MASK_WIDTH": model.width // MASK_STRIDE if not model.dynamic else -1,
        "MODEL_INSTANCES": settings.instances,
        "IO_INSTANCES": settings.io_instances,
        "TAG_BYTES": TAG_BYTES,
        "MASK_TYPE": MASK_CONFIG_TYPES[model.variant.mask_dtype],
        **{name: text if takes_sizes else "" for name, text in SIZES_FRAGMENTS.items()},
    }


def step_parameters(template: str, model: ServedModel, settings: Settings) -> dict[str, str]:
    """The string parameters of one template's config; config_text sets them as typed protobuf fields."""
    parameters: dict[str, str] = {}
    if template in PYTHON_BACKEND and settings.python_env != NO_ENV:
        parameters["EXECUTION_ENV_PATH"] = settings.python_env
    if template in (FLAVOURS["python"], FLAVOURS["onnxruntime"]):
        parameters["intra_op_thread_count"] = str(settings.threads)  # ONNX Runtime threads; 0: one per core
    if template in (PREPROCESS, POSTPROCESS):
        parameters |= {"test_size": str(model.test_size), "max_size": str(model.max_size)}
        parameters |= {"resize_filter": model.resize_filter, "resize_rounding": model.resize_rounding}
    if template in (FLAVOURS["python"], POSTPROCESS):  # the largest side a dynamic model's input may have
        parameters["max_side"] = str(model.max_side)
    if template == ENSEMBLE:  # a client reads the class names, category ids and input kind from the ensemble's config
        parameters |= {
            "class_names": json.dumps(model.class_names),
            "category_ids": json.dumps(model.category_ids),
            "dynamic_input": json.dumps(model.dynamic),
        }
    return parameters


def config_text(template: Path, values: dict[str, int | list[int] | str], parameters: dict[str, str]) -> str:
    """A template config with its integer placeholders filled and ``parameters`` appended as printed by protobuf's
    text_format (which escapes every string); parsed back to check it holds exactly these parameters."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    numbers = {key: ", ".join(map(str, v)) if isinstance(v, list) else str(v) for key, v in values.items()}
    text = Template(template.read_text()).substitute(numbers)  # KeyError on an unknown name: a template bug
    extra = model_config_pb2.ModelConfig()
    for key, value in parameters.items():
        extra.parameters[key].string_value = value
    text += text_format.MessageToString(extra)
    parsed = text_format.Parse(text, model_config_pb2.ModelConfig())
    if {key: value.string_value for key, value in parsed.parameters.items()} != parameters:
        raise RuntimeError(f"{template}: the filled config's parameters differ from {sorted(parameters)}")
    return text


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
    if env != NO_ENV:
        if not (Path(env) / "bin" / "activate").is_file():
            raise UserError(f"--python-env {env} is not a virtual environment (no bin/activate); give one, or 'none'")
        check_backend_path(Path(env), "--python-env")


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


def external_data_file(model_folder: Path, location: str) -> Path:
    """The file an ONNX external-data ``location`` names, refused unless it stays inside the model's folder
    (a relative path without ``..`` that resolves, symlinks followed, below that folder)."""
    relative = Path(location)
    folder = model_folder.resolve()
    inside = location and not relative.is_absolute() and ".." not in relative.parts
    if not inside or not (folder / relative).resolve().is_relative_to(folder):
        raise UserError(f"the model's external data location {location[:200]!r} leaves the model's folder; refusing")
    if not (folder / relative).is_file():
        raise UserError(f"the model's external data file {location!r} is missing beside the model")
    return folder / relative


def model_file_copies(source: Path, target: Path) -> list[tuple[Path, Path]]:
    """(from, to) for the model file and, for ONNX with external data, the data files it names (each checked to stay
    inside the source's folder): all checked before anything is written."""
    copies = [(source, target)]
    if source.suffix == ".onnx":
        import onnx

        model = onnx.load(str(source), load_external_data=False)
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        copies += [(external_data_file(source.parent, loc), target.parent / loc) for loc in sorted(locations)]
    return copies


def write_readable(target: Path, write: Callable[[Path], None]) -> None:
    """An atomic write of a file others may read (0644; the temporary file it renames is the owner's only): a
    Triton container may run as another user. Only the step key stays private."""

    def readable(tmp: Path) -> None:
        write(tmp)
        tmp.chmod(0o644)

    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, readable)


def copy_file(source: Path, target: Path) -> None:
    write_readable(target, lambda tmp: shutil.copyfile(source, tmp))


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
    check_backend_path(repo.resolve(), "--repo")
    if settings.backend == "tensorrt" and (plan is None or not plan.is_file()):
        raise UserError("--backend tensorrt needs --plan model.plan (from `freesolo export trt`)")
    if settings.backend != "tensorrt" and plan is not None:
        raise UserError("--plan is for --backend tensorrt only")
    model = read_model(onnx_path, height, width)
    if not model.dynamic and (model.height % MASK_STRIDE or model.width % MASK_STRIDE):
        raise UserError(f"the served size {model.height}x{model.width} must be a multiple of {MASK_STRIDE}")
    source = Path(str(plan)) if settings.backend == "tensorrt" else onnx_path
    copies = model_file_copies(source, repo / MODEL / "1" / MODEL_FILES[settings.backend])
    clear_target(repo, force)
    values = template_values(model, settings)
    for step, template in (
        (ENSEMBLE, ENSEMBLE),
        (PREPROCESS, PREPROCESS),
        (POSTPROCESS, POSTPROCESS),
        (MODEL, FLAVOURS[settings.backend]),
    ):
        config = config_text(TEMPLATES / template / "config.pbtxt", values, step_parameters(template, model, settings))
        shutil.copytree(TEMPLATES / template, repo / step, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (repo / step / "1").mkdir(exist_ok=True)
        write_readable(repo / step / "config.pbtxt", lambda tmp, text=config: tmp.write_text(text))
    write_key(repo)
    for origin, target in copies:
        copy_file(origin, target)
    return model
