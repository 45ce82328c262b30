"""Serving reliability: a soak under concurrent load, a mixed soak of good and bad requests, oversized requests,
and a server killed mid-load and brought back by the CLI.

- Soak: 8 concurrent clients (half with system shared memory) send images back to back for a fixed duration (60 s;
  quick 5 s) after a warm-up. Every request must be answered (errors: 0) with the same detections each time
  (mismatches: 0). Server memory: the resident set (VmRSS) of tritonserver and its python-backend stubs after the
  warm-up and at the end.
- Mixed soak: 16 clients, 12 sending good images (half with shared memory) and 4 sending bad requests
  (``benchmarks.bad_requests``: corrupt and lying images, wrong dtypes, internal steps called directly with made-up
  sizes), bounded in time (30 s; quick 5 s) and in count (each bad client at most 200 requests; quick 20). The good
  requests' errors must be 0 and every bad one refused with INVALID_ARGUMENT; reported: the good requests' p50/p99
  and the server's memory growth.
- Oversize: images over the 20 MB limit (3 of 100 MB; quick 2 of 25 MB) sent to the ensemble one after another.
  tritonserver 2.51 has no flag that bounds a gRPC message (its ``--help`` lists none; messages up to 2 GB are
  accepted), so each is refused only by preprocess: reported is what they cost the server's memory.
- Kill: a few clients load the same server, it gets SIGKILL mid-load. Every call in flight and every one after
  must end with a ServingError naming the server unavailable (status UNAVAILABLE, not a timeout). Then
  ``freesolo serve start`` on the same repository and ports (the CLI, in this process) must start it again although
  the state file is stale and the dead server's stubs and shared-memory regions are still there; the same images
  must get the same detections as before the kill, and ``freesolo serve stop`` must leave no process of either
  server running.

The model: the benchmark's trained tiny model (``benchmarks.bench_model``) when it is there, so that detections
are compared, else the tiny preset's random weights; served at 128x128 by the pip-bundled tritonserver.

    .venv/bin/python -m benchmarks.serving_reliability --out runs/bench [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.bad_requests import BadResult, oversize_requests, run_bad_clients
from benchmarks.loadgen import Load, LoadResult, LoadSpec, generate
from benchmarks.reporting import machine, part_parser, utc_now, write_report
from benchmarks.serving_setup import cached_export, free_ports, photographs, progress
from serving.contract import MAX_IMAGE_BYTES, MAX_MESSAGE_BYTES
from serving.launcher import SHM_DIR, STUB_REGION, ServerState, read_state
from serving.processes import PROC, command_line, family, is_running
from serving.repository import Settings, prepare_repository
from training.cli import main as freesolo

STEM = "serving_reliability"
BENCH_MODEL = Path("runs/bench/model/supervised/model.pt")
SIZE = 128
SOAK_CLIENTS = 8
KILL_CLIENTS = 3
KILL_TIMEOUT_S = 10.0
KILL_REQUESTS = 60  # the kill comes after the first answers; the rest fail fast
MIXED_CLIENTS = 16
MIXED_BAD_CLIENTS = 4
MB = 1024 * 1024


def rss_mb(pids: set[int]) -> float:
    """The summed resident set of ``pids`` (VmRSS, /proc), in MB."""
    total_kb = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for line in (PROC / str(pid) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
    return round(total_kb / 1024, 1)


def server_processes(pid: int) -> set[int]:
    """tritonserver and what it started (its python-backend stubs), those still running."""
    return {p for p in family(pid) | {pid} if is_running(p)}


async def mixed(url: str, images: Sequence[bytes], clients: int, **bound: Any) -> list[LoadResult]:
    """``clients`` concurrent clients, half without and half with shared memory, at once."""
    loads = [
        Load(LoadSpec(url, images, clients - clients // 2, shared_memory=False, **bound)),
        Load(LoadSpec(url, images, clients // 2, shared_memory=True, **bound)),
    ]
    return list(await asyncio.gather(*(load.run() for load in loads)))


def soak(state: ServerState, images: Sequence[bytes], duration_s: float, clients: int = SOAK_CLIENTS) -> dict:
    """Errors, mismatches, latency and the server's memory growth over ``duration_s`` of load."""
    asyncio.run(mixed(state.grpc_url, images, clients, requests=2 * clients, warmup=1))
    before = rss_mb(server_processes(state.pid))
    results = asyncio.run(mixed(state.grpc_url, images, clients, duration_s=duration_s, warmup=0))
    after = rss_mb(server_processes(state.pid))
    latencies = [r.row()["latency"] for r in results]
    return {
        "clients": clients,
        "duration_s": duration_s,
        "requests": sum(r.ok + r.error_count for r in results),
        "ok": sum(r.ok for r in results),
        "errors": sum(r.error_count for r in results),
        "error_kinds": {kind: e.first for r in results for kind, e in r.errors.items()},
        "mismatches": sum(r.mismatches for r in results),
        "images_per_s": round(sum(r.images_per_s for r in results), 2),
        "latency_shm_off": latencies[0],
        "latency_shm_on": latencies[1],
        "server_rss_mb_after_warmup": before,
        "server_rss_mb_at_end": after,
        "server_rss_growth_mb": round(after - before, 1),
        "server_rss_growth_percent": round(100 * (after - before) / before, 2) if before else None,
        "server_processes": len(server_processes(state.pid)),
    }


def mixed_soak(
    state: ServerState,
    images: Sequence[bytes],
    duration_s: float,
    bad_per_client: int,
    clients: int = MIXED_CLIENTS,
    bad_clients: int = MIXED_BAD_CLIENTS,
) -> dict:
    """Good clients for ``duration_s`` while ``bad_clients`` send bad requests (at most ``bad_per_client`` each);
    the good requests' errors and latency, the bad requests' refusals, the server's memory before and after."""
    good_clients = clients - bad_clients
    asyncio.run(mixed(state.grpc_url, images, good_clients, requests=good_clients, warmup=1))
    before = rss_mb(server_processes(state.pid))
    bad, stop = BadResult(), threading.Event()
    threads = run_bad_clients(state.grpc_url, images[0], bad_clients, bad_per_client, stop, bad)
    results = asyncio.run(mixed(state.grpc_url, images, good_clients, duration_s=duration_s, warmup=0))
    stop.set()
    for thread in threads:
        thread.join(120.0)
    after = rss_mb(server_processes(state.pid))
    latencies = [r.row()["latency"] for r in results]
    return {
        "clients": clients,
        "good_clients": good_clients,
        "bad_clients": bad_clients,
        "duration_s": duration_s,
        "good_requests": sum(r.ok + r.error_count for r in results),
        "good_ok": sum(r.ok for r in results),
        "good_errors": sum(r.error_count for r in results),
        "good_error_kinds": {kind: e.first for r in results for kind, e in r.errors.items()},
        "good_mismatches": sum(r.mismatches for r in results),
        "good_latency_shm_off": latencies[0],
        "good_latency_shm_on": latencies[1],
        "good_p99_ms": max(latency["p99_ms"] for latency in latencies),
        "bad": bad.row(),
        "server_rss_mb_before": before,
        "server_rss_mb_after": after,
        "server_rss_growth_mb": round(after - before, 1),
    }


def oversize(state: ServerState, images: Sequence[bytes], count: int, size_bytes: int) -> dict:
    """``count`` oversized images sent one after another: refusals and the server's memory growth."""
    before = rss_mb(server_processes(state.pid))
    refused, seconds = oversize_requests(state.grpc_url, count, size_bytes)
    after = rss_mb(server_processes(state.pid))
    still = generate(LoadSpec(state.grpc_url, images[:1], requests=1, warmup=0))
    return {
        "requests": count,
        "request_mb": round(size_bytes / MB, 1),
        "refused_by_size": refused,
        "seconds": seconds,
        "server_rss_mb_before": before,
        "server_rss_mb_after": after,
        "server_rss_growth_mb": round(after - before, 1),
        "good_request_answered_after": still.ok == 1,
    }


def answers(url: str, images: Sequence[bytes]) -> tuple[dict[int, list], LoadResult]:
    result = generate(LoadSpec(url, images, requests=len(images), warmup=0, timeout_s=60.0))
    return result.answers, result


async def load_and_kill(spec: LoadSpec, pid: int) -> tuple[LoadResult, float]:
    """Run the load and SIGKILL ``pid`` once every client has had an answer; (result, seconds from the window's
    opening to the kill)."""
    load = Load(spec)
    task = asyncio.create_task(load.run())
    while load.ok < spec.concurrency and not task.done():
        await asyncio.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    killed = time.perf_counter()
    result = await task
    return result, killed - load.started


def cli(*args: str) -> tuple[int, str, float]:
    """``freesolo ARGS`` in this process: exit code, what it printed, seconds."""
    printed = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        code = freesolo(list(args))
    return code, printed.getvalue(), round(time.perf_counter() - started, 2)


def without_paths(line: str) -> str:
    """A line the CLI printed with the machine's folders (binary, temporary repository) reduced to file names, so a
    report can be published."""
    return re.sub(r"(?<![\w.])/(?:[^\s/():,]+/)+([^\s/():,]+)", r"\1", line)


def kill_and_restart(
    repo: Path, images: Sequence[bytes], clients: int = KILL_CLIENTS, timeout_s: float = KILL_TIMEOUT_S
) -> dict:
    """The kill scenario on the server running on ``repo`` (which it stops in the end)."""
    state = read_state(repo)
    if state is None or not is_running(state.pid, state.started):
        raise RuntimeError(f"no server runs on {repo}")
    before, _ = answers(state.grpc_url, images)
    old = server_processes(state.pid)
    regions = {arg for pid in old for arg in command_line(pid) if STUB_REGION.fullmatch(arg)}
    spec = LoadSpec(state.grpc_url, images, clients, requests=KILL_REQUESTS, timeout_s=timeout_s, warmup=0)
    result, kill_at = asyncio.run(load_and_kill(spec, state.pid))
    left_by_kill = {pid for pid in old - {state.pid} if is_running(pid)}
    regions_left = {name for name in regions if (SHM_DIR / name).exists()}
    ports = ["--http-port", str(state.http_port), "--grpc-port", str(state.grpc_port)]
    ports += ["--metrics-port", str(state.metrics_port)]
    code, printed, restart_s = cli("serve", "start", "--repo", str(repo), *ports, "--timeout", "120")
    restarted = read_state(repo)
    new = server_processes(restarted.pid) if code == 0 and restarted else set()
    after, after_result = answers(state.grpc_url, images) if code == 0 else ({}, None)
    stop_code, _, stop_s = cli("serve", "stop", "--repo", str(repo))
    first_error = min((kind.first_at_s for kind in result.errors.values()), default=None)
    statuses = sorted({kind.split(":", 1)[0] for kind in result.errors})
    return {
        "clients": clients,
        "timeout_s": timeout_s,
        "answered": result.ok,
        "failed": result.error_count,
        "error_statuses": statuses,
        "error_kinds": {kind: e.first for kind, e in result.errors.items()},
        "all_failures_unavailable": statuses == ["UNAVAILABLE"],
        "first_error_after_kill_ms": round(1000 * (first_error - kill_at), 1) if first_error is not None else None,
        "slowest_failure_ms": round(result.error_latency["max_ms"], 1) if result.error_count else None,
        "failures_within_timeout": result.error_count > 0 and result.error_latency["max_ms"] < 1000 * timeout_s,
        "stubs_left_by_kill": len(left_by_kill),
        "stub_regions_left_by_kill": len(regions_left),
        "restart_exit_code": code,
        "restart_s": restart_s,
        "restart_output": [without_paths(line) for line in printed.strip().splitlines()],
        "stale_stubs_running_after_restart": sorted(p for p in left_by_kill if is_running(p)),
        "stale_regions_after_restart": sorted(r for r in regions_left if (SHM_DIR / r).exists()),
        "images": len(images),
        "detections_before": [len(before.get(i, [])) for i in range(len(images))],
        "same_detections_after_restart": bool(after) and after == before,
        "errors_after_restart": after_result.error_count if after_result else None,
        "stop_exit_code": stop_code,
        "stop_s": stop_s,
        "processes_left_after_stop": sorted(p for p in old | new if is_running(p)),
    }


def mixed_markdown(m: dict[str, Any], o: dict[str, Any]) -> list[str]:
    bad = m["bad"]
    return [
        f"## Mixed soak: {m['good_clients']} good and {m['bad_clients']} bad clients, {m['duration_s']:g} s",
        "",
        "| good requests | good errors | mismatches | p50 / p99 ms (shm off) | p50 / p99 ms (shm on) | bad sent | "
        "bad refused | server RSS before | after | growth |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {m['good_requests']} | {m['good_errors']} | {m['good_mismatches']} | "
        f"{m['good_latency_shm_off']['p50_ms']:.0f} / {m['good_latency_shm_off']['p99_ms']:.0f} | "
        f"{m['good_latency_shm_on']['p50_ms']:.0f} / {m['good_latency_shm_on']['p99_ms']:.0f} | {bad['sent']} | "
        f"{bad['refused']} | {m['server_rss_mb_before']:.0f} MB | {m['server_rss_mb_after']:.0f} MB | "
        f"{m['server_rss_growth_mb']:+.1f} MB |",
        "",
        *[f"- good request error `{kind}`: {first}" for kind, first in m["good_error_kinds"].items()],
        *[f"- bad request not refused as expected: `{kind}` x {count}" for kind, count in bad["unexpected"].items()],
        f"## Oversize: {o['requests']} images of {o['request_mb']:g} MB (limit {MAX_IMAGE_BYTES / MB:g} MB)",
        "",
        f"- {o['refused_by_size']} refused for their size in {o['seconds']:.1f} s; server RSS "
        f"{o['server_rss_mb_before']:.0f} MB before, {o['server_rss_mb_after']:.0f} MB after "
        f"({o['server_rss_growth_mb']:+.1f} MB); a good request answered afterwards: "
        f"{o['good_request_answered_after']}.",
        f"- tritonserver 2.51 has no option bounding a gRPC message's size, so clients reach it through the gRPC "
        f"gate (`serving/grpc_gate.py`), which refuses a message over {MAX_MESSAGE_BYTES / MB:g} MB before the server "
        "receives any of it; an image over the image limit in a smaller message is refused by preprocess. The "
        "server also runs without its request-object pool (`--grpc-infer-allocation-pool-size=0`) and with a fixed "
        "glibc mmap threshold (`MALLOC_MMAP_THRESHOLD_`), so what preprocess refuses is returned to the system.",
        "",
    ]


def markdown(report: dict[str, Any]) -> str:
    s, k = report["soak"], report["kill"]
    lines = [
        "# Serving reliability: soak, mixed soak, oversized requests and kill",
        "",
        f"{report['machine']}; {report['date']}. Model: {report['model']}, served at {SIZE}x{SIZE} by the pip-bundled "
        f"tritonserver (python backend, ONNX Runtime, 1 thread). 1-minute load average "
        f"{report['load_average_start']:.1f} at the start, {report['load_average_end']:.1f} at the end; "
        f"{report['total_s']:.0f} s in all.",
        "",
        f"## Soak: {s['clients']} clients (half with shared memory), {s['duration_s']:g} s",
        "",
        "| requests | ok | errors | mismatches | images/s | p50 / p99 ms (shm off) | p50 / p99 ms (shm on) | "
        "server RSS after warm-up | at the end | growth |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['requests']} | {s['ok']} | {s['errors']} | {s['mismatches']} | {s['images_per_s']:.1f} | "
        f"{s['latency_shm_off']['p50_ms']:.0f} / {s['latency_shm_off']['p99_ms']:.0f} | "
        f"{s['latency_shm_on']['p50_ms']:.0f} / {s['latency_shm_on']['p99_ms']:.0f} | "
        f"{s['server_rss_mb_after_warmup']:.0f} MB | {s['server_rss_mb_at_end']:.0f} MB | "
        f"{s['server_rss_growth_mb']:+.1f} MB ({s['server_rss_growth_percent']:+.2f} %) |",
        "",
        f"RSS of tritonserver and its {s['server_processes'] - 1} python-backend stubs (VmRSS).",
        *[f"- error `{kind}`: {first}" for kind, first in s["error_kinds"].items()],
        "",
        *mixed_markdown(report["mixed_soak"], report["oversize"]),
        f"## Kill: SIGKILL to tritonserver under load ({k['clients']} clients, timeout {k['timeout_s']:g} s)",
        "",
    ]
    statuses = ", ".join(k["error_statuses"])
    lines.append(
        f"- {k['answered']} requests answered, {k['failed']} failed, all with status {statuses}; the first failure "
        f"came {k['first_error_after_kill_ms']} ms after the kill, the slowest took {k['slowest_failure_ms']} ms."
    )
    lines += [f"  - `{kind}`: {first}" for kind, first in k["error_kinds"].items()]
    said = " / ".join(k["restart_output"] or ["(nothing)"])
    lines += [
        f"- The kill left {k['stubs_left_by_kill']} stub processes and {k['stub_regions_left_by_kill']} shared-memory "
        f"regions. `freesolo serve start` on the same repository and ports: exit code {k['restart_exit_code']} in "
        f"{k['restart_s']:.1f} s; it said: {said}",
        f"- Stale stubs running after the restart: {k['stale_stubs_running_after_restart'] or 'none'}; stale "
        f"regions: {k['stale_regions_after_restart'] or 'none'}.",
        f"- Same detections after the restart as before the kill: {k['same_detections_after_restart']} (detections "
        f"per image {k['detections_before']}).",
        f"- `freesolo serve stop`: exit code {k['stop_exit_code']} in {k['stop_s']:.1f} s; processes of either server "
        f"left: {k['processes_left_after_stop'] or 'none'}.",
    ]
    return "\n".join(lines) + "\n"


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = BENCH_MODEL if BENCH_MODEL.is_file() else None
    report: dict[str, Any] = {
        "machine": machine(),
        "date": utc_now(),
        "load_average_start": os.getloadavg()[0],
        "quick": quick,
        "model": f"{checkpoint} (trained tiny)" if checkpoint else "tiny preset, random weights",
    }
    images = list(photographs().values())
    onnx_path = cached_export("tiny", SIZE, SIZE, checkpoint)
    with tempfile.TemporaryDirectory(prefix="freesolo-reliability-") as folder:
        repo = Path(folder) / "repo"
        prepare_repository(onnx_path, repo, Settings(threads=1, python_env=sys.prefix))
        ports = free_ports()
        named = ["--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)]
        try:
            if cli("serve", "start", "--repo", str(repo), *named)[0] != 0:
                raise RuntimeError(f"the server did not start; see {repo / 'server.log'}")
            state = read_state(repo)
            assert state is not None
            progress(f"{STEM}: soak")
            report["soak"] = soak(state, images, 5.0 if quick else 60.0)
            progress(f"{STEM}: mixed soak")
            report["mixed_soak"] = mixed_soak(state, images, 5.0 if quick else 30.0, 20 if quick else 200)
            progress(f"{STEM}: oversize requests")
            report["oversize"] = oversize(state, images, *((2, 25 * MB) if quick else (3, 100 * MB)))
            progress(f"{STEM}: kill and restart")
            report["kill"] = kill_and_restart(repo, images)
        finally:
            cli("serve", "stop", "--repo", str(repo))
    report["load_average_end"] = os.getloadavg()[0]
    report["total_s"] = round(time.perf_counter() - started, 1)
    write_report(out, STEM, report, markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = part_parser(__doc__, Path("runs/bench"), "a 5 s soak")
    args = parser.parse_args(argv)
    run(args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
