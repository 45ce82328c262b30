"""Triton python model ``model``: the exported ONNX graph (model.onnx beside this file) in ONNX Runtime on the CPU.

All valid requests the dynamic batcher hands over run as one ONNX Runtime call; a malformed request fails alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from export.graph_contract import INPUT_NAME, OUTPUT_NAMES
from serving.python_models import RequestError, error_response, input_array, log_error, parameter, response


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"model: {path} not found (run `freesolo serve prepare` again)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameter(config, "intra_op_thread_count"))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.item_shape = tuple(int(d) for d in pb_utils.get_input_config_by_name(config, INPUT_NAME)["dims"])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        batches: list[tuple[int, np.ndarray]] = []
        for index, request in enumerate(requests):
            try:
                batches.append((index, input_array(pb_utils, request, INPUT_NAME, np.uint8, self.item_shape)))
            except RequestError as error:
                responses[index] = error_response(pb_utils, f"model: {error}")
        if batches:
            try:
                images = np.concatenate([images for _, images in batches])
                outputs = dict(zip(OUTPUT_NAMES, self.session.run(None, {INPUT_NAME: images}), strict=True))
                outputs["num_dets"] = outputs["num_dets"].reshape(-1, 1)  # [B] in the graph, [B, 1] in Triton
                start = 0
                for index, chunk in batches:
                    stop = start + len(chunk)
                    responses[index] = response(pb_utils, {n: a[start:stop] for n, a in outputs.items()})
                    start = stop
            except Exception as error:
                log_error(pb_utils, f"model: {type(error).__name__}: {error}")
                for index, _ in batches:
                    responses[index] = error_response(pb_utils, f"model: ONNX Runtime failed ({error})", "INTERNAL")
        return responses
