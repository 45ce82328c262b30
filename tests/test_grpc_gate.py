"""The gRPC gate in front of tritonserver (serving/grpc_gate.py): clients reach the server only through it, every
method of the inference service is relayed with its status codes (streams too, calls with and without a deadline),
anything else is unimplemented, and the server's own gRPC port listens on loopback only. The size limit itself is
tested with the other hostile requests (tests/test_serving_robustness.py)."""

from __future__ import annotations

import io
import queue

import grpc
import numpy as np
import pytest
from PIL import Image

from serving.contract import ENSEMBLE, INPUT, OUTPUT_NAMES
from serving.launcher import ServerState
from serving.processes import command_line
from serving.server_binary import pytriton_root

tritonclient = pytest.importorskip("tritonclient.grpc")

pytestmark = pytest.mark.skipif(pytriton_root() is None, reason="no tritonserver (nvidia-pytriton)")


def image_input(png: bytes) -> object:
    data = np.empty((1, 1), dtype=np.object_)
    data[0, 0] = png
    tensor = tritonclient.InferInput(INPUT, [1, 1], "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def test_the_server_listens_behind_the_gate(shared_server: ServerState) -> None:
    server_args = command_line(shared_server.pid)
    assert f"--grpc-port={shared_server.server_grpc_port}" in server_args
    assert "--grpc-address=127.0.0.1" in server_args
    gate_args = command_line(shared_server.gate_pid)
    assert gate_args[gate_args.index("--listen") + 1] == shared_server.grpc_url
    assert gate_args[gate_args.index("--upstream") + 1] == f"127.0.0.1:{shared_server.server_grpc_port}"


def test_calls_with_and_without_deadline_and_their_errors_pass(shared_server: ServerState) -> None:
    client = tritonclient.InferenceServerClient(shared_server.grpc_url)
    assert client.is_server_ready()  # no deadline
    assert client.get_model_config(ENSEMBLE, as_json=True, client_timeout=30)["config"]["name"] == ENSEMBLE
    with pytest.raises(Exception, match="Request for unknown model") as unknown:
        client.get_model_metadata("no_such_model", client_timeout=30)
    assert "NOT_FOUND" in str(unknown.value.status())  # the server's own code, relayed


def test_a_stream_is_relayed(shared_server: ServerState, pictures: list[np.ndarray]) -> None:
    buffer = io.BytesIO()
    Image.fromarray(pictures[0]).save(buffer, "PNG")
    answers: queue.Queue = queue.Queue()
    client = tritonclient.InferenceServerClient(shared_server.grpc_url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for _ in range(2):
            client.async_stream_infer(ENSEMBLE, [image_input(buffer.getvalue())])
        replies = [answers.get(timeout=120) for _ in range(2)]
    finally:
        client.stop_stream()
    for result, error in replies:
        assert error is None, error
        assert all(result.as_numpy(name) is not None for name in OUTPUT_NAMES)


def test_other_services_are_unimplemented(shared_server: ServerState) -> None:
    with grpc.insecure_channel(shared_server.grpc_url) as channel:
        call = channel.unary_unary("/grpc.health.v1.Health/Check")
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
