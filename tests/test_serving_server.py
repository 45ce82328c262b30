"""End to end on a real tritonserver (the one bundled in nvidia-pytriton, python backend, loopback only): export a
model, `serve prepare --backend python`, `serve start`, send encoded images over gRPC (batch 1, batch 4, concurrent
clients, bad requests), compare with PyTorch's COCO results for the same checkpoint at the original image size,
`serve stop`, and check that no process is left. Plus the start-up failures a user meets: a taken port, a folder
that is no repository, a config Triton cannot parse and a model that fails to load.

The model is conftest's ``dynamic_onnx`` (the sharpened ``lively_checkpoint``, so every image has detections to
compare), which ``serve prepare`` serves dynamic: each image on its own canvas, as ``freesolo predict`` sees it; the
images of one request share one canvas (the largest among them)."""

from __future__ import annotations

import io
import re
import shutil
import socket
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from export.parity import greedy_match
from serving.contract import ENSEMBLE, INPUT, OUTPUT_NAMES
from serving.launcher import SHM_DIR, STUB_REGION, ServerState, mapped_regions, read_state
from serving.processes import PROC, command_line, family, is_running
from serving.server_binary import pytriton_root
from training.cli import main
from training.data.batching import pad_to
from training.data.transforms import resize_image, to_tensor_image
from training.geometry import InputPolicy, padded_shape
from training.inference import Predictor
from training.results import image_results

grpc = pytest.importorskip("tritonclient.grpc")
pytestmark = pytest.mark.skipif(
    pytriton_root() is None and shutil.which("tritonserver") is None, reason="no tritonserver (nvidia-pytriton)"
)


def port_arguments(ports: list[int]) -> list[str]:
    return ["--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]


def prepare(onnx_path: Path, repo: Path) -> None:
    args = ["serve", "prepare", "--onnx", str(onnx_path), "--repo", str(repo), "--max-batch", "8", "--threads", "1"]
    assert main(args) == 0


@pytest.fixture(scope="module")
def server(dynamic_onnx: Path, start_triton: Callable[[Path], ServerState]) -> Iterator[dict]:
    """This module's own server (its last tests stop it)."""
    state = start_triton(dynamic_onnx)
    repo = Path(state.log).parent
    try:
        yield {"repo": repo, "ports": [state.http_port, state.grpc_port, state.metrics_port], "url": state.grpc_url}
    finally:
        main(["serve", "stop", "--repo", str(repo)])


def encode(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def predictor(lively_checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(lively_checkpoint)


def pytorch_results(predictor: Predictor, images: list[np.ndarray], shared: bool) -> list[list[dict[str, Any]]]:
    """PyTorch's COCO results of each image at its original size: each on its own canvas (as ``predict``), or
    ``shared``: all in one batch on the largest canvas among them (as one request to a dynamic server)."""
    config = predictor.config.input
    policy = InputPolicy(-1, -1, True, config.test_size, config.max_size)
    geometries = [policy.geometry(*image.shape[:2]) for image in images]
    inputs = [
        resize_image(to_tensor_image(image), (g.resized_height, g.resized_width))
        for image, g in zip(images, geometries, strict=True)
    ]
    canvases = [policy.canvas(g) for g in geometries]
    if shared:
        canvases = [padded_shape(canvases, divisor=1)] * len(images)
    results = []
    for i, (tensor, canvas) in enumerate(zip(inputs, canvases, strict=True)):
        dets, _ = predictor.detections(pad_to(tensor, canvas)[None])
        results.append(image_results(int(dets.num_dets[0]), dets.scores[0].numpy(), dets.labels[0].numpy(),
                                     dets.masks[0].numpy(), geometries[i], i, predictor.category_ids))  # fmt: skip
    return results


@pytest.fixture(scope="module")
def reference(predictor: Predictor, pictures: list[np.ndarray]) -> list[list[dict[str, Any]]]:
    """PyTorch's COCO results of each picture on its own canvas."""
    return pytorch_results(predictor, pictures, shared=False)


def infer(url: str, images: list[bytes]) -> list[dict[str, np.ndarray]]:
    """One request carrying ``images``; the per-image outputs."""
    client = grpc.InferenceServerClient(url)
    data = np.array([[image] for image in images], dtype=np.object_)
    tensor = grpc.InferInput(INPUT, list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    result = client.infer(ENSEMBLE, [tensor])
    outputs = {name: result.as_numpy(name) for name in OUTPUT_NAMES}
    return [{name: array[i] for name, array in outputs.items()} for i in range(len(images))]


def differences(served: dict[str, np.ndarray], expected: list[dict[str, Any]], image: np.ndarray) -> list[str]:
    """What differs between one served image and PyTorch's results: count within 1, at most one unmatched
    detection a side, matched masks at IoU >= 0.98 (same label), scores within 5e-3; each box is its mask's."""
    height, width = image.shape[:2]
    count = int(served["num_dets"][0])
    problems = []
    if served["image_size"].tolist() != [height, width]:
        problems.append(f"image_size {served['image_size'].tolist()}")
    if any(served["masks_rle"][count:]) or served["scores"][count:].any():
        problems.append("outputs past num_dets are not empty")
    ours = [{"size": [height, width], "counts": served["masks_rle"][i]} for i in range(count)]
    theirs = [{"size": [height, width], "counts": r["segmentation"]["counts"].encode()} for r in expected]
    if abs(count - len(theirs)) > 1:
        problems.append(f"{count} detections served, {len(theirs)} from PyTorch")
    if not ours or not theirs:
        return problems
    iou = np.asarray(mask_utils.iou(ours, theirs, [0] * len(theirs)))
    labels = np.array([int(served["labels"][i]) + 1 for i in range(count)])  # category ids are label + 1 here
    pairs = greedy_match(iou, labels[:, None] == np.array([r["category_id"] for r in expected])[None, :])
    if max(count, len(theirs)) - len(pairs) > 1:
        problems.append(f"only {len(pairs)} of {count} / {len(theirs)} detections match")
    worst_iou = min(iou[i, j] for i, j in pairs)
    worst_score = max(abs(float(served["scores"][i]) - expected[j]["score"]) for i, j in pairs)
    if worst_iou < 0.98 or worst_score > 5e-3:
        problems.append(f"matched mask IoU {worst_iou:.4f}, score difference {worst_score:.2e}")
    for i in range(count):
        x, y, w, h = mask_utils.toBbox(ours[i])
        if served["boxes"][i].tolist() != [x, y, x + w, y + h]:
            problems.append(f"box {served['boxes'][i].tolist()} is not its mask's {[x, y, x + w, y + h]}")
    return problems


def test_batch_of_one_matches_pytorch(server: dict, pictures: list[np.ndarray], reference: list) -> None:
    total = 0
    for index, image in enumerate(pictures):
        (served,) = infer(server["url"], [encode(image)])
        assert not differences(served, reference[index], image), f"picture {index}"
        total += int(served["num_dets"][0])
    assert total >= len(pictures)  # the comparison is not of empty sets


def test_batch_of_four_matches_pytorch(server: dict, pictures: list[np.ndarray], predictor: Predictor) -> None:
    picks = [4, 5, 0, 6]  # astronaut, coffee, a synthetic scene, chelsea: one request, one (the largest) canvas
    served = infer(server["url"], [encode(pictures[i]) for i in picks])
    expected = pytorch_results(predictor, [pictures[i] for i in picks], shared=True)
    for item, index, theirs in zip(served, picks, expected, strict=True):
        assert not differences(item, theirs, pictures[index]), f"picture {index}"


def test_concurrent_clients_get_their_own_answers(server: dict, pictures: list, reference: list) -> None:
    failures: list[str] = []

    def client(first: int) -> None:
        try:
            for step in range(3):  # one image a request (on its own canvas), batched by the server across clients
                picks = [(first + 2 * step + step % 2) % len(pictures)]
                for item, index in zip(infer(server["url"], [encode(pictures[i]) for i in picks]), picks, strict=True):
                    failures.extend(f"client {first}, picture {index}: {p}"
                                    for p in differences(item, reference[index], pictures[index]))  # fmt: skip
        except Exception as error:  # surfaced by the assertion below
            failures.append(f"client {first}: {error}")

    threads = [threading.Thread(target=client, args=(first,)) for first in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` (a decompression bomb's header, CRC fixed)."""
    data = bytearray(encode(np.zeros((1, 1, 3), np.uint8)))
    start = data.index(b"IHDR")
    data[start + 4 : start + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[start + 17 : start + 21] = zlib.crc32(bytes(data[start : start + 17])).to_bytes(4, "big")
    return bytes(data)


def test_bad_requests_fail_alone_and_the_server_stays_up(server: dict, pictures: list[np.ndarray]) -> None:
    good = encode(pictures[0])
    cases = [
        ([b""], "preprocess: image: empty image (0 bytes)"),
        ([b"GIF89a nonsense"], "not a JPEG or PNG image"),
        ([encode(pictures[4])[:5000]], "truncated"),
        ([png_claiming(30_000, 30_000)], "pixels (decompression-bomb guard)"),
        ([good, b"\x00" * 100], "image 1 of 2"),
    ]
    for images, message in cases:
        with pytest.raises(grpc.InferenceServerException, match=re.escape(message)) as error:
            infer(server["url"], images)
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert grpc.InferenceServerClient(server["url"]).is_server_ready()
    assert int(infer(server["url"], [good])[0]["num_dets"][0]) >= 0


def test_status_and_a_second_start(
    server: dict, free_ports: Callable[[int], list[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["serve", "status", "--repo", str(server["repo"])]) == 0
    out = capsys.readouterr().out
    assert "ready" in out and all(f"{m} v1: READY" in out for m in ("freesolo", "preprocess", "model", "postprocess"))
    assert main(["serve", "start", "--repo", str(server["repo"]), *port_arguments(free_ports(3))]) == 2
    assert "already runs" in capsys.readouterr().err


def test_stop_leaves_no_process(server: dict, capsys: pytest.CaptureFixture[str]) -> None:
    state = read_state(server["repo"])
    assert state is not None
    children = family(state.pid)
    assert len(children) >= 3  # a stub per python model
    assert is_running(state.gate_pid, state.gate_started)
    assert main(["serve", "stop", "--repo", str(server["repo"])]) == 0
    assert not is_running(state.pid) and not any(is_running(pid) for pid in children)
    assert not is_running(state.gate_pid)
    assert read_state(server["repo"]) is None
    assert main(["serve", "status", "--repo", str(server["repo"])]) == 1
    assert f"stopped tritonserver pid {state.pid}" in capsys.readouterr().out


def test_a_taken_port_is_named(
    tmp_path: Path, free_ports: Callable[[int], list[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text('name: "m"\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = free_ports(3)
        ports[1] = taken.getsockname()[1]
        assert main(["serve", "start", "--repo", str(tmp_path), *port_arguments(ports)]) == 2
    assert f"--grpc-port {ports[1]} on 127.0.0.1 is already in use" in capsys.readouterr().err


def test_invalid_repositories_are_explained(
    dynamic_onnx: Path,
    cache_home: Path,
    free_ports: Callable[[int], list[int]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "start", "--repo", str(tmp_path), *port_arguments(free_ports(3))]) == 2
    assert "holds no model" in capsys.readouterr().err

    broken = tmp_path / "broken"
    (broken / "bad").mkdir(parents=True)
    (broken / "bad" / "config.pbtxt").write_text('name: "bad"\nbackend: "python"\nmax_batch_size: lots\n')
    assert main(["serve", "start", "--repo", str(broken), *port_arguments(free_ports(3))]) == 2
    err = capsys.readouterr().err
    assert "tritonserver exited" in err and "Expected integer, got: lots" in err and "'bad'" in err

    repo = tmp_path / "repo"
    prepare(dynamic_onnx, repo)
    (repo / "model" / "1" / "model.onnx").unlink()
    assert main(["serve", "start", "--repo", str(repo), *port_arguments(free_ports(3))]) == 2
    err = capsys.readouterr().err
    assert "failed to load 'model'" in err and "model.onnx not found" in err
    assert read_state(repo) is None  # nothing left running


def backend_regions() -> set[str]:
    return {entry.name for entry in SHM_DIR.iterdir() if STUB_REGION.fullmatch(entry.name)}


def test_a_start_that_times_out_leaves_no_process_and_no_shared_memory(
    dynamic_onnx: Path,
    cache_home: Path,
    free_ports: Callable[[int], list[int]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A start that waits out its timeout because no stub ever comes up (here a python environment whose activation
    fails; a repository path with a space did the same) stops the server and unlinks the python backend's regions
    in /dev/shm, which the server, stopped mid-load, leaves behind (3 per start before)."""
    broken_env = tmp_path / "env"
    (broken_env / "bin").mkdir(parents=True)
    (broken_env / "bin" / "activate").write_text("return 1\n")
    repo = tmp_path / "repo"
    prepare_args = ["serve", "prepare", "--onnx", str(dynamic_onnx), "--repo", str(repo), "--threads", "1"]
    assert main([*prepare_args, "--python-env", str(broken_env)]) == 0
    before = backend_regions()
    args = ["serve", "start", "--repo", str(repo), *port_arguments(free_ports(3)), "--timeout", "10"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "was not ready after 10 s" in err
    live = {int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit()}
    leaked = backend_regions() - before - mapped_regions(live)  # other servers' regions are mapped by them
    assert not leaked, f"left in /dev/shm: {sorted(leaked)}"
    assert read_state(repo) is None
    assert not [pid for pid in live if is_running(pid) and any(str(repo) in arg for arg in command_line(pid))]
