"""``freesolo export trt``: an exported ONNX model -> a serialized TensorRT engine (``model.plan``), with the
``freesolo::MatrixNMS`` node running as the fused plugin of ``triton_plugins/matrix_nms`` when its library is loaded.

Thin and standard on purpose: the documented TensorRT Python API (Builder, OnnxParser, one optimisation profile,
BuilderConfig). TensorRT exists only on GPU hosts, so ``tensorrt`` is imported when a command needs it and its absence
is a UserError; everything that can be decided without it (profile shapes, version rules, the ONNX copy the parser
reads) is plain Python, tested everywhere.
"""

from __future__ import annotations

import ctypes
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from export.graph_contract import INPUT_NAME, SIZES_NAME
from training.errors import UserError
from training.fileio import atomic_write
from training.geometry import SIZE_DIVISOR, round_up
from triton_plugins.matrix_nms import (
    LIBRARY_NAME,
    ONNX_DOMAIN,
    ONNX_OP_TYPE,
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
)

Log = Callable[[str], None]
Shape = tuple[int, int, int, int]
# From this version the ONNX parser maps a node to a registered plugin of its op type even when the model carries a
# local function of that name (TensorRT OSS 10.7 release notes); older parsers inline the function body instead.
PLUGIN_OVER_FUNCTION = (10, 7)
DEFAULT_BATCH = (1, 1, 8)
INSTALL_HINT = (
    "TensorRT is needed for this (GPU hosts with CUDA only): install NVIDIA's wheel into this environment "
    "(`pip install tensorrt`, which downloads from pypi.nvidia.com) or run inside an NGC TensorRT/Triton container"
)


def import_tensorrt() -> ModuleType:
    """``import tensorrt``, or a UserError that says what is missing and how to get it."""
    try:
        import tensorrt
    except ImportError as error:
        raise UserError(f"cannot import tensorrt ({error}). {INSTALL_HINT}") from None
    return tensorrt


def trt_version(trt: ModuleType) -> tuple[int, int]:
    """(major, minor) of the imported TensorRT."""
    return parse_version(str(trt.__version__))


def parse_version(text: str) -> tuple[int, int]:
    """``"10.7.0.23"`` -> (10, 7)."""
    major, minor, *_ = [int("".join(c for c in part if c.isdigit()) or 0) for part in text.split(".")] + [0, 0]
    return major, minor


def check_plugin_library(path: Path | None) -> Path | None:
    """The plugin library path if given and present; a UserError that says how to build it otherwise."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plugin library not found: {path} (build {LIBRARY_NAME}: triton_plugins/matrix_nms/README.md)")
    return path


def load_plugin(trt: ModuleType, path: Path | None, logger: Any) -> bool:
    """Register TensorRT's own plugins and, if given, ours; True when a MatrixNMS creator is registered.

    The library registers its creator from a static initialiser (``REGISTER_TENSORRT_PLUGIN``), so a plain
    ``dlopen`` is what loads it (``IPluginRegistry.load_library`` expects a ``getCreators`` entry point, which the
    library does not export). Without ``path`` a creator may still be present, e.g. loaded with ``LD_PRELOAD``."""
    trt.init_libnvinfer_plugins(logger, "")
    if path is not None:
        try:
            ctypes.CDLL(str(Path(path).resolve()), mode=ctypes.RTLD_GLOBAL)
        except OSError as error:
            raise UserError(f"cannot load plugin library {path}: {error}") from None
    registry = trt.get_plugin_registry()
    lookup = getattr(registry, "get_creator", None) or registry.get_plugin_creator  # the latter before TensorRT 10
    creator = lookup(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    if path is not None and creator is None:
        raise UserError(f"{path} loaded, but no {PLUGIN_NAME} v{PLUGIN_VERSION} creator was registered by it")
    return creator is not None


def must_strip_function(version: tuple[int, int], plugin_loaded: bool) -> bool:
    """Whether the parser must be given the model without MatrixNMS's function body to use the plugin."""
    return plugin_loaded and version < PLUGIN_OVER_FUNCTION


def without_matrix_nms_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without the ``freesolo::MatrixNMS`` FunctionProto: an older parser then finds no body
    and falls back to the plugin registered under the node's op type."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [f for f in copy.functions if (f.domain, f.name) != (ONNX_DOMAIN, ONNX_OP_TYPE)]
    del copy.functions[:]
    copy.functions.extend(kept)
    return copy


def parse_size(text: str) -> tuple[int, int]:
    """``"800x1344"`` -> (800, 1344) (the argparse type of --min-size/--opt-size/--max-size; ValueError if not)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a size is HxW, e.g. 800x1344, got '{text}'") from None
    return height, width


@dataclass(frozen=True)
class Profile:
    """Min / opt / max shapes of ``images`` [B, 3, H, W] for TensorRT's optimisation profile."""

    min: Shape
    opt: Shape
    max: Shape

    def describe(self) -> str:
        return " / ".join("x".join(str(d) for d in shape) for shape in (self.min, self.opt, self.max))

    def sizes_shapes(self) -> tuple[tuple[int, int], ...]:
        """Min / opt / max shapes of ``image_sizes`` [B, 2] (a ``pad_normalized`` model's second input): the same
        batches."""
        return tuple((shape[0], 2) for shape in (self.min, self.opt, self.max))


def input_dims(model: onnx.ModelProto) -> list[int | None]:
    """The ``images`` input's dims, None where symbolic."""
    inputs = {value.name: value for value in model.graph.input}
    if INPUT_NAME not in inputs:
        raise UserError(f"the ONNX model has no '{INPUT_NAME}' input (inputs: {', '.join(inputs)})")
    dims = inputs[INPUT_NAME].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def default_sizes(metadata: dict[str, str]) -> tuple[tuple[int, int], ...]:
    """Min / opt / max H x W for a dynamic model: one size-divisor block, the preset's test size, its max size
    (rounded up to multiples of 32, square so both orientations fit). The graph itself takes any H x W (it pads
    inside); the profile keeps to the canvases every caller here sends, multiples of 32."""
    size = json.loads(metadata.get("freesolo.input_size", "{}"))
    divisor = int(size.get("size_divisor", SIZE_DIVISOR))
    test = round_up(int(size.get("test_size", 800)), divisor)
    top = round_up(int(size.get("max_size", 1333)), divisor)
    return (divisor, divisor), (test, test), (top, top)


def optimisation_profile(
    dims: Sequence[int | None],
    metadata: dict[str, str],
    batch: Sequence[int | None] = (None, None, None),
    sizes: Sequence[tuple[int, int] | None] = (None, None, None),
) -> Profile:
    """The profile for ``images``: batch from the options (default 1 / 1 / 8); H x W from the model when it is
    fixed (then size options are a mistake), else from the options with defaults from the model's metadata."""
    if len(dims) != 4:
        raise UserError(f"'{INPUT_NAME}' must be [B, 3, H, W], the model has {len(dims)} dims")
    batches = [b if b is not None else d for b, d in zip(batch, DEFAULT_BATCH, strict=True)]
    if dims[0] is not None:
        if any(b is not None for b in batch):
            raise UserError(f"the model's batch is fixed at {dims[0]}; leave out --min/--opt/--max-batch")
        batches = [dims[0]] * 3
    if not 1 <= batches[0] <= batches[1] <= batches[2]:
        raise UserError(f"batch sizes must satisfy 1 <= min <= opt <= max, got {batches}")
    if dims[2] is not None and dims[3] is not None:
        if any(s is not None for s in sizes):
            raise UserError(
                f"the model has a fixed input size {dims[2]}x{dims[3]}; --min/--opt/--max-size apply to models "
                "exported with --dynamic"
            )
        hw = [(dims[2], dims[3])] * 3
    else:
        hw = [s if s is not None else d for s, d in zip(sizes, default_sizes(metadata), strict=True)]
        for name, (height, width) in zip(("min", "opt", "max"), hw, strict=True):
            if height <= 0 or width <= 0 or height % SIZE_DIVISOR or width % SIZE_DIVISOR:
                raise UserError(f"--{name}-size must be positive multiples of {SIZE_DIVISOR}, got {height}x{width}")
        for axis in (0, 1):
            if not hw[0][axis] <= hw[1][axis] <= hw[2][axis]:
                raise UserError(f"sizes must satisfy min <= opt <= max on each side, got {hw}")
    channels = dims[1] or 3
    shapes = [(b, channels, h, w) for b, (h, w) in zip(batches, hw, strict=True)]
    return Profile(*shapes)


def read_onnx(path: Path) -> onnx.ModelProto:
    """The model (weights included), with UserErrors for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as error:  # onnx raises DecodeError, OSError or ValueError depending on the damage
        raise UserError(f"cannot read ONNX model {path}: {error}") from None


def describe_parser_error(error: Any) -> str:
    """One parser error as text: the node index (when there is one) and the description."""
    text = str(error.desc()) if hasattr(error, "desc") else str(error)
    node = error.node() if hasattr(error, "node") else -1
    return f"node {node}: {text}" if node >= 0 else text


def has_plugin_layer(trt: ModuleType, network: Any) -> bool:
    """Whether the parsed network holds a plugin layer (the fused MatrixNMS) rather than only standard layers."""
    kinds = {getattr(trt.LayerType, name, None) for name in ("PLUGIN_V3", "PLUGIN_V2", "PLUGIN")} - {None}
    return any(network.get_layer(i).type in kinds for i in range(network.num_layers))


def build_engine(
    onnx_path: Path,
    out: Path,
    fp16: bool = False,
    plugin_lib: Path | None = None,
    batch: Sequence[int | None] = (None, None, None),
    sizes: Sequence[tuple[int, int] | None] = (None, None, None),
    workspace_gb: float | None = None,
    log: Log = print,
) -> Path:
    """``freesolo export trt``: parse, set the profile (and FP16 if asked), build, write the plan atomically."""
    model = read_onnx(onnx_path)
    plugin_lib = check_plugin_library(plugin_lib)
    metadata = {p.key: p.value for p in model.metadata_props}
    profile_shapes = optimisation_profile(input_dims(model), metadata, batch, sizes)
    if workspace_gb is not None and workspace_gb <= 0:
        raise UserError(f"--workspace-gb must be positive, got {workspace_gb}")
    trt = import_tensorrt()
    version = trt_version(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    plugin_loaded = load_plugin(trt, plugin_lib, logger)
    if not plugin_loaded:
        log(
            f"warning: no {PLUGIN_NAME} plugin loaded (--plugin-lib): Matrix NMS will run as the node's ONNX "
            "function body (standard layers, same numbers, no fused kernel)"
        )

    builder = trt.Builder(logger)
    # TensorRT 10 networks are explicit-batch only (the default); older versions need the flag.
    flags = 0 if version >= (10, 0) else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if must_strip_function(version, plugin_loaded):
        log(f"TensorRT {trt.__version__} < 10.7: parsing a copy without the MatrixNMS function, so the plugin is used")
        parsed = parser.parse(without_matrix_nms_function(model).SerializeToString(), str(onnx_path))
    else:
        parsed = parser.parse_from_file(str(onnx_path))
    if not parsed:
        errors = [describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"TensorRT cannot parse {onnx_path}: " + " | ".join(errors or ["no error reported"]))
    if plugin_loaded and not has_plugin_layer(trt, network):
        log(f"warning: the {PLUGIN_NAME} plugin is loaded but the parser inlined the function body instead")

    config = builder.create_builder_config()
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise UserError(f"TensorRT {trt.__version__} has no FP16 builder flag (strongly typed networks only)")
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, profile_shapes.min, profile_shapes.opt, profile_shapes.max)
    if any(value.name == SIZES_NAME for value in model.graph.input):
        profile.set_shape(SIZES_NAME, *profile_shapes.sizes_shapes())
    config.add_optimization_profile(profile)

    where = "fused plugin" if has_plugin_layer(trt, network) else "ONNX function body"
    log(
        f"building {onnx_path} with TensorRT {trt.__version__}: {'fp16' if fp16 else 'fp32'}, "
        f"images min/opt/max {profile_shapes.describe()}, Matrix NMS as {where}"
    )
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path} (its log above says why)")
    atomic_write(Path(out), lambda tmp: tmp.write_bytes(bytes(serialized)))
    log(f"wrote {out} ({Path(out).stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    return Path(out)
