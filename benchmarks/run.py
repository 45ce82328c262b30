"""`make bench` / `freesolo bench`: every benchmark and the full reliability runs, one after the other, and one report.

Each part is a module with ``run(out, quick) -> dict`` that writes ``OUT/<part>/<stem>.json``, ``.md`` and its PNG
plots. Parts run in sequence (two at a time would measure each other on 2 cores); a part that fails is reported and
the others still run. ``OUT/report.md`` collects the headline numbers, the time of each part and every part's own
report; ``OUT/report.json`` holds the headline numbers and each part's status.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.headlines import headline_rows
from benchmarks.reporting import machine, utc_now, write_report
from training.cli import main as freesolo
from training.errors import UserError


@dataclass(frozen=True)
class Part:
    name: str
    module: str
    title: str


PARTS = (
    Part("latency", "benchmarks.latency", "Latency and throughput: PyTorch eager, ONNX Runtime fp32/int8, bf16"),
    Part("real_size", "benchmarks.real_size", "r50 and r101 at 800 x 1333: export, parity, serving, CPU runtimes"),
    Part("imaging", "benchmarks.imaging", "Decode and resize of a 40-megapixel JPEG against Pillow's"),
    Part("serving", "benchmarks.serving_latency", "Triton gRPC overhead against in-process ONNX Runtime"),
    Part("sweep", "benchmarks.serving_sweep", "Triton gRPC load: concurrency 1..8, shared memory on/off"),
    Part("nms", "benchmarks.nms_study", "Matrix NMS study: time against N, mask AP with each NMS"),
    Part("serving_reliability", "benchmarks.serving_reliability", "Serving under load and faults: soak, kill"),
    Part("training_reliability", "benchmarks.training_reliability", "Training and Free Mask killed and resumed"),
)
PART_NAMES = tuple(part.name for part in PARTS)


def git_commit() -> str:
    """The commit measured (with '+changes' when the work tree differs), or 'unknown' outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def run_part(part: Part, out: Path, quick: bool) -> dict[str, Any]:
    """One part, timed; a failure becomes an entry with its error instead of stopping the others."""
    print(f"\n=== {part.name}: {part.title}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    runner: Callable[..., dict[str, Any]] = importlib.import_module(part.module).run
    try:
        report = runner(out / part.name, quick=quick)
        status = {"ok": True, "report": report}
    except Exception as error:  # a broken part must not hide the others' numbers
        traceback.print_exc()
        status = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    status["seconds"] = round(time.perf_counter() - started, 1)
    print(f"=== {part.name}: {'done' if status['ok'] else 'FAILED'} in {status['seconds']:.0f} s", file=sys.stderr)
    return status


def relinked(markdown: str, folder: str) -> str:
    """A part's markdown with its relative links pointing into its folder (the report sits one level up)."""
    return re.sub(r"\]\((?!https?:|/|#)([^)]+)\)", lambda m: f"]({folder}/{m.group(1)})", markdown)


def markdown(summary: dict[str, Any], out: Path) -> str:
    lines = [
        "# FreeSOLO-Deploy benchmarks",
        "",
        f"{summary['machine']}; commit {summary['commit']}; {summary['date']}; "
        f"{'quick (reduced) form' if summary['quick'] else 'full form'}; {summary['total_s'] / 60:.1f} min in all; "
        f"1-minute load average {summary['load_average_start']:.1f} at the start, "
        f"{summary['load_average_end']:.1f} at the end.",
        "",
        "## Headline numbers",
        "",
        "| what | measured | where |",
        "|---|---|---|",
        *(f"| {row['what']} | {row['value']} | {row['part']} |" for row in summary["headlines"]),
        "",
        "## Parts",
        "",
        "| part | result | time |",
        "|---|---|---|",
    ]
    for name, status in summary["parts"].items():
        result = "ok" if status["ok"] else f"FAILED: {status['error']}"
        lines.append(f"| [{name}](#{name}) | {result} | {status['seconds']:.0f} s |")
    for part in PARTS:
        report_md = out / part.name
        files = sorted(report_md.glob("*.md")) if part.name in summary["parts"] else []
        for file in files:
            section = relinked(file.read_text(), part.name).replace("\n# ", "\n## ")
            lines += ["", f'<a id="{part.name}"></a>', "", section]
    return "\n".join(lines).rstrip() + "\n"


def run_benchmarks(out: Path, names: list[str], quick: bool) -> int:
    """Run the named parts (all when empty); 0 when every part finished, 1 otherwise."""
    unknown = sorted(set(names) - set(PART_NAMES))
    if unknown:
        raise UserError(f"unknown benchmark part(s) {', '.join(unknown)}; choose from {', '.join(PART_NAMES)}")
    chosen = [part for part in PARTS if not names or part.name in names]
    started = time.perf_counter()
    summary: dict[str, Any] = {
        "machine": machine(),
        "commit": git_commit(),
        "date": utc_now(),
        "quick": quick,
        "load_average_start": os.getloadavg()[0],
        "parts": {},
    }
    for part in chosen:
        summary["parts"][part.name] = run_part(part, out, quick)
    summary["total_s"] = round(time.perf_counter() - started, 1)
    summary["load_average_end"] = os.getloadavg()[0]
    # each part keeps its full report in its own folder; report.json holds the headline numbers and the statuses
    reports = {name: status.pop("report") for name, status in summary["parts"].items() if status["ok"]}
    summary["headlines"] = headline_rows(reports)
    write_report(out, "report", summary, markdown(summary, out))
    return 0 if all(status["ok"] for status in summary["parts"].values()) else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"parts to run (default all): {', '.join(PART_NAMES)}")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="report folder (default runs/bench)")
    parser.add_argument("--quick", action="store_true", help="the reduced form CI runs (seconds per part)")


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.run ...`` is ``freesolo bench ...``."""
    return freesolo(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
