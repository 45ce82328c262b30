"""The MatrixNMS plugin folder (triton_plugins/matrix_nms) against the reference, training.ops.matrix_nms.

- the OpenAI Triton kernels, run on the CPU under TRITON_INTERPRET=1 in a subprocess (triton reads the variable when
  kernels are defined, and this process may already have imported triton);
- the CUDA kernels' thread code, built for the host with a C++ compiler and loaded with ctypes;
- the .cu compiled by nvcc for sm_90, and the TensorRT plugin compiled against TensorRT headers when given;
- the TensorRT plugin and the Triton kernels on a GPU, where TensorRT / CUDA exist (skipped here).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from training.ops import matrix_nms
from training.ops.matrix_nms import DEFAULT_SIGMA, EPS
from triton_plugins.matrix_nms import (
    LIBRARY_NAME,
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    SOURCE_DIR,
    host_build,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = host_build.CUDA_DIR
PLUGIN_DIR = SOURCE_DIR / "plugin"
ATOL = 1e-5


@dataclass(frozen=True)
class Case:
    """One batch of random inputs; `identical` makes every mask the same square with one label."""

    name: str
    n: int
    kernel: str
    sigma: float = DEFAULT_SIGMA
    batch: int = 2
    height: int = 16
    width: int = 16
    num_labels: int = 3
    seed: int = 0
    identical: bool = False


CASES = [
    Case("empty_gaussian", 0, "gaussian"),
    Case("empty_linear", 0, "linear"),
    Case("one_mask", 1, "gaussian"),
    Case("identical3_linear", 3, "linear", identical=True),
    Case("identical3_gaussian", 3, "gaussian", identical=True),
    Case("n37_gaussian", 37, "gaussian", seed=1),
    Case("n37_linear", 37, "linear", seed=2),
    Case("n130_odd_pixels_sigma05", 130, "gaussian", sigma=0.5, height=10, width=13, seed=3),
    Case("n130_odd_pixels_linear", 130, "linear", height=10, width=13, num_labels=2, seed=4),
    Case("n500_gaussian", 500, "gaussian", seed=5),
    Case("n500_linear", 500, "linear", seed=6),
]
CASE_IDS = [case.name for case in CASES]


def make_inputs(case: Case) -> dict[str, np.ndarray]:
    """Random rectangles (a fifth exact duplicates of an earlier mask, some empty), few labels so that same-label
    overlaps abound, scores sorted descending per image, areas = pixel counts."""
    rng = np.random.default_rng(case.seed)
    shape = (case.batch, case.n, case.height, case.width)
    masks = np.zeros(shape, dtype=np.float32)
    labels = rng.integers(0, case.num_labels, (case.batch, case.n)).astype(np.int32)
    for b in range(case.batch):
        for k in range(case.n):
            draw = rng.random()
            if case.identical:
                masks[b, k, 2:9, 3:10] = 1.0
            elif k > 0 and draw < 0.2:
                masks[b, k] = masks[b, rng.integers(k)]
            elif draw < 0.25:
                continue  # empty mask: zero area, IoU 0 with everything
            else:
                y0, x0 = rng.integers(0, case.height - 1), rng.integers(0, case.width - 1)
                masks[b, k, y0 : y0 + rng.integers(1, 9), x0 : x0 + rng.integers(1, 9)] = 1.0
    if case.identical:
        labels[:] = 1
    scores = np.sort(rng.uniform(0.05, 1.0, (case.batch, case.n)), axis=1)[:, ::-1].astype(np.float32)
    areas = masks.reshape(case.batch, case.n, case.height * case.width).sum(-1).astype(np.float32)
    return {"masks": masks, "labels": labels, "scores": np.ascontiguousarray(scores), "areas": areas}


def reference(case: Case, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """training.ops.matrix_nms on the contract's inputs (mask_area = areas)."""
    tensors = {key: torch.from_numpy(value) for key, value in inputs.items()}
    decayed = matrix_nms(
        tensors["masks"],
        tensors["labels"],
        tensors["scores"],
        kernel=case.kernel,
        sigma=case.sigma,
        mask_area=tensors["areas"],
    )
    return decayed.numpy()


def check_against_reference(case: Case, inputs: dict[str, np.ndarray], decayed: np.ndarray) -> None:
    """Equal to the reference within ATOL; the larger cases must really decay something (or the test proves little)."""
    expected = reference(case, inputs)
    assert decayed.shape == (case.batch, case.n)
    assert decayed.dtype == np.float32
    assert np.isfinite(decayed).all()
    np.testing.assert_allclose(decayed, expected, rtol=0, atol=ATOL)
    if case.identical and case.kernel == "linear":
        # IoU 1 over compensation 1 - 1: the EPS guard decays both lower masks to exactly 0, never NaN.
        np.testing.assert_array_equal(decayed[:, 1:], 0.0)
        np.testing.assert_array_equal(decayed[:, 0], inputs["scores"][:, 0])
    if case.n >= 37:
        assert (expected < 0.9 * inputs["scores"]).sum() > case.n // 10


# --- OpenAI Triton kernels, interpret mode --------------------------------------------------------------------------

_TRITON_RUNNER = """
import json, sys
import numpy as np, torch
from triton_plugins.matrix_nms.kernel import matrix_nms_triton

data = np.load(sys.argv[1])
results = {}
for case in json.loads(sys.argv[3]):
    name = case["name"]
    args = [torch.from_numpy(data[f"{name}__{key}"]) for key in ("masks", "labels", "scores", "areas")]
    results[name] = matrix_nms_triton(*args, kernel=case["kernel"], sigma=case["sigma"]).numpy()
np.savez(sys.argv[2], **results)
"""


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Every case through matrix_nms_triton in one TRITON_INTERPRET=1 subprocess (CPU tensors)."""
    pytest.importorskip("triton")
    folder = tmp_path_factory.mktemp("triton_matrix_nms")
    arrays = {f"{case.name}__{key}": value for case in CASES for key, value in make_inputs(case).items()}
    np.savez(folder / "inputs.npz", **arrays)
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    cases = json.dumps([asdict(case) for case in CASES])
    command = [sys.executable, "-c", _TRITON_RUNNER, str(folder / "inputs.npz"), str(folder / "out.npz"), cases]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(folder / "out.npz") as results:
        return {name: results[name] for name in results.files}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_triton_kernel_matches_reference(case: Case, triton_results: dict[str, np.ndarray]) -> None:
    check_against_reference(case, make_inputs(case), triton_results[case.name])


def test_triton_wrapper_rejects_bad_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Argument errors surface before any launch; CPU tensors outside interpret mode get a clear error."""
    pytest.importorskip("triton")
    from triton_plugins.matrix_nms.kernel import matrix_nms_triton

    inputs = {key: torch.from_numpy(value) for key, value in make_inputs(Case("small", 4, "gaussian")).items()}
    args = (inputs["masks"], inputs["labels"], inputs["scores"], inputs["areas"])
    with pytest.raises(ValueError, match="unknown Matrix NMS kernel"):
        matrix_nms_triton(*args, kernel="box")
    with pytest.raises(ValueError, match="scores must be"):
        matrix_nms_triton(args[0], args[1], args[2][:, :3], args[3])
    with pytest.raises(ValueError, match=r"masks must be \[B, N, H, W\]"):
        matrix_nms_triton(args[0][0], *args[1:])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        matrix_nms_triton(*args)


def test_triton_kernels_compile_for_sm90(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter never lowers to the GPU: compile every variant to PTX + cubin for Hopper with triton's own
    toolchain (no GPU needed), into a fresh cache so that nothing is reused from earlier runs."""
    triton = pytest.importorskip("triton")
    from triton_plugins.matrix_nms import kernel

    if not isinstance(kernel._decay_iou_kernel, triton.runtime.JITFunction):
        pytest.skip("this process imported the kernels in interpret mode")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    compiled = kernel.compile_for_gpu(90)
    assert set(compiled) == {"decay_iou", "compensation", "decay_gaussian", "decay_linear"}
    for name, binary in compiled.items():
        assert ".target sm_90" in binary.asm["ptx"], name
        assert ".entry" in binary.asm["ptx"] and len(binary.asm["cubin"]) > 0, name
    # 64 KB with two pipeline stages: fits every architecture from sm_80 on (sm_86 / sm_89 allow about 99 KB).
    assert compiled["decay_iou"].metadata.shared <= 64 * 1024


# --- CUDA kernels' thread code, host build ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_library(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """cuda/matrix_nms_host.cpp (the kernels' thread bodies, run block by block) as a shared library."""
    compiler = host_build.find_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    return host_build.load_host_library(
        host_build.build_host_library(tmp_path_factory.mktemp("matrix_nms_host"), compiler)
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_math_host_build_matches_reference(case: Case, host_library: ctypes.CDLL) -> None:
    inputs = make_inputs(case)
    status, decayed = host_build.run_host(host_library, inputs, case.kernel, case.sigma)
    assert status == 0
    check_against_reference(case, inputs, decayed)


def test_cuda_math_host_build_rejects_unknown_kernel(host_library: ctypes.CDLL) -> None:
    status, decayed = host_build.run_host(host_library, make_inputs(Case("small", 4, "gaussian")), "box", 2.0)
    assert status == 1
    assert np.isnan(decayed).all()  # nothing written


# --- nvcc / TensorRT headers: compile checks -------------------------------------------------------------------------


def _nvcc() -> str:
    """The nvcc on PATH (or under CUDA_HOME / CUDA_PATH); skips the test when there is none."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    return nvcc


def test_cuda_kernels_compile_for_sm90(tmp_path: Path) -> None:
    """The .cu builds for Hopper with warnings as errors, and the object holds the three kernels."""
    nvcc = _nvcc()
    obj = tmp_path / "matrix_nms_kernel.o"
    command = [nvcc, "-arch=sm_90", "-std=c++17", "--Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra"]
    command += ["-c", str(CUDA_DIR / "matrix_nms_kernel.cu"), "-o", str(obj)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    symbols = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True, check=True).stdout
    for kernel in ("decayIouKernel", "compensationKernel", "decayKernel"):
        assert re.search(rf"__device_stub__\w*{kernel}", symbols), kernel
    assert "freesolo::matrixNmsLaunch" in symbols


def _tensorrt_include_dir() -> Path | None:
    """NvInfer.h's folder from TENSORRT_INCLUDE_DIR or TENSORRT_ROOT (the CMake variable's name), if any."""
    candidates = [os.environ.get("TENSORRT_INCLUDE_DIR")]
    if os.environ.get("TENSORRT_ROOT"):
        candidates.append(str(Path(os.environ["TENSORRT_ROOT"]) / "include"))
    for candidate in filter(None, candidates):
        if (Path(candidate) / "NvInfer.h").exists():
            return Path(candidate)
    return None


def _cuda_include_dir(nvcc: str) -> str:
    """The CUDA headers nvcc itself uses (from its dry run; nvcc may be a wrapper script elsewhere), else the include
    folder beside nvcc's bin folder, for host code that includes cuda_runtime_api.h."""
    dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
    found = re.search(r'INCLUDES="-I([^"\s]+)', dry.stderr + dry.stdout)
    if found is not None:
        return found.group(1)
    beside = Path(nvcc).resolve().parent.parent / "include"
    if not (beside / "cuda_runtime_api.h").exists():
        pytest.skip(f"could not find the CUDA include directory of {nvcc}")
    return str(beside)


# Compiled beside the plugin: the plugin and its creator must be concrete classes under the given headers (a pure
# virtual added by a TensorRT release, or a signature that no longer overrides, makes them abstract), while the
# interfaces they implement are abstract (else the check would prove nothing).
NOT_ABSTRACT_PROBE = """
#include "MatrixNMSPlugin.h"

#include <type_traits>

static_assert(std::is_abstract_v<nvinfer1::IPluginV3OneBuild>, "the build interface has pure virtuals");
static_assert(std::is_abstract_v<nvinfer1::IPluginCreatorV3One>, "the creator interface has pure virtuals");
static_assert(!std::is_abstract_v<freesolo::MatrixNMSPlugin>, "MatrixNMSPlugin leaves a pure virtual unimplemented");
static_assert(!std::is_abstract_v<freesolo::MatrixNMSPluginCreator>, "the creator leaves a pure virtual unimplemented");
"""


@pytest.mark.tensorrt
def test_tensorrt_plugin_compiles_against_tensorrt_headers(tmp_path: Path) -> None:
    """MatrixNMSPlugin.cpp compiles against the headers in TENSORRT_INCLUDE_DIR (or TENSORRT_ROOT/include) with
    warnings as errors, and its classes implement every pure virtual of IPluginV3 / IPluginCreatorV3One there."""
    include = _tensorrt_include_dir()
    if include is None:
        pytest.skip("set TENSORRT_INCLUDE_DIR (or TENSORRT_ROOT) to a folder with TensorRT's NvInfer.h")
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (g++ or c++) on PATH")
    command = [compiler, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-Wno-deprecated-declarations"]
    command += ["-isystem", str(include), "-isystem", _cuda_include_dir(_nvcc()), "-I", str(CUDA_DIR)]
    command += ["-I", str(PLUGIN_DIR)]
    probe = tmp_path / "not_abstract.cpp"
    probe.write_text(NOT_ABSTRACT_PROBE)
    for source in (PLUGIN_DIR / "MatrixNMSPlugin.cpp", probe):
        done = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{source.name}: {done.stderr[-3000:]}"


# --- On a GPU: TensorRT plugin and Triton kernels --------------------------------------------------------------------


def _plugin_library(tmp_path: Path) -> Path:
    """FREESOLO_MATRIX_NMS_PLUGIN if set, else a CMake build with TENSORRT_ROOT; skips when neither is possible."""
    if os.environ.get("FREESOLO_MATRIX_NMS_PLUGIN"):
        return Path(os.environ["FREESOLO_MATRIX_NMS_PLUGIN"])
    if not os.environ.get("TENSORRT_ROOT") or shutil.which("cmake") is None:
        pytest.skip("set FREESOLO_MATRIX_NMS_PLUGIN to a built plugin, or TENSORRT_ROOT to build one")
    build = tmp_path / "build"
    configure = ["cmake", "-S", str(PLUGIN_DIR), "-B", str(build), f"-DTENSORRT_ROOT={os.environ['TENSORRT_ROOT']}"]
    for command in (configure, ["cmake", "--build", str(build), "-j"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return build / LIBRARY_NAME


def _run_tensorrt_plugin(trt: ModuleType, case: Case, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Builds a one-layer engine around the plugin (fields set as the ONNX parser would) and runs it."""
    logger = trt.Logger(trt.Logger.WARNING)
    creator = trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    assert creator is not None, "MatrixNMS creator not registered"
    fields = trt.PluginFieldCollection(
        [
            trt.PluginField("kernel", np.frombuffer(case.kernel.encode(), dtype=np.int8), trt.PluginFieldType.CHAR),
            trt.PluginField("sigma", np.array([case.sigma], dtype=np.float32), trt.PluginFieldType.FLOAT32),
        ]
    )
    plugin = creator.create_plugin("matrix_nms", fields, trt.TensorRTPhase.BUILD)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    types = {"masks": trt.float32, "labels": trt.int32, "scores": trt.float32, "areas": trt.float32}
    tensors = [network.add_input(name, types[name], inputs[name].shape) for name in types]
    layer = network.add_plugin_v3(tensors, [], plugin)
    layer.get_output(0).name = "decayed_scores"
    network.mark_output(layer.get_output(0))
    serialized = builder.build_serialized_network(network, builder.create_builder_config())
    assert serialized is not None, "engine build failed"
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    device = {name: torch.from_numpy(value).cuda() for name, value in inputs.items()}
    out = torch.empty(inputs["scores"].shape, dtype=torch.float32, device="cuda")
    for name, tensor in [*device.items(), ("decayed_scores", out)]:
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return out.cpu().numpy()


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("case", [c for c in CASES if c.n > 0], ids=[c.name for c in CASES if c.n > 0])
def test_tensorrt_plugin_matches_reference(case: Case, tmp_path: Path) -> None:
    trt = pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ctypes.CDLL(str(_plugin_library(tmp_path)), mode=ctypes.RTLD_GLOBAL)  # REGISTER_TENSORRT_PLUGIN runs on load
    inputs = make_inputs(case)
    check_against_reference(case, inputs, _run_tensorrt_plugin(trt, case, inputs))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_triton_kernel_on_cuda_matches_reference(case: Case) -> None:
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from triton_plugins.matrix_nms.kernel import matrix_nms_triton

    inputs = make_inputs(case)
    device = [torch.from_numpy(inputs[key]).cuda() for key in ("masks", "labels", "scores", "areas")]
    decayed = matrix_nms_triton(*device, kernel=case.kernel, sigma=case.sigma)
    check_against_reference(case, inputs, decayed.cpu().numpy())


def header_constant(name: str) -> float:
    """The value of a ``constexpr float NAME = VALUEF;`` in the kernels' shared math header."""
    found = re.search(rf"constexpr float {name} = ([0-9.eE+-]+)F;", (CUDA_DIR / "matrix_nms_math.h").read_text())
    assert found, f"{name} is not defined in matrix_nms_math.h"
    return float(found.group(1))


def test_the_cuda_constants_are_the_reference_defaults() -> None:
    """The C++ side copies two numbers of the Python reference; they must not drift apart."""
    assert header_constant("kDefaultSigma") == DEFAULT_SIGMA
    assert header_constant("kMatrixNmsEps") == pytest.approx(EPS, rel=1e-6)
