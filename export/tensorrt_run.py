"""Running a ``freesolo export trt`` engine on a batch, for ``freesolo parity --trt``: deserialize, set the input
shape, bind torch CUDA tensors, ``execute_async_v3`` on torch's stream. Thin on purpose (the documented TensorRT 10
API only); torch is the CUDA memory manager because the project already depends on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.graph_contract import INPUT_NAME, OUTPUT_NAMES, SIZES_NAME
from export.onnx_inputs import check_image_sizes
from export.tensorrt_build import check_plugin_library, import_tensorrt, load_plugin
from training.errors import UserError

# TensorRT DataType member name -> torch dtype, for the contract's tensors (and a few more).
TORCH_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorRTModel:
    """A deserialized engine with one execution context (the engine's first optimisation profile)."""

    def __init__(self, plan: Path, plugin_lib: Path | None = None) -> None:
        plan = Path(plan)
        if not plan.is_file():
            raise UserError(f"TensorRT engine not found: {plan}")
        plugin_lib = check_plugin_library(plugin_lib)
        self.trt = trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise UserError("running a TensorRT engine needs a CUDA GPU, and PyTorch sees none")
        logger = trt.Logger(trt.Logger.WARNING)
        load_plugin(trt, plugin_lib, logger)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise UserError(
                f"cannot deserialize {plan}: built by another TensorRT version, or it needs the MatrixNMS plugin "
                "(--plugin-lib)"
            )
        self.context = self.engine.create_execution_context()
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        missing = {INPUT_NAME, *OUTPUT_NAMES} - names
        if missing:
            raise UserError(f"{plan} does not follow the graph contract: no tensor(s) {', '.join(sorted(missing))}")
        self.takes_sizes = SIZES_NAME in names  # a pad_normalized model's engine

    def _torch_dtype(self, name: str) -> torch.dtype:
        dtype = self.engine.get_tensor_dtype(name)
        for member, torch_dtype in TORCH_DTYPES.items():
            if dtype == getattr(self.trt.DataType, member, None):
                return torch_dtype
        raise UserError(f"engine tensor '{name}' has an unsupported type {dtype}")

    def run(self, images: np.ndarray, sizes: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [B, 3, H, W] whose images fill ``sizes`` [B, 2] of their canvas -> the contract outputs by name
        (numpy, on the host); the sizes go in only where the engine takes them."""
        device_input = torch.from_numpy(np.ascontiguousarray(images)).cuda().to(self._torch_dtype(INPUT_NAME))
        if not self.context.set_input_shape(INPUT_NAME, tuple(device_input.shape)):
            low, _, high = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
            raise UserError(
                f"input shape {tuple(device_input.shape)} is outside the engine's profile ({tuple(low)} to "
                f"{tuple(high)}): rebuild with larger --max-batch/--max-size, or use a smaller --batch-size"
            )
        inputs = {INPUT_NAME: device_input}
        if self.takes_sizes:
            inputs[SIZES_NAME] = torch.from_numpy(check_image_sizes(sizes, images)).cuda()
            self.context.set_input_shape(SIZES_NAME, tuple(inputs[SIZES_NAME].shape))
        outputs: dict[str, Any] = {}
        for name in OUTPUT_NAMES:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
        for name, tensor in {**inputs, **outputs}.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        stream.synchronize()
        return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}
