"""The host build of the CUDA kernels' thread code (``cuda/matrix_nms_host.cpp``): compiled with the system C++
compiler into a shared library and called with ctypes. The plugin tests compare it with the reference; the NMS
benchmark times it for what it is, the per-thread GPU code run block by block on one CPU core (not a GPU speed).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

from triton_plugins.matrix_nms import DEFAULT_KERNEL, DEFAULT_SIGMA, SOURCE_DIR

CUDA_DIR = SOURCE_DIR / "cuda"
HOST_SOURCE = CUDA_DIR / "matrix_nms_host.cpp"
LIBRARY_FILE = "libmatrix_nms_host.so"
KERNEL_TYPES = {"gaussian": 0, "linear": 1}  # MatrixNmsKernelType in cuda/matrix_nms_math.h
INVALID_KERNEL_TYPE = 7  # any other value: the library answers status 1


def find_compiler() -> str | None:
    """The first C++ compiler on PATH (g++, c++, clang++), or None."""
    return next(filter(None, (shutil.which(name) for name in ("g++", "c++", "clang++"))), None)


def build_host_library(folder: Path, compiler: str) -> Path:
    """Compiles the host build into ``folder`` (warnings as errors); raises RuntimeError with the compiler's output."""
    library = folder / LIBRARY_FILE
    command = [compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC"]
    command += ["-I", str(CUDA_DIR), str(HOST_SOURCE), "-o", str(library)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"compiling {HOST_SOURCE.name} failed:\n{done.stderr[-3000:]}")
    return library


def load_host_library(library: Path) -> ctypes.CDLL:
    """The library with ``freesolo_matrix_nms_host``'s C signature declared."""
    lib = ctypes.CDLL(str(library))
    lib.freesolo_matrix_nms_host.argtypes = [ctypes.c_void_p] * 5 + [
        ctypes.c_int32,
        ctypes.c_int32,
        ctypes.c_int64,
        ctypes.c_int32,
        ctypes.c_float,
    ]
    lib.freesolo_matrix_nms_host.restype = ctypes.c_int
    return lib


def run_host(
    lib: ctypes.CDLL, inputs: dict[str, np.ndarray], kernel: str = DEFAULT_KERNEL, sigma: float = DEFAULT_SIGMA
) -> tuple[int, np.ndarray]:
    """Runs the host build on the node's inputs (``masks`` float32 [B, N, H, W], ``labels`` int32 [B, N],
    ``scores`` and ``areas`` float32 [B, N]); returns its status (0 ok, 1 invalid) and the decayed scores, NaN where
    nothing was written."""
    batch, n, height, width = inputs["masks"].shape
    arrays = [np.ascontiguousarray(inputs[key]) for key in ("masks", "labels", "scores", "areas")]
    out = np.full((batch, n), np.nan, dtype=np.float32)
    pointers = [array.ctypes.data_as(ctypes.c_void_p) for array in [*arrays, out]]
    kernel_type = KERNEL_TYPES.get(kernel, INVALID_KERNEL_TYPE)
    status = lib.freesolo_matrix_nms_host(*pointers, batch, n, height * width, kernel_type, sigma)
    return status, out
