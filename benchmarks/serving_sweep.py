"""Serving throughput and latency under concurrent load: the ``freesolo`` ensemble served by the pip-bundled
tritonserver (python backend running ONNX Runtime, one model instance, one ORT thread, max batch 8, dynamic
batching of what is queued), loaded by ``benchmarks.loadgen`` at concurrency 1, 2, 4, 8 with system shared memory
off and on, one fixed-duration point each (the two modes interleaved).

Cases (random weights of a preset: speed does not depend on what the weights learned, but the number of
detections does, so it is reported): tiny at 128x128 and 256x256, r50 at 256x256; quick: tiny at 128x128,
concurrency 1 and 4. The client sends skimage's photographs as JPEG (300x451 to 512x512, masks come back at that
size). Each server answers every image once before the points (warm-up; detections per image counted there); the
points send no further warm-up, so a point's window includes its clients' connection (milliseconds).

    .venv/bin/python -m benchmarks.serving_sweep --out runs/bench [--quick]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.loadgen import LoadResult, LoadSpec, generate, progress_line, sweep, table
from benchmarks.reporting import machine, part_parser, utc_now, write_report
from benchmarks.serving_setup import cached_export, photographs, progress, serving
from serving.repository import Settings

STEM = "serving_sweep"
SETTINGS = Settings(max_batch=8, instances=1, io_instances=1, queue_delay_us=0, threads=1, python_env=sys.prefix)
TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Case:
    preset: str
    size: int
    duration_s: float  # per point

    @property
    def name(self) -> str:
        return f"{self.preset} {self.size}x{self.size}"


FULL = (Case("tiny", 128, 2.0), Case("tiny", 256, 2.0), Case("r50", 256, 2.0))  # r50 at 384: 5 s per image
QUICK = (Case("tiny", 128, 1.0),)
CONCURRENCY = {False: (1, 2, 4, 8), True: (1, 4)}
SHARED_MEMORY = (False, True)


def measure_case(case: Case, folder: Path, images: list[bytes], concurrencies: tuple[int, ...]) -> dict[str, Any]:
    started = time.perf_counter()
    onnx_path = cached_export(case.preset, case.size, case.size)
    exported = time.perf_counter()
    repo = folder / f"{case.preset}_{case.size}"
    with serving(onnx_path, repo, SETTINGS) as state:
        ready = time.perf_counter()
        warm = generate(LoadSpec(state.grpc_url, images, requests=len(images), timeout_s=TIMEOUT_S, warmup=0))
        if warm.error_count:
            raise RuntimeError(f"{case.name}: the warm-up failed: {next(iter(warm.errors.values())).first}")
        spec = LoadSpec(state.grpc_url, images, duration_s=case.duration_s, timeout_s=TIMEOUT_S, warmup=0)
        results: list[LoadResult] = sweep(
            spec, concurrencies, SHARED_MEMORY, lambda r: progress(f"  {case.name}: {progress_line(r)}")
        )
    return {
        "case": case.name,
        "preset": case.preset,
        "input": f"{case.size}x{case.size}",
        "duration_s": case.duration_s,
        "detections_per_image": [len(warm.answers[i]) for i in range(len(images))],
        "export_s": round(exported - started, 1),
        "server_start_s": round(ready - exported, 1),
        "points": [r.row() for r in results],
    }


def shm_gain(points: list[dict[str, Any]]) -> dict[int, float]:
    """images/s with shared memory over images/s without, per concurrency."""
    rate = {(p["concurrency"], p["shared_memory"]): p["images_per_s"] for p in points}
    return {c: round(rate[c, True] / rate[c, False], 3) for c, shm in rate if shm and rate.get((c, False))}


def plot(report: dict[str, Any], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = report["cases"]
    figure, axes = plt.subplots(2, len(cases), figsize=(4.2 * len(cases), 6.4), squeeze=False)
    for column, case in enumerate(cases):
        for shm in SHARED_MEMORY:
            points = [p for p in case["points"] if p["shared_memory"] == shm]
            x = [p["concurrency"] for p in points]
            label = f"shared memory {'on' if shm else 'off'}"
            axes[0][column].plot(x, [p["images_per_s"] for p in points], marker="o", label=label)
            axes[1][column].plot(x, [p["latency"]["p99_ms"] for p in points], marker="o", label=label)
        axes[0][column].set_title(case["case"])
        axes[0][column].set_ylabel("images/s")
        axes[1][column].set_ylabel("p99 latency (ms)")
        for row in axes:
            row[column].set_xlabel("concurrent clients")
            row[column].set_xscale("log", base=2)
            row[column].set_xticks(x, [str(c) for c in x])
            row[column].grid(alpha=0.3)
            row[column].set_ylim(bottom=0)
        axes[0][column].legend()
    figure.suptitle("Triton (python backend, ONNX Runtime, 1 thread): throughput and p99 under load")
    figure.tight_layout()
    name = f"{STEM}.png"
    figure.savefig(out / name, dpi=110)
    plt.close(figure)
    return name


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Serving under load: concurrency x shared memory",
        "",
        f"{report['machine']}; {report['date']}. {report['server']} {len(report['images'])} JPEG photographs "
        f"({', '.join(report['images'])}) cycled, one image per request, no retries, timeout {TIMEOUT_S:g} s. "
        f"1-minute load average {report['load_average_start']:.1f} at the start, {report['load_average_end']:.1f} "
        f"at the end; {report['total_s']:.0f} s in all.",
        "",
        f"![throughput and p99 per case]({report['plot']})",
    ]
    for case in report["cases"]:
        gains = ", ".join(f"{c}: x{g:.2f}" for c, g in case["shm_gain"].items())
        lines += [
            "",
            f"## {case['case']} ({case['preset']} preset, random weights)",
            "",
            f"{case['duration_s']:g} s per point; detections per image {case['detections_per_image']}; server up in "
            f"{case['server_start_s']:.1f} s (export {case['export_s']:.0f} s, cached across runs). images/s with "
            f"shared memory over without, per concurrency: {gains}.",
            "",
            *table(case["points"]),
        ]
    return "\n".join(lines) + "\n"


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    photos = photographs()
    images = list(photos.values())
    report: dict[str, Any] = {
        "machine": machine(),
        "date": utc_now(),
        "load_average_start": os.getloadavg()[0],
        "quick": quick,
        "server": "tritonserver 2.51 (nvidia-pytriton), python backend, ONNX Runtime with 1 thread, 1 instance per "
        "step, max batch 8, dynamic batching without delay.",
        "images": list(photos),
        "cases": [],
    }
    with tempfile.TemporaryDirectory(prefix="freesolo-sweep-") as folder:
        for case in QUICK if quick else FULL:
            progress(f"{STEM}: {case.name}")
            result = measure_case(case, Path(folder), images, CONCURRENCY[quick])
            result["shm_gain"] = shm_gain(result["points"])
            report["cases"].append(result)
    report["load_average_end"] = os.getloadavg()[0]
    report["plot"] = plot(report, out)
    report["total_s"] = round(time.perf_counter() - started, 1)
    write_report(out, STEM, report, markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = part_parser(__doc__, Path("runs/bench"), "tiny at 128x128, concurrency 1 and 4, 1 s points")
    args = parser.parse_args(argv)
    run(args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
