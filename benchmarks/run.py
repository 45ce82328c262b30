"""`make bench`: latency of the PyTorch reference path, measured side by side in one process.

- end-to-end inference (network + post-processing to the graph contract), batch 1, random weights: speed does not
  depend on what the weights learned;
- the Matrix NMS reference against the number of masks N.

Medians and p90 over repeated runs after warm-up; results go to OUT/bench.json and OUT/bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from training.config import load_preset
from training.fileio import atomic_write_text
from training.models import SOLOv2
from training.models.postprocess import postprocess
from training.ops import matrix_nms

MODEL_CASES = [("tiny", 128), ("tiny", 256), ("r50", 512), ("r50", 800)]
NMS_SIZES = [50, 100, 200, 500, 1000]
NMS_MASK_SIDE = 128  # stride-4 masks of a 512 px input


def timings(function: Callable[[], Any], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median and p90 of ``repeats`` calls in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(1000 * (time.perf_counter() - started))
    samples.sort()
    return {"median_ms": statistics.median(samples), "p90_ms": samples[min(len(samples) - 1, int(0.9 * len(samples)))]}


@torch.inference_mode()
def model_latency(preset: str, size: int, repeats: int) -> dict[str, Any]:
    config = load_preset(preset)
    model = SOLOv2(config.model).eval()
    images = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
    result = timings(lambda: postprocess(model(images), config.inference, config.model.strides), repeats)
    return {"preset": preset, "input": size, **result, "images_per_s": 1000 / result["median_ms"]}


@torch.inference_mode()
def nms_latency(n: int, repeats: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(n)
    masks = torch.rand(n, NMS_MASK_SIDE, NMS_MASK_SIDE, generator=generator) > 0.7
    labels = torch.randint(0, 3, (n,), generator=generator)
    scores = torch.rand(n, generator=generator).sort(descending=True).values
    return {"n": n, **timings(lambda: matrix_nms(masks, labels, scores), repeats)}


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def write_report(out: Path, stem: str, report: dict[str, Any], text: str) -> None:
    """Every benchmark leaves the same pair, ``stem.json`` and ``stem.md``, and prints the markdown."""
    atomic_write_text(out / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / f"{stem}.md", text)
    print(text)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Benchmarks ({report['machine']}, torch {report['torch']}, {report['threads']} threads, {report['date']})",
        "",
        "## PyTorch eager inference, batch 1 (network + post-processing)",
        "",
        "| preset | input | median ms | p90 ms | images/s |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['preset']} | {r['input']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['images_per_s']:.2f} |"
        for r in report["models"]
    ]
    lines += [
        "",
        f"## Matrix NMS reference ({NMS_MASK_SIDE}x{NMS_MASK_SIDE} masks, IoU matrix included)",
        "",
        "| N | median ms | p90 ms |",
        "|---|---|---|",
    ]
    lines += [f"| {r['n']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} |" for r in report["matrix_nms"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="report folder (default runs/bench)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per case (default 10)")
    args = parser.parse_args(argv)
    report = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "models": [model_latency(preset, size, args.repeats) for preset, size in MODEL_CASES],
        "matrix_nms": [nms_latency(n, args.repeats) for n in NMS_SIZES],
    }
    write_report(args.out, "bench", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
