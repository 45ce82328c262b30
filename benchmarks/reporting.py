"""What every benchmark report shares: the machine it ran on, latency percentiles, and the json + markdown pair."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from training.fileio import atomic_write_text


def part_parser(doc: str, default_out: Path, quick_help: str) -> argparse.ArgumentParser:
    """The command line every benchmark part shares (--out, --quick), described by the first line of its docstring."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out, help=f"report folder (default {default_out})")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    return parser


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# Vector and matrix instructions the runtimes here can use: numpy's BLAS, Pillow's SIMD paths and oneDNN's / ONNX
# Runtime's kernels (AVX-512 fp32, VNNI int8 dot products, AVX512-BF16 and AMX tiles for bf16 and int8 matrices).
CPU_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def cpu_flags() -> list[str]:
    """Which of ``CPU_FLAGS`` /proc/cpuinfo lists (Linux; empty elsewhere): what a report's numbers were made with."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return []
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in CPU_FLAGS if flag in present]
    return []


def machine() -> str:
    """One line naming the machine, for the head of every report."""
    return f"{cpu_name()}, {os.cpu_count()} cores"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of an ascending list (what perf_analyzer reports)."""
    return ordered[min(len(ordered), max(1, math.ceil(fraction * len(ordered)))) - 1]


def latency_summary(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 and mean of latencies in milliseconds; an empty list gives zeros and runs 0."""
    if not samples_ms:
        return {"runs": 0, "p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0}
    ordered = sorted(samples_ms)
    return {
        "runs": len(ordered),
        "p50_ms": round(statistics.median(ordered), 3),
        "p90_ms": round(percentile(ordered, 0.90), 3),
        "p99_ms": round(percentile(ordered, 0.99), 3),
        "mean_ms": round(statistics.fmean(ordered), 3),
    }


def write_report(out: Path, stem: str, report: dict[str, Any], text: str) -> None:
    """Every benchmark leaves the same pair, ``stem.json`` and ``stem.md``, and prints the markdown."""
    atomic_write_text(out / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / f"{stem}.md", text)
    print(text)
