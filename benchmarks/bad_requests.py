"""The bad requests a mixed soak sends beside the good ones: what an attacker or a broken client could send over
loopback, each one that the server must refuse alone (INVALID_ARGUMENT) without slowing the good requests down.

Kinds: corrupt bytes, a PNG header claiming 50000 x 50000 pixels, a truncated JPEG, a wrong dtype, corrupt bytes
straight to ``preprocess``, and ``postprocess`` called directly with K full masks and a made-up geometry (4000 x 4000,
which stalled the server before its geometry was checked, and 100000 x 100000). An oversized image (over the 20 MB
limit) is sent apart, by ``oversize_requests``, to measure what it costs the server's memory.
"""

from __future__ import annotations

import io
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from serving.contract import ENSEMBLE, GEOMETRY, GEOMETRY_TAG, INPUT, MAX_IMAGE_BYTES, POSTPROCESS, PREPROCESS
from serving.step_guard import TAG_BYTES

Send = Callable[[], None]


@dataclass
class BadResult:
    """What the bad clients saw: requests sent, refused as expected, and anything else (which should not happen)."""

    sent: int = 0
    refused: int = 0
    unexpected: dict[str, int] = field(default_factory=dict)

    def row(self) -> dict:
        return {"sent": self.sent, "refused": self.refused, "unexpected": dict(self.unexpected)}


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` (CRC fixed, so only the size lies)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IHDR")
    data[start + 4 : start + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[start + 17 : start + 21] = zlib.crc32(bytes(data[start : start + 17])).to_bytes(4, "big")
    return bytes(data)


def tensor(grpc: object, name: str, array: np.ndarray, datatype: str) -> object:
    item = grpc.InferInput(name, list(array.shape), datatype)  # type: ignore[attr-defined]
    item.set_data_from_numpy(array)
    return item


def encoded(*items: bytes) -> np.ndarray:
    array = np.empty((len(items), 1), dtype=np.object_)
    array[:, 0] = items
    return array


def senders(url: str, good_jpeg: bytes) -> dict[str, Send]:
    """kind -> a call that sends one bad request of that kind (raising InferenceServerException when refused)."""
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(url)
    config = client.get_model_config(POSTPROCESS, as_json=True)["config"]
    masks = next([int(d) for d in item["dims"]] for item in config["input"] if item["name"] == "raw_masks")
    k, masks = masks[0], [d if d > 0 else 32 for d in masks]  # a dynamic model's -1: the masks of a 128 px canvas

    def ensemble(data: bytes) -> Send:
        return lambda: client.infer(ENSEMBLE, [tensor(grpc, INPUT, encoded(data), "BYTES")], client_timeout=60)

    def postprocess(geometry: list[int]) -> Send:
        inputs = [
            tensor(grpc, "raw_num_dets", np.array([[k]], np.int32), "INT32"),
            tensor(grpc, "raw_scores", np.ones((1, k), np.float32), "FP32"),
            tensor(grpc, "raw_labels", np.zeros((1, k), np.int32), "INT32"),
            tensor(grpc, "raw_masks", np.ones((1, *masks), np.uint8), "UINT8"),
            tensor(grpc, GEOMETRY, np.array([geometry], np.int32), "INT32"),
            tensor(grpc, GEOMETRY_TAG, np.zeros((1, TAG_BYTES), np.uint8), "UINT8"),
        ]
        return lambda: client.infer(POSTPROCESS, inputs, client_timeout=60)

    wrong_dtype = [tensor(grpc, INPUT, np.zeros((1, 1), np.float32), "FP32")]
    corrupt_direct = [tensor(grpc, INPUT, encoded(b"\x00" * 512), "BYTES")]
    return {
        "corrupt": ensemble(bytes(range(256)) * 8),
        "bomb header": ensemble(png_claiming(50_000, 50_000)),
        "truncated JPEG": ensemble(good_jpeg[: len(good_jpeg) // 3]),
        "wrong dtype": lambda: client.infer(ENSEMBLE, wrong_dtype, client_timeout=60),
        "preprocess directly": lambda: client.infer(PREPROCESS, corrupt_direct, client_timeout=60),
        "postprocess 4000x4000": postprocess([4000, 4000, 128, 128]),
        "postprocess 100000x100000": postprocess([100_000, 100_000, 128, 128]),
    }


def run_bad_clients(
    url: str, good_jpeg: bytes, clients: int, per_client: int, stop: threading.Event, result: BadResult
) -> list[threading.Thread]:
    """Start ``clients`` threads, each sending up to ``per_client`` bad requests (the kinds in turn) until ``stop``."""
    from tritonclient.utils import InferenceServerException

    lock = threading.Lock()

    def client(offset: int) -> None:
        kinds = list(senders(url, good_jpeg).items())
        for index in range(per_client):
            if stop.is_set():
                return
            kind, send = kinds[(offset + index) % len(kinds)]
            outcome = None
            try:
                send()
                outcome = f"{kind}: accepted"
            except InferenceServerException as error:
                if str(error.status()) != "StatusCode.INVALID_ARGUMENT":
                    outcome = f"{kind}: {error.status()}"
            with lock:
                result.sent += 1
                if outcome is None:
                    result.refused += 1
                else:
                    result.unexpected[outcome] = result.unexpected.get(outcome, 0) + 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    return threads


def oversize_requests(url: str, count: int, size_bytes: int) -> tuple[int, float]:
    """Send ``count`` images of ``size_bytes`` (over the limit) to the ensemble one after the other; returns how
    many were refused for their size (by the gRPC gate when the message is over ``MAX_MESSAGE_BYTES``, else by
    preprocess's byte limit) and the seconds it took."""
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    if size_bytes <= MAX_IMAGE_BYTES:
        raise ValueError(f"an oversize request must be over {MAX_IMAGE_BYTES} bytes")
    client = grpc.InferenceServerClient(url)
    data = b"\x89PNG\r\n\x1a\n" + bytes(size_bytes - 8)
    refused = 0
    started = time.perf_counter()
    for _ in range(count):
        try:
            client.infer(ENSEMBLE, [tensor(grpc, INPUT, encoded(data), "BYTES")], client_timeout=120)
        except InferenceServerException as error:
            said = error.message() or ""
            refused += f"more than the limit of {MAX_IMAGE_BYTES}" in said or "larger than max" in said
    return refused, round(time.perf_counter() - started, 2)
