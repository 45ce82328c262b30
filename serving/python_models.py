"""What the three python-backend models share: reading config parameters, validating input tensors and turning
every failure into a per-request ``TritonError``, so a bad request gets a clear message and never crashes the stub.

The Triton module ``triton_python_backend_utils`` exists only inside the backend's stub process, so the models pass
it in (``pb``) rather than this module importing it; tests pass a stand-in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from training.geometry import InputPolicy

Arrays = dict[str, np.ndarray]


class RequestError(ValueError):
    """A request the model cannot serve; the message goes back to the client as is."""


def parameter(config: dict[str, Any], key: str) -> str:
    """A string parameter of a model's config (``parameters: { key: ... value: { string_value: ... } }``)."""
    try:
        return str(config["parameters"][key]["string_value"])
    except KeyError:
        raise RuntimeError(f"model {config.get('name')}: config.pbtxt has no parameter {key!r}") from None


def input_policy(config: dict[str, Any], height: int, width: int) -> InputPolicy:
    """The served input policy: the model's H x W (-1 x -1: dynamic) and the test resize's parameters from the
    config."""
    test_size, max_size = int(parameter(config, "test_size")), int(parameter(config, "max_size"))
    modes = (parameter(config, "resize_filter"), parameter(config, "resize_rounding"))
    return InputPolicy(height, width, height == -1, test_size, max_size, *modes)


def input_array(
    pb: Any, request: Any, name: str, dtype: type, item_shape: Sequence[int], max_side: int = 0
) -> np.ndarray:
    """Input ``name`` of a request as a numpy array [batch, *item_shape] of ``dtype``, or RequestError. A dim of -1
    in ``item_shape`` (a dynamic model's H or W) takes any size from 1 to ``max_side``."""
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise RequestError(f"input {name!r} is missing")
    array = tensor.as_numpy()
    if array.dtype != np.dtype(dtype):
        raise RequestError(f"input {name!r} has dtype {array.dtype}, expected {np.dtype(dtype)}")
    fits = array.ndim == len(item_shape) + 1 and all(
        got == want or (want == -1 and 1 <= got <= max_side)
        for got, want in zip(array.shape[1:], item_shape, strict=True)
    )
    if not fits:
        bound = f" (-1: 1 to {max_side})" if -1 in item_shape else ""
        raise RequestError(f"input {name!r} has shape {list(array.shape)}, expected [batch, {list(item_shape)}]{bound}")
    if len(array) == 0:
        raise RequestError(f"input {name!r} is an empty batch")
    return array


def error_response(pb: Any, message: str, code: str = "INVALID_ARG") -> Any:
    """A response that fails only this request, with a Triton error code (INVALID_ARG: the client's fault)."""
    code_value = getattr(pb.TritonError, code, None)
    error = pb.TritonError(message) if code_value is None else pb.TritonError(message, code_value)
    return pb.InferenceResponse(output_tensors=[], error=error)


def response(pb: Any, outputs: Arrays) -> Any:
    return pb.InferenceResponse(output_tensors=[pb.Tensor(name, array) for name, array in outputs.items()])


def respond_each(pb: Any, model: str, requests: Sequence[Any], handle: Callable[[Any], Arrays]) -> list[Any]:
    """One response per request; a RequestError becomes that request's error, anything else an internal error
    naming the model (and is logged), and the other requests are answered as usual."""
    responses = []
    for request in requests:
        try:
            responses.append(response(pb, handle(request)))
        except RequestError as error:
            responses.append(error_response(pb, f"{model}: {error}"))
        except Exception as error:
            log_error(pb, f"{model}: {type(error).__name__}: {error}")
            message = f"{model}: internal error ({type(error).__name__}: {error})"
            responses.append(error_response(pb, message, "INTERNAL"))
    return responses


def stack_outputs(outputs: Sequence[Arrays]) -> Arrays:
    """Per-item output dicts -> one batched dict (each array gains a leading batch dimension)."""
    return {name: np.stack([item[name] for item in outputs]) for name in outputs[0]}


def log_error(pb: Any, message: str) -> None:
    logger = getattr(pb, "Logger", None)
    if logger is not None:
        logger.log_error(message)
