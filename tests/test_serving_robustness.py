"""A barrage of bad requests against one real tritonserver (conftest's ``shared_server``): corrupt, empty and
truncated images, decompression bombs (headers that lie and real high-ratio PNGs), other formats, oversized
payloads, wrong dtypes, ranks and shapes, too large and empty batches, missing, unknown and extra inputs, broken
BYTES serialization, an unknown model. Each must fail alone with the message its kind deserves (asserted per kind);
afterwards the server answers a valid request exactly as before, with the same server and stub processes, every
model ready, and the failures counted in Triton's statistics."""

from __future__ import annotations

import io
import random
import struct
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from serving.contract import (
    ENSEMBLE,
    GEOMETRY,
    GEOMETRY_TAG,
    INPUT,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_SIDE,
    MAX_MESSAGE_BYTES,
    MODEL,
    POSTPROCESS,
    PREPROCESS,
)
from serving.launcher import ServerState
from serving.processes import PROC, family, is_running
from serving.server_binary import pytriton_root

grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from serving.client import FreeSOLOClient  # noqa: E402

pytestmark = pytest.mark.skipif(pytriton_root() is None, reason="no tritonserver (nvidia-pytriton)")
MIN_REQUESTS = 500
INVALID = "INVALID_ARGUMENT"


@dataclass(frozen=True)
class Case:
    """One bad request: its kind, how to send it (raises on the server's refusal), what the refusal must say."""

    kind: str
    send: Callable[[Connections], None]
    expected: str
    status: str = INVALID


class Connections:
    """A thread's own tritonclient and raw gRPC stub (for requests tritonclient refuses to build)."""

    def __init__(self, url: str) -> None:
        import grpc as raw_grpc

        self.client = grpc.InferenceServerClient(url)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(raw_grpc.insecure_channel(url))


def encode(image: np.ndarray | Image.Image, image_format: str) -> bytes:
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    picture.save(buffer, image_format)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` (CRC fixed, so only the size lies)."""
    data = bytearray(encode(np.zeros((1, 1, 3), np.uint8), "PNG"))
    start = data.index(b"IHDR")
    data[start + 4 : start + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[start + 17 : start + 21] = zlib.crc32(bytes(data[start : start + 17])).to_bytes(4, "big")
    return bytes(data)


def png_with_noise(image: np.ndarray, rng: random.Random) -> bytes:
    """A PNG with a valid header whose compressed pixel data (IDAT) is noise (CRC fixed, so only the data lies)."""
    data = bytearray(encode(image, "PNG"))
    start = data.index(b"IDAT")
    length = int.from_bytes(data[start - 4 : start], "big")
    data[start + 4 : start + 4 + length] = rng.randbytes(length)
    crc = zlib.crc32(bytes(data[start : start + 4 + length]))
    data[start + 4 + length : start + 8 + length] = crc.to_bytes(4, "big")
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """An 8x8 JPEG whose frame header (SOF0) claims ``width`` x ``height``."""
    data = bytearray(encode(np.zeros((8, 8, 3), np.uint8), "JPEG"))
    start = data.index(b"\xff\xc0")
    data[start + 5 : start + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def tensor(name: str, array: np.ndarray, datatype: str) -> grpc.InferInput:
    item = grpc.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def images(*items: bytes) -> np.ndarray:
    array = np.empty((len(items), 1), dtype=np.object_)
    array[:, 0] = items
    return array


def infer(inputs: Callable[[], list[grpc.InferInput]], model: str = ENSEMBLE) -> Callable[[Connections], None]:
    return lambda c: c.client.infer(model, inputs(), client_timeout=60)


def send_images(*items: bytes) -> Callable[[Connections], None]:
    return infer(lambda: [tensor(INPUT, images(*items), "BYTES")])


def send_raw(contents: bytes, shape: tuple[int, ...] = (1, 1)) -> Callable[[Connections], None]:
    """A BYTES input whose wire serialization is ``contents`` as given (length prefixes included)."""

    def send(c: Connections) -> None:
        request = service_pb2.ModelInferRequest(model_name=ENSEMBLE)
        item = request.inputs.add(name=INPUT, datatype="BYTES", shape=list(shape))
        assert item is not None
        request.raw_input_contents.append(contents)
        try:
            c.stub.ModelInfer(request, timeout=60)
        except Exception as error:  # grpc.RpcError: in tritonclient's terms, like the other cases
            code, details = error.code(), error.details()  # type: ignore[attr-defined]
            raise InferenceServerException(details, status=str(code)) from None

    return send


def bad_cases(good_png: bytes, good_jpeg: bytes, photo: np.ndarray) -> list[Case]:
    """At least MIN_REQUESTS bad requests, every kind several times with varied data."""
    rng = random.Random(7)
    real_bomb = encode(Image.new("1", (7000, 7000)), "PNG")  # 49 megapixels in 6 kB
    assert len(real_bomb) < 10_000
    huge = b"\x89PNG\r\n\x1a\n" + bytes(MAX_IMAGE_BYTES)  # over the byte limit
    gif, bmp = encode(photo[:64, :64], "GIF"), encode(photo[:64, :64], "BMP")
    wide_png = encode(Image.new("L", (20_000, 60)), "PNG")
    kinds: list[Callable[[int], Case]] = [
        lambda i: Case("corrupt", send_images(rng.randbytes(rng.randint(1, 4000))), "not a JPEG or PNG image"),
        lambda i: Case("corrupt PNG", send_images(png_with_noise(photo[:32, : 16 + i], rng)), "cannot decode image"),
        lambda i: Case("empty", send_images(b""), "empty image (0 bytes)"),
        lambda i: Case(
            "truncated PNG", send_images(good_png[: int(len(good_png) * rng.uniform(0.05, 0.99))]), "truncated"
        ),
        lambda i: Case(
            "truncated JPEG", send_images(good_jpeg[: int(len(good_jpeg) * rng.uniform(0.05, 0.99))]), "truncated"
        ),
        lambda i: Case(
            "bomb header PNG",
            send_images(png_claiming(50_000 + i, 50_000)),
            "more than 40000000 pixels (decompression-bomb guard)",
        ),
        lambda i: Case(
            "bomb header JPEG", send_images(jpeg_claiming(16_000, 16_000 - i % 100)), "(decompression-bomb guard)"
        ),
        lambda i: Case("real bomb PNG", send_images(real_bomb), "image is 7000x7000: more than 40000000 pixels"),
        lambda i: Case("too wide", send_images(wide_png), "image is 20000x60; each side must be 1 to 16384 pixels"),
        lambda i: Case("GIF", send_images(gif), "unsupported image format GIF; send JPEG or PNG"),
        lambda i: Case("BMP", send_images(bmp), "unsupported image format BMP; send JPEG or PNG"),
        lambda i: Case(
            "bad item in a batch",
            send_images(*[good_png] * (i % 3), b"\x00" * 64, good_png),
            f"image {i % 3} of {i % 3 + 2}: not a JPEG or PNG image",
        ),
        wrong_dtype,
        wrong_shape,
        lambda i: Case(
            "two per item",
            infer(lambda: [tensor(INPUT, np.array([[good_png, good_png]], dtype=np.object_), "BYTES")]),
            "Expected [-1,1], got [1,2]",
        ),
        lambda i: Case(
            "batch too large", send_images(*[b"x"] * (9 + i % 4)), "inference request batch-size must be <= 8"
        ),
        lambda i: Case("empty batch", send_raw(b"", (0, 1)), "expected 1 string elements"),
        lambda i: Case("missing input", infer(lambda: []), "missing required input(s) ['image_bytes']"),
        lambda i: Case(
            "unknown input",
            infer(lambda: [tensor(f"images_{i}", images(good_png), "BYTES")]),
            f"unexpected inference input 'images_{i}' for model 'freesolo'",
        ),
        lambda i: Case(
            "extra input",
            infer(lambda: [tensor(INPUT, images(good_png), "BYTES"), tensor("extra", images(b"x"), "BYTES")]),
            "expected 1 inputs but got 2 inputs for model 'freesolo'",
        ),
        lambda i: Case(
            "bad length prefix",
            send_raw(struct.pack("<I", 1000 + i) + b"abc"),
            f"expecting string of length {1000 + i} but only 3 bytes available",
        ),
        lambda i: Case("short prefix", send_raw(b"\x01\x00"), "incomplete string length indicator"),
        lambda i: Case(
            "trailing bytes", send_raw(struct.pack("<I", 3) + b"abc" + b"junk"), "unexpected number of string elements"
        ),
        lambda i: Case(
            "unknown model",
            infer(lambda: [tensor(INPUT, images(good_png), "BYTES")], model="freesolo_v2"),
            "Request for unknown model: 'freesolo_v2' is not found",
            "NOT_FOUND",
        ),
    ]
    cases = [make(i) for i in range(MIN_REQUESTS // len(kinds) + 1) for make in kinds]
    cases += [Case("oversized", send_images(huge), f"more than the limit of {MAX_IMAGE_BYTES}") for _ in range(4)]
    return cases


def wrong_dtype(i: int) -> Case:
    """A numeric tensor where encoded bytes belong."""
    dtype, name = [(np.float32, "FP32"), (np.int32, "INT32"), (np.uint8, "UINT8"), (np.float16, "FP16")][i % 4]
    expected = f"inference input 'image_bytes' data-type is '{name}', but model 'freesolo' expects 'BYTES'"
    return Case("wrong dtype", infer(lambda: [tensor(INPUT, np.zeros((1, 1), dtype), name)]), expected)


def wrong_shape(i: int) -> Case:
    """A rank other than [batch, 1]."""
    shape = [(1,), (1, 1, 1), (1, 1, 1, 1)][i % 3]
    data = images(b"\x89PNG").reshape(shape)
    got = ",".join(str(d) for d in shape)
    expected = f"unexpected shape for input 'image_bytes' for model 'freesolo'. Expected [-1,1], got [{got}]"
    return Case("wrong shape", infer(lambda: [tensor(INPUT, data, "BYTES")]), expected)


def outcome(case: Case, local: threading.local, url: str) -> str | None:
    """None when the server refused ``case`` as expected, else what went wrong."""
    if not hasattr(local, "connections"):
        local.connections = Connections(url)
    try:
        case.send(local.connections)
    except InferenceServerException as error:
        status, message = str(error.status()).removeprefix("StatusCode."), error.message() or ""
        if status != case.status or case.expected not in message:
            return f"{case.kind}: {status}: {message[:300]} (expected {case.status}: {case.expected})"
        return None
    return f"{case.kind}: accepted"


def test_bad_requests_fail_alone_with_clear_messages(shared_server: ServerState, pictures: list[np.ndarray]) -> None:
    url = shared_server.grpc_url
    valid = [pictures[4], pictures[0]]  # a photograph and a synthetic scene
    with FreeSOLOClient(url) as client:
        before = client.predict(valid)
    assert sum(len(found) for found in before) > 0
    stubs = family(shared_server.pid)
    assert len(stubs) >= 3  # one stub per python model
    statistics = grpc.InferenceServerClient(url)
    failed_before = int(statistics.get_inference_statistics(ENSEMBLE, as_json=True)["model_stats"][0]
                        ["inference_stats"]["fail"].get("count", 0))  # fmt: skip

    cases = bad_cases(encode(pictures[4], "PNG"), encode(pictures[4], "JPEG"), pictures[4])
    assert len(cases) >= MIN_REQUESTS
    random.Random(0).shuffle(cases)
    local = threading.local()
    with ThreadPoolExecutor(4) as pool:
        problems = [p for p in pool.map(lambda case: outcome(case, local, url), cases) if p]
    assert not problems, f"{len(problems)} of {len(cases)} requests:\n" + "\n".join(problems[:20])

    with FreeSOLOClient(url) as client:
        assert client.predict(valid) == before
    assert is_running(shared_server.pid, shared_server.started)
    assert family(shared_server.pid) == stubs  # no stub crashed and was restarted
    assert statistics.is_server_ready()
    assert all(statistics.is_model_ready(name) for name in (ENSEMBLE, PREPROCESS, MODEL, POSTPROCESS))
    failed_after = int(statistics.get_inference_statistics(ENSEMBLE, as_json=True)["model_stats"][0]
                       ["inference_stats"]["fail"].get("count", 0))  # fmt: skip
    reached_steps = sum(c.kind not in TRITON_CHECKED for c in cases)  # the rest Triton refuses before scheduling
    assert failed_after - failed_before >= reached_steps


TRITON_CHECKED = {
    "wrong dtype",
    "wrong shape",
    "two per item",
    "batch too large",
    "empty batch",
    "missing input",
    "unknown input",
    "extra input",
    "bad length prefix",
    "short prefix",
    "trailing bytes",
    "unknown model",
}


def resident_bytes(pids: set[int], field: str = "VmRSS") -> int:
    """The summed resident memory of ``pids``: now (VmRSS), or the highest each has had (VmHWM)."""
    total = 0
    for pid in pids:
        status = (PROC / str(pid) / "status").read_text()
        total += int(next(line.split()[1] for line in status.splitlines() if line.startswith(f"{field}:"))) * 1024
    return total


def test_postprocess_takes_only_what_preprocess_produced(
    shared_server: ServerState, pictures: list[np.ndarray]
) -> None:
    """Called directly (as any client may), postprocess refuses geometry that preprocess did not produce: sizes
    past the image limits, a resize the input policy would not give, or a made-up tag; K full masks at 4000 x 4000
    (which stalled the server) and 100000 x 100000 (a 74.5 GiB allocation) are refused before any allocation, and the
    server answers the next good request as before."""
    url = shared_server.grpc_url
    client = grpc.InferenceServerClient(url)
    config = client.get_model_config(POSTPROCESS, as_json=True)["config"]
    dims = {item["name"]: [int(d) for d in item["dims"]] for item in config["input"]}
    k = dims["raw_masks"][0]
    good = encode(pictures[5], "PNG")  # 400 x 600
    with FreeSOLOClient(url) as served:
        before = served.predict([good])
    made = client.infer(PREPROCESS, [tensor(INPUT, images(good), "BYTES")])
    geometry, tag = made.as_numpy(GEOMETRY), made.as_numpy(GEOMETRY_TAG)
    assert geometry.tolist() == [[400, 600, 85, 128]]

    def postprocess(geometry: list[int], tag: np.ndarray) -> np.ndarray:
        full_masks = np.ones((1, *dims["raw_masks"]), np.uint8)  # every detection's mask covers the whole input
        inputs = [
            tensor("raw_num_dets", np.array([[k]], np.int32), "INT32"),
            tensor("raw_scores", np.ones((1, k), np.float32), "FP32"),
            tensor("raw_labels", np.zeros((1, k), np.int32), "INT32"),
            tensor("raw_masks", full_masks, "UINT8"),
            tensor(GEOMETRY, np.array([geometry], np.int32), "INT32"),
            tensor(GEOMETRY_TAG, tag, "UINT8"),
        ]
        return client.infer(POSTPROCESS, inputs, client_timeout=60).as_numpy("num_dets")

    assert postprocess(geometry[0].tolist(), tag).tolist() == [[k]]  # what the ensemble could send goes through
    stubs = family(shared_server.pid)
    memory_before = resident_bytes(stubs | {shared_server.pid})
    forged = np.zeros_like(tag)
    sides = f"each side must be 1 to {MAX_IMAGE_SIDE}"
    cases = [
        ([4000, 4000, 128, 128], forged, "geometry_tag does not match"),
        ([4000, 4000, 128, 128], tag, "geometry_tag does not match"),  # a genuine tag binds its own geometry only
        ([100_000, 100_000, 128, 128], forged, sides),
        ([16_384, 16_384, 128, 128], forged, "at most 40000000 pixels"),
        ([0, 600, 85, 128], tag, sides),
        ([400, 600, 128, 128], tag, "a 400x600 image is resized to (85, 128)"),
        ([400, 600, 85, 129], tag, "a 400x600 image is resized to (85, 128)"),
    ]
    for geometry_values, tag_values, message in cases:
        with pytest.raises(InferenceServerException) as error:
            postprocess(geometry_values, tag_values)
        assert str(error.value.status()) == f"StatusCode.{INVALID}"
        said = error.value.message() or ""
        assert said.startswith("postprocess: image 0: ") and message in said, (geometry_values, said)
    growth = resident_bytes(stubs | {shared_server.pid}) - memory_before
    assert growth < 64 * 2**20, f"the refused requests grew the server by {growth / 2**20:.0f} MiB"
    assert family(shared_server.pid) == stubs  # no stub died
    with FreeSOLOClient(url) as served:
        assert served.predict([good]) == before


def test_oversized_messages_stop_at_the_gate(shared_server: ServerState) -> None:
    """tritonserver cannot bound a gRPC message (2 GB, compiled in), so the gate in front of it does: a message over
    MAX_MESSAGE_BYTES is refused with RESOURCE_EXHAUSTED before tritonserver receives any of it, and the gate does not
    hold it either (before the gate, 12 requests of 30 MB grew the server from 38 to 218 MB). An image just over the
    image limit still fits a message and gets preprocess's own refusal."""
    connections = Connections(shared_server.grpc_url)
    size = 150 * 2**20
    oversized = send_images(b"\x89PNG\r\n\x1a\n" + bytes(size - 8))
    server_before = resident_bytes({shared_server.pid})
    gate_peak_before = resident_bytes({shared_server.gate_pid}, "VmHWM")
    for _ in range(3):
        with pytest.raises(
            InferenceServerException, match=rf"larger than max \(\d+ vs\. {MAX_MESSAGE_BYTES}\)"
        ) as refused:
            oversized(connections)
        assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    server_growth = resident_bytes({shared_server.pid}) - server_before
    gate_growth = resident_bytes({shared_server.gate_pid}, "VmHWM") - gate_peak_before
    assert server_growth < 16 * 2**20, f"3 refused 150 MB messages grew the server by {server_growth / 2**20:.0f} MiB"
    assert gate_growth < size // 4, f"the gate's peak memory grew by {gate_growth / 2**20:.0f} MiB"
    just_over = send_images(b"\x89PNG\r\n\x1a\n" + bytes(MAX_IMAGE_BYTES))
    with pytest.raises(InferenceServerException, match=f"more than the limit of {MAX_IMAGE_BYTES}"):
        just_over(connections)
