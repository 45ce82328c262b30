"""The gRPC client library and `freesolo infer` against a real tritonserver (conftest's ``shared_server``: the
sharpened tiny model, python backend, loopback): batch 1 and 4, threads, asyncio and shared memory give the same
detections; retries happen on UNAVAILABLE only and end in a clear error; shared memory is cleaned up; `freesolo
infer` writes COCO results that pycocotools loads against the synthetic ground truth, and overlays."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from serving.contract import MAX_IMAGE_BYTES, MAX_REQUEST_IMAGE_BYTES
from serving.launcher import ServerState
from serving.server_binary import pytriton_root
from training.cli import main
from training.data.images import read_rgb
from training.data.synth import CATEGORIES

grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from serving.client import AsyncFreeSOLOClient, FreeSOLOClient, ImageInputError, ServingError, _ClientCore  # noqa: E402
from serving.client_images import encode_image  # noqa: E402

needs_server = pytest.mark.skipif(pytriton_root() is None, reason="no tritonserver (nvidia-pytriton)")
Results = list[list[dict[str, Any]]]

TORCH_BLOCKED = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None

sys.meta_path.insert(0, NoTorch())
import serving.client
assert "torch" not in sys.modules, "torch was imported"
print("ok", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnxruntime", "training")))
"""


def test_the_client_imports_without_torch() -> None:
    done = subprocess.run([sys.executable, "-c", TORCH_BLOCKED], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok []"


def test_a_file_over_the_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    huge = tmp_path / "huge.png"
    with huge.open("wb") as handle:  # sparse: 64 MiB long, no disk used
        handle.truncate(64 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(
            ImageInputError, match=f"{64 * 2**20} bytes, more than the server's limit of {MAX_IMAGE_BYTES}"
        ):
            encode_image(huge, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak} bytes allocated to refuse it"  # the file was never read
    with pytest.raises(ImageInputError, match="not a regular file"):
        encode_image(tmp_path, 0)


def test_other_formats_are_sent_as_the_pixels_predict_reads(tmp_path: Path) -> None:
    """A 16-bit greyscale TIFF is re-encoded by the one decoder (value >> 8), as `freesolo predict` reads the file;
    PIL's own convert("RGB") made every value above 255 white."""
    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    tiff = tmp_path / "ramp16.tif"
    Image.fromarray(ramp).save(tiff)  # mode I;16
    with Image.open(io.BytesIO(encode_image(tiff, 0))) as sent:
        assert sent.format == "PNG"
        pixels = np.asarray(sent)
    assert np.array_equal(pixels, read_rgb(tiff))
    assert np.array_equal(pixels[..., 0], (ramp >> 8).astype(np.uint8))


@pytest.fixture(scope="module")
def reference(shared_server: ServerState, pictures: list[np.ndarray]) -> Results:
    """Each picture alone (batch 1)."""
    with FreeSOLOClient(shared_server.grpc_url, max_batch=1) as client:
        return client.predict(pictures)


@needs_server
def test_detections_are_coco_results(reference: Results, pictures: list[np.ndarray]) -> None:
    assert sum(len(found) for found in reference) >= len(pictures)  # the comparisons below are not of empty sets
    for found, image in zip(reference, pictures, strict=True):
        for d in found:
            assert d["segmentation"]["size"] == list(image.shape[:2])
            assert d["bbox"] == [float(v) for v in mask_utils.toBbox(d["segmentation"])]  # xywh: the mask's box
            assert d["label"] == CATEGORIES[d["category_id"] - 1] and 0 < d["score"] <= 1


@needs_server
def test_batches_threads_asyncio_and_shared_memory_agree(
    shared_server: ServerState, pictures: list[np.ndarray], reference: Results
) -> None:
    url = shared_server.grpc_url
    with FreeSOLOClient(url, max_batch=4) as client:
        assert client.predict(pictures) == reference  # requests of 4 and 3
    with FreeSOLOClient(url, use_shared_memory=True) as client:
        assert client.predict(pictures) == reference  # one request of 7 through shared memory

    answers: dict[int, Results] = {}

    def worker(first: int) -> None:
        order = [(first + step) % len(pictures) for step in range(len(pictures))]
        with FreeSOLOClient(url, max_batch=1 + first % 3, use_shared_memory=first % 2 == 1) as client:
            answers[first] = [client.predict([pictures[i]])[0] for i in order[:3]] + client.predict(
                [pictures[i] for i in order[3:]]
            )

    threads = [threading.Thread(target=worker, args=(first,)) for first in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for first, results in answers.items():
        order = [(first + step) % len(pictures) for step in range(len(pictures))]
        assert results == [reference[i] for i in order], f"thread {first}"
    assert len(answers) == len(threads)

    async def concurrently(shared_memory: bool) -> list[Results]:
        async with AsyncFreeSOLOClient(url, max_batch=3, use_shared_memory=shared_memory) as client:
            return await asyncio.gather(client.predict(pictures), client.predict(pictures[::-1]))

    for shared_memory in (False, True):
        forward, backward = asyncio.run(concurrently(shared_memory))
        assert forward == reference and backward == reference[::-1]


def region_files() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"freesolo_{os.getpid()}_")}


@needs_server
def test_shared_memory_grows_and_is_cleaned_up(
    shared_server: ServerState, pictures: list[np.ndarray], reference: Results
) -> None:
    status = grpc.InferenceServerClient(shared_server.grpc_url)
    before = region_files()
    client = FreeSOLOClient(shared_server.grpc_url, use_shared_memory=True)
    assert client.predict([pictures[0]]) == reference[:1]  # a 128 px PNG: the smallest region
    assert client.region is not None
    small = client.region.name
    assert small in status.get_system_shared_memory_status(as_json=True).get("regions", {})
    noise = np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)  # ~1.4 MB as PNG
    assert len(client.predict([noise, pictures[4]])[1]) == len(reference[4])
    grown = client.region.name
    registered = status.get_system_shared_memory_status(as_json=True).get("regions", {})
    assert grown != small and grown in registered and small not in registered
    assert region_files() - before == {grown}
    client.close()
    assert grown not in status.get_system_shared_memory_status(as_json=True).get("regions", {})
    assert region_files() == before

    for _ in range(25):  # closing right after a response: the server may still hold the region for a moment
        with FreeSOLOClient(shared_server.grpc_url, use_shared_memory=True) as client:
            client.predict([pictures[0]])
    assert not any(
        name.startswith(f"freesolo_{os.getpid()}_")
        for name in status.get_system_shared_memory_status(as_json=True).get("regions", {})
    )
    assert region_files() == before


@needs_server
def test_retries_on_unavailable_only(
    shared_server: ServerState, pictures: list[np.ndarray], reference: Results
) -> None:
    with FreeSOLOClient(shared_server.grpc_url, retries=2, backoff_s=0.01) as client:
        real, calls = client._grpc.infer, []

        def flaky(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) <= 2:
                raise InferenceServerException("overloaded", status="StatusCode.UNAVAILABLE")
            return real(*args, **kwargs)

        client._grpc.infer = flaky
        assert client.predict([pictures[4]]) == [reference[4]] and len(calls) == 3

        calls.clear()
        client._grpc.infer = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
        with pytest.raises(ServingError) as error:
            client.predict([pictures[0], b"GIF89a not a picture", pictures[1]])
        assert len(calls) == 1  # a rejected request is not sent again
        assert error.value.status == "INVALID_ARGUMENT" and error.value.image_index == 1
        assert "image 1 of 3: not a JPEG or PNG image" in error.value.server_message
        assert str(error.value).startswith("image 1: ")

    with FreeSOLOClient(shared_server.grpc_url, timeout_s=0.001) as client, pytest.raises(ServingError) as error:
        client.predict([pictures[4]])  # no retry: a request past its deadline may still be running
    assert error.value.status == "DEADLINE_EXCEEDED" and "within 0.001 s" in str(error.value)

    with FreeSOLOClient(shared_server.grpc_url) as client, pytest.raises(ImageInputError, match="H x W x 3 uint8"):
        client.predict([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(TypeError, match="list of images"):
        FreeSOLOClient(shared_server.grpc_url).predict("photo.png")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="more than the server's max_batch_size 8"):
        FreeSOLOClient(shared_server.grpc_url, max_batch=9).predict([pictures[0]])


def test_a_closed_port_fails_clearly_after_the_retries(free_ports: Callable[[int], list[int]]) -> None:
    url = f"127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    begin = time.monotonic()
    with pytest.raises(ServingError) as error, FreeSOLOClient(url, timeout_s=5, retries=3, backoff_s=0.05) as client:
        client.predict([b"never sent"])
    assert time.monotonic() - begin < 5
    assert error.value.status == "UNAVAILABLE"
    assert f"cannot reach the Triton server at {url}" in str(error.value) and "4 attempts" in str(error.value)

    async def attempt() -> None:
        async with AsyncFreeSOLOClient(url, timeout_s=5, retries=1, backoff_s=0.05) as client:
            await client.predict([b"never sent"])

    with pytest.raises(ServingError, match="2 attempts"):
        asyncio.run(attempt())


@needs_server
def test_infer_writes_coco_results_and_overlays(
    shared_server: ServerState, synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = sorted((synth_data / "val").iterdir())
    out, vis = tmp_path / "preds.json", tmp_path / "vis"
    url = ["--url", shared_server.grpc_url]
    argv = [
        "infer",
        *url,
        *map(str, files),
        "--out",
        str(out),
        "--ann",
        str(synth_data / "val.json"),
        "--vis",
        str(vis),
    ]
    assert main([*argv, "--batch-size", "3", "--shared-memory"]) == 0
    assert f"in {len(files)} images from {shared_server.grpc_url}" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results and {r["file_name"] for r in results} <= {str(f) for f in files}
    ground_truth = COCO(str(synth_data / "val.json"))
    loaded = ground_truth.loadRes(json.loads(out.read_text()))  # asserts the ids belong to the ground truth
    evaluator = COCOeval(ground_truth, loaded, "segm")
    evaluator.evaluate()
    evaluator.accumulate()
    assert sorted(p.name for p in vis.iterdir()) == [f"{i:04d}_{f.stem}.png" for i, f in enumerate(files)]

    with FreeSOLOClient(shared_server.grpc_url) as client:
        expected = client.predict(files)
    by_image = {image["file_name"]: image["id"] for image in ground_truth.dataset["images"]}
    assert results == [
        {"image_id": by_image[f.name], "category_id": d["category_id"], "segmentation": d["segmentation"],
         "bbox": d["bbox"], "score": d["score"], "file_name": str(f)}
        for f, found in zip(files, expected, strict=True) for d in found
    ]  # fmt: skip

    assert main(["infer", *url, str(synth_data / "val"), "--out", str(out)]) == 0  # a folder; ids are indices
    assert {r["image_id"] for r in json.loads(out.read_text())} <= set(range(len(files)))


@needs_server
def test_infer_errors_name_the_problem(
    shared_server: ServerState,
    synth_data: Path,
    free_ports: Callable[[int], list[int]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good = sorted((synth_data / "val").iterdir())[0]
    truncated, junk = tmp_path / "truncated.png", tmp_path / "junk.png"
    truncated.write_bytes(good.read_bytes()[:400])
    junk.write_bytes(b"not an image at all")
    out = str(tmp_path / "preds.json")
    closed = f"127.0.0.1:{free_ports(1)[0]}"
    cases = [
        (["--url", closed, str(good), "--retries", "1"], f"cannot reach the Triton server at {closed}"),
        (["--url", shared_server.grpc_url, str(tmp_path / "missing.png")], "image not found: "),
        (["--url", shared_server.grpc_url, str(good), str(junk)], f"cannot send {junk}: not an image"),
        (["--url", shared_server.grpc_url, str(good), str(truncated)], f"the server refused {truncated}: "),
        (["--url", shared_server.grpc_url, str(good), "--batch-size", "9"], "more than the server's max_batch_size"),
        (["--url", shared_server.grpc_url, str(good), "--ann", str(tmp_path / "gt.json")], "file not found"),
    ]
    for argv, message in cases:
        assert main(["infer", *argv, "--out", out]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("freesolo infer: error: ") and message in err, err
    assert not Path(out).exists()


def test_requests_stay_under_the_gates_message_limit() -> None:
    """A batch is split so that no request carries more than MAX_REQUEST_IMAGE_BYTES of images (the gate refuses
    larger messages): 8 MB images go two to a request, small ones up to the batch size."""
    core = _ClientCore("127.0.0.1:1", "freesolo", 10.0, 0, None, False, 0.0)
    big, small = bytes(8 * 2**20), bytes(1000)
    split = [(start, len(items)) for start, items in core.chunks([big, big, big, small, small], size=4)]
    assert split == [(0, 2), (2, 3)]
    assert all(sum(map(len, items)) <= MAX_REQUEST_IMAGE_BYTES for _, items in core.chunks([big] * 5, size=8))
    assert [len(items) for _, items in core.chunks([small] * 9, size=4)] == [4, 4, 1]
