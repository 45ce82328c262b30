"""What serving through Triton costs at batch 1: the gRPC round trip through ``FreeSOLOClient`` to the ``freesolo``
ensemble (pip-bundled tritonserver, python backend running ONNX Runtime) against the same work in this process:
decode + preprocess (``serving.imaging``), the same ONNX model in an ORT session with the same options, postprocess
to COCO RLE (``serving.detections``) and the client's conversion to detections (``serving.client_results``).

- The model: ``--checkpoint`` (default the trained bench model of ``benchmarks.bench_model``; ``--quick``: the tiny
  preset's random weights), exported with ``freesolo export onnx`` (cached, ``benchmarks.serving_setup``), served at
  128 x 128.
- One server per ``--queue-delays`` value (the dynamic batcher's wait on the model and postprocess steps; 0,
  ``serve prepare``'s default, is the right setting for batch-1 latency; 2000 us is a throughput setting).
- Every call is timed in turns: per round, each image goes through every path in a shuffled order, after
  ``--warmup`` untimed rounds, so load from other processes hits all paths alike. Both paths use ``--threads`` ORT
  threads. Overhead = (Triton - in-process) / in-process, of the medians; the target is <= 15 %.
- Triton's own statistics (per step: queue and compute time) show where the overhead goes.

Writes OUT/serving_latency.json and OUT/serving_latency.md and prints the table.

    .venv/bin/python -m benchmarks.serving_latency --out runs/bench/serving
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import astuple
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient

from benchmarks.bench_model import ensure_bench_model
from benchmarks.reporting import latency_summary, machine, part_parser, utc_now, write_report
from benchmarks.serving_setup import cached_export, free_ports, photographs
from export.onnx_inputs import image_sizes, run_session, session_options
from serving.client import FreeSOLOClient
from serving.client_results import Detection, ModelInfo, response_detections
from serving.contract import ENSEMBLE, MODEL, POSTPROCESS, PREPROCESS
from serving.detections import image_outputs
from serving.imaging import decode_image
from serving.launcher import ServerState, start_server, stop_server
from serving.repository import Settings, prepare_repository, read_model
from training.geometry import InputPolicy, prepare_image

TARGET = 0.15
IN_PROCESS = "in_process"


class InProcess:
    """The ensemble's work in this process, with the serving modules the server runs."""

    def __init__(self, onnx_path: Path, threads: int, info: ModelInfo) -> None:
        served = read_model(onnx_path)
        self.policy = InputPolicy(
            served.height,
            served.width,
            served.dynamic,
            served.test_size,
            served.max_size,
            served.resize_filter,
            served.resize_rounding,
        )
        options = session_options(threads)  # as serving/model_repository/model_python/1/model.py
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.info = info

    def __call__(self, data: bytes) -> list[Detection]:
        images, geometry = prepare_image(decode_image(data), self.policy)
        outputs = run_session(self.session, images[None], image_sizes([geometry]))
        item = image_outputs(
            int(outputs["num_dets"][0]),
            outputs["scores"][0],
            outputs["labels"][0],
            outputs["masks"][0],
            np.array(astuple(geometry), np.int32),
        )
        return response_detections({name: array[None] for name, array in item.items()}, self.info)[0]


def step_statistics(url: str) -> dict[str, dict[str, float]]:
    """Cumulative per-step counts and nanoseconds from Triton."""
    client = grpcclient.InferenceServerClient(url)
    steps = {}
    for name in (ENSEMBLE, PREPROCESS, MODEL, POSTPROCESS):
        stats = client.get_inference_statistics(name, as_json=True)["model_stats"][0]["inference_stats"]
        steps[name] = {
            f"{part}_{unit}": float(stats.get(part, {}).get(unit, 0))
            for part in ("success", "queue", "compute_input", "compute_infer", "compute_output")
            for unit in ("count", "ns")
        }
    client.close()
    return steps


def per_step_ms(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Mean ms per request of each step's queue and compute phases over the timed rounds."""
    table = {}
    for step in before:
        count = max(after[step]["success_count"] - before[step]["success_count"], 1.0)
        table[step] = {
            part: round((after[step][f"{part}_ns"] - before[step][f"{part}_ns"]) / count / 1e6, 3)
            for part in ("success", "queue", "compute_input", "compute_infer", "compute_output")
        }
    return table


def measure(
    paths: dict[str, Callable[[bytes], list[Detection]]], images: dict[str, bytes], rounds: int, warmup: int
) -> tuple[dict[str, dict[str, list[float]]], bool]:
    """ms per call of each path and image, in shuffled turns; and whether all paths gave identical detections."""
    samples: dict[str, dict[str, list[float]]] = {path: {image: [] for image in images} for path in paths}
    order = random.Random(0)
    identical = True
    for round_index in range(warmup + rounds):
        for image, data in images.items():
            names = list(paths)
            order.shuffle(names)
            answers = []
            for name in names:
                started = time.perf_counter()
                answers.append(paths[name](data))
                elapsed = 1000 * (time.perf_counter() - started)
                if round_index >= warmup:
                    samples[name][image].append(elapsed)
            identical &= all(answer == answers[0] for answer in answers)
    return samples, identical


def markdown(report: dict[str, Any]) -> str:
    paths = list(report["overall"])
    lines = [
        "# Serving latency: Triton gRPC vs in-process ONNX Runtime (batch 1)",
        "",
        f"{report['machine']}; onnxruntime {report['onnxruntime']}, {report['threads']} ORT thread(s) on both sides; "
        f"{report['date']}. Model `{report['model']}` served at {report['input']}; {report['rounds']} timed rounds "
        f"after {report['warmup']} warm-up rounds, every image through every path in a shuffled order each round. "
        f"Median (p90) ms per image, end to end (JPEG bytes in, detections with RLE masks out). 1-minute load "
        f"average {report['load_average_start']:.1f} at the start, {report['load_average_end']:.1f} at the end. "
        f"Identical detections on every path: {report['identical']}.",
        "",
        "| image | size | " + " | ".join(paths) + " |",
        "|---|---|" + "---|" * len(paths),
    ]
    for image, row in report["images"].items():
        cells = [f"{row[p]['p50_ms']:.1f} ({row[p]['p90_ms']:.1f})" for p in paths]
        lines.append(f"| {image} | {row['size']} | " + " | ".join(cells) + " |")
    cells = [f"**{report['overall'][p]['p50_ms']:.1f}** ({report['overall'][p]['p90_ms']:.1f})" for p in paths]
    lines.append("| all | | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| Triton path | overhead of the medians | median per-call overhead | target <= 15 % |",
        "|---|---|---|---|",
    ]
    for path, row in report["overhead"].items():
        verdict = "met" if row["overhead"] <= TARGET else "missed"
        lines.append(f"| {path} | {100 * row['overhead']:+.1f} % | {100 * row['paired_median']:+.1f} % | {verdict} |")
    lines += [
        "",
        "Where the time goes in the server (mean ms per request over the timed rounds, Triton statistics):",
        "",
    ]
    lines += [
        "| server | step | total | queue | compute input | compute infer | compute output |",
        "|---|---|---|---|---|---|---|",
    ]
    for path, steps in report["server_steps"].items():
        for step, row in steps.items():
            lines.append(
                f"| {path} | {step} | {row['success']:.2f} | {row['queue']:.2f} | {row['compute_input']:.2f} | "
                f"{row['compute_infer']:.2f} | {row['compute_output']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def run(
    out: Path,
    quick: bool = False,
    checkpoint: Path | None = None,
    rounds: int | None = None,
    warmup: int | None = None,
    threads: int = 1,
    delays: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Measure and write OUT/serving_latency.{json,md}. Defaults: the trained bench model, 20 rounds after 3,
    queue delays 0 and 2000 us; quick: the tiny preset's random weights, 3 rounds after 1, delay 0 only."""
    if checkpoint is None and not quick:
        checkpoint = ensure_bench_model().checkpoint
    rounds = rounds or (3 if quick else 20)
    warmup = warmup or (1 if quick else 3)
    delays = delays or ((0,) if quick else (0, 2000))
    images = photographs()
    started = time.perf_counter()
    report: dict[str, Any] = {
        "machine": machine(),
        "onnxruntime": ort.__version__,
        "threads": threads,
        "rounds": rounds,
        "warmup": warmup,
        "model": str(checkpoint) if checkpoint else "tiny preset, random weights",
        "date": utc_now(),
        "load_average_start": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory(prefix="freesolo-serving-bench-") as folder:
        onnx_path = cached_export("tiny", 128, 128, checkpoint)
        served = read_model(onnx_path)
        report["input"] = f"{served.height}x{served.width}"
        servers: dict[str, ServerState] = {}
        clients: dict[str, FreeSOLOClient] = {}
        try:
            for delay in delays:
                repo = Path(folder) / f"repo_{delay}"
                settings = Settings(threads=threads, queue_delay_us=delay, python_env=sys.prefix)
                prepare_repository(onnx_path, repo, settings)
                name = f"triton_delay_{delay}us"
                servers[name] = start_server(repo, ports=free_ports(), log=lambda text: print(text, file=sys.stderr))
                clients[name] = FreeSOLOClient(servers[name].grpc_url, retries=0)
            first = next(iter(clients.values()))
            local = InProcess(onnx_path, threads, first.info())
            paths: dict[str, Callable[[bytes], list[Detection]]] = {IN_PROCESS: local}
            for name, client in clients.items():
                paths[name] = lambda data, client=client: client.predict([data])[0]
            before = {name: step_statistics(state.grpc_url) for name, state in servers.items()}
            samples, identical = measure(paths, images, rounds, warmup)
            after = {name: step_statistics(state.grpc_url) for name, state in servers.items()}
        finally:
            for client in clients.values():
                client.close()
            for state in servers.values():
                stop_server(Path(state.log).parent)
    sizes = {name: "x".join(str(v) for v in decode_image(data).shape[:2]) for name, data in images.items()}
    report["identical"] = identical
    report["images"] = {
        image: {"size": sizes[image], **{path: latency_summary(samples[path][image]) for path in samples}}
        for image in images
    }
    report["overall"] = {
        path: latency_summary([v for values in samples[path].values() for v in values]) for path in samples
    }
    base = report["overall"][IN_PROCESS]["p50_ms"]
    report["overhead"] = {}
    for path in samples:
        if path == IN_PROCESS:
            continue
        paired = [
            t / i - 1 for image in images for t, i in zip(samples[path][image], samples[IN_PROCESS][image], strict=True)
        ]
        report["overhead"][path] = {
            "overhead": round(report["overall"][path]["p50_ms"] / base - 1, 4),
            "paired_median": round(statistics.median(paired), 4),
            "target_met": report["overall"][path]["p50_ms"] / base - 1 <= TARGET,
        }
    report["server_steps"] = {name: per_step_ms(before[name], after[name]) for name in before}
    report["total_s"] = round(time.perf_counter() - started, 1)
    report["load_average_end"] = os.getloadavg()[0]
    write_report(out, "serving_latency", report, markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = part_parser(__doc__, Path("runs/bench/serving"), "random tiny weights, 3 rounds, delay 0 only")
    parser.add_argument("--checkpoint", type=Path, help="model.pt to serve (default: the trained bench model)")
    parser.add_argument("--rounds", type=int, help="timed rounds over the images (20; quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (3; quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads, both sides (1)")
    parser.add_argument("--queue-delays", help="one server per dynamic-batching delay in us (0,2000; quick 0)")
    args = parser.parse_args(argv)
    delays = tuple(int(v) for v in args.queue_delays.split(",") if v.strip()) if args.queue_delays else None
    run(args.out, args.quick, args.checkpoint, args.rounds, args.warmup, args.threads, delays)
    return 0


if __name__ == "__main__":
    sys.exit(main())
