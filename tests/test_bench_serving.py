"""The serving load generator and the reliability scenarios against real tritonservers on loopback (conftest's
``shared_server`` and one server of its own, killed with SIGKILL): counts, detections with and without shared
memory, errors counted with the server's words, a soak without errors, and a killed server that fails its clients
fast and comes back through the CLI with the same answers and nothing left behind."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.loadgen import LoadSpec, generate
from benchmarks.loadgen import main as loadgen
from benchmarks.serving_reliability import MB, kill_and_restart, mixed_markdown, mixed_soak, oversize, soak
from benchmarks.serving_setup import photographs
from serving.launcher import ServerState
from serving.server_binary import pytriton_root

pytestmark = pytest.mark.skipif(pytriton_root() is None, reason="no tritonserver (nvidia-pytriton)")


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return list(photographs().values())


def test_request_count_mode_answers_exactly_n(shared_server: ServerState, images: list[bytes]) -> None:
    result = generate(LoadSpec(shared_server.grpc_url, images, concurrency=3, requests=10))
    assert (result.ok, result.error_count, result.mismatches) == (10, 0, 0)
    assert result.latency["runs"] == 10 and result.images_per_s > 0
    assert sorted(result.answers) == list(range(len(images)))
    assert any(result.answers.values()), "the lively model finds objects in the photographs"


def test_shared_memory_gives_the_same_detections(shared_server: ServerState, images: list[bytes]) -> None:
    runs = {
        shm: generate(LoadSpec(shared_server.grpc_url, images, 2, requests=2 * len(images), shared_memory=shm))
        for shm in (False, True)
    }
    assert all(r.error_count == 0 and r.mismatches == 0 for r in runs.values())
    assert runs[True].answers == runs[False].answers


def test_errors_are_counted_with_the_servers_message(shared_server: ServerState, images: list[bytes]) -> None:
    corrupt = generate(LoadSpec(shared_server.grpc_url, [images[0], b"not an image"], requests=4, warmup=0))
    assert (corrupt.ok, corrupt.error_count) == (2, 2)
    [(kind, error)] = corrupt.errors.items()
    assert kind.startswith("INVALID_ARGUMENT: ") and error.count == 2
    assert "image" in kind and "image" in error.first

    unknown = generate(LoadSpec(shared_server.grpc_url, images, 2, requests=3, model="no_such_model", warmup=0))
    assert (unknown.ok, unknown.error_count) == (0, 3)
    [kind] = unknown.errors
    assert "no_such_model" in kind


def test_the_cli_writes_a_table_per_point(shared_server: ServerState, images: list[bytes], tmp_path: Path) -> None:
    files = []
    for index, data in enumerate(images[:2]):
        files.append(tmp_path / f"{index}.jpg")
        files[-1].write_bytes(data)
    argv = ["--url", shared_server.grpc_url, *map(str, files), "--concurrency", "1,2", "--requests", "3"]
    assert loadgen([*argv, "--shared-memory", "off,on", "--out", str(tmp_path / "out")]) == 0
    points = json.loads((tmp_path / "out" / "loadgen.json").read_text())["points"]
    assert [(p["concurrency"], p["shared_memory"], p["ok"]) for p in points] == [
        (1, False, 3),
        (1, True, 3),
        (2, False, 3),
        (2, True, 3),
    ]
    assert (tmp_path / "out" / "loadgen.md").read_text().count("\n| ") == 4 + 1  # header and one row per point


def test_a_short_soak_has_no_errors_and_a_memory_figure(shared_server: ServerState, images: list[bytes]) -> None:
    result = soak(shared_server, images, duration_s=2.0, clients=4)
    assert result["ok"] > 0 and result["errors"] == 0 and result["mismatches"] == 0
    assert result["server_rss_mb_after_warmup"] > 0 and result["server_rss_mb_at_end"] > 0
    assert result["server_processes"] == 4  # tritonserver and the stubs of preprocess, model and postprocess


def test_a_mixed_soak_refuses_every_bad_request_and_no_good_one(
    shared_server: ServerState, images: list[bytes]
) -> None:
    """The quick mixed soak: good clients beside bad ones (bounded: 2 s, 7 bad requests each, one of every kind),
    then oversized images; the good requests see no error, every bad one is refused, the figures are reported."""
    result = mixed_soak(shared_server, images, duration_s=2.0, bad_per_client=7, clients=6, bad_clients=2)
    assert result["good_ok"] > 0 and result["good_errors"] == 0 and result["good_mismatches"] == 0
    assert result["bad"] == {"sent": 14, "refused": 14, "unexpected": {}}
    assert result["good_p99_ms"] > 0 and result["server_rss_mb_before"] > 0 and result["server_rss_mb_after"] > 0
    big = oversize(shared_server, images, count=1, size_bytes=21 * MB)
    assert big["refused_by_size"] == 1 and big["good_request_answered_after"]
    assert big["server_rss_mb_after"] > 0 and "server_rss_growth_mb" in big
    page = "\n".join(mixed_markdown(result, big))
    assert "| good requests | good errors |" in page and "refused for their size" in page


def test_a_killed_server_fails_fast_and_the_cli_brings_it_back(
    start_triton: Callable[[Path], ServerState], dynamic_onnx: Path, images: list[bytes]
) -> None:
    state = start_triton(dynamic_onnx)
    result = kill_and_restart(Path(state.log).parent, images, clients=3, timeout_s=60.0)
    # every call ended by the failure, none by its deadline, each naming the server as unavailable
    assert result["failed"] > 0 and result["error_statuses"] == ["UNAVAILABLE"]
    assert all(f"Triton server at {state.grpc_url}" in text for text in result["error_kinds"].values())
    assert any("is unavailable" in text for text in result["error_kinds"].values())
    assert result["restart_exit_code"] == 0
    assert result["stale_stubs_running_after_restart"] == [] and result["stale_regions_after_restart"] == []
    assert any(result["detections_before"]) and result["same_detections_after_restart"]
    assert result["errors_after_restart"] == 0
    assert result["stop_exit_code"] == 0 and result["processes_left_after_stop"] == []
