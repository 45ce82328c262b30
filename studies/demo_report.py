"""``runs/demo/report.md``: what the demo did, in one page: the stage table, PyTorch-vs-ONNX parity, end-to-end latency
of the three ways to run the final model, and the pictures (overlays, served detections, loss curves, latency plot).

The latency table times each held-out image, file to COCO results, through PyTorch eager (the checkpoint), ONNX
Runtime (the exported file, in this process) and Triton over gRPC (the running server), taking turns per image so
the three share whatever else loads the machine. A few rounds only: the demo's table shows the shape of the costs;
``make bench`` measures them properly.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from benchmarks.reporting import latency_summary, machine, utc_now
from export.onnx_inputs import OnnxModel
from export.parity_cli import run_parity
from serving.client import FreeSOLOClient
from training.data.images import read_rgb
from training.fileio import atomic_write, atomic_write_text
from training.geometry import prepare_image
from training.inference import Predictor
from training.report import stage_table
from training.results import image_results

ROUNDS = 3
PARITY_IMAGES = 4
RUNTIMES = ("PyTorch eager", "ONNX Runtime", "Triton gRPC")


def runtime_paths(checkpoint: Path, onnx: Path, url: str) -> dict[str, Callable[[Path], list[dict[str, Any]]]]:
    """File -> COCO results, for each runtime; PyTorch gets the exported model's own input policy."""
    predictor = Predictor.from_checkpoint(checkpoint)
    session = OnnxModel(onnx)
    client = FreeSOLOClient(url, retries=0)

    def pytorch(file: Path) -> list[dict[str, Any]]:
        images, geometry = prepare_image(read_rgb(file), session.policy)
        dets, _ = predictor.detections(torch.from_numpy(images[None]))
        return image_results(
            int(dets.num_dets[0]),
            dets.scores[0].numpy(),
            dets.labels[0].numpy(),
            dets.masks[0].numpy(),
            geometry,
            0,
            predictor.category_ids,
        )

    return {
        RUNTIMES[0]: pytorch,
        RUNTIMES[1]: lambda file: session.results([(0, file)], 1),
        RUNTIMES[2]: lambda file: client.predict([file])[0],
    }


def measure_latency(paths: dict[str, Callable[[Path], Any]], images: list[Path]) -> dict[str, dict[str, float]]:
    """ms per image of each runtime over ROUNDS rounds after one untimed round, in turns per image."""
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for round_index in range(ROUNDS + 1):
        for file in images:
            for name, path in paths.items():
                started = time.perf_counter()
                path(file)
                if round_index:
                    samples[name].append(1000 * (time.perf_counter() - started))
    return {name: latency_summary(values) for name, values in samples.items()}


def latency_plot(latency: dict[str, dict[str, float]], out: Path) -> None:
    figure = Figure(figsize=(6, 3.2))
    axes = figure.subplots()
    names = list(latency)
    axes.bar(names, [latency[n]["p50_ms"] for n in names], color=["#4c72b0", "#55a868", "#c44e52"])
    axes.scatter(names, [latency[n]["p90_ms"] for n in names], color="black", marker="_", s=400, label="p90")
    axes.set_ylim(0, 1.25 * max(latency[n]["p90_ms"] for n in names))  # room for the legend above the marks
    axes.set_ylabel("ms per image (p50 bar)")
    axes.set_title("final model, file to COCO results, batch 1")
    axes.legend(loc="upper right")
    figure.tight_layout()
    atomic_write(out, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


def parity_lines(checkpoint: Path, onnx: Path, images: list[Path]) -> tuple[list[str], int]:
    """``freesolo parity``'s table on a few images, and its exit code (0: every row within tolerance)."""
    lines: list[str] = []
    code = run_parity(checkpoint, onnx, images[:PARITY_IMAGES], log=lines.append)
    return lines, code


def write_demo_report(out: Path, checkpoint: Path, onnx: Path, url: str, images: list[Path]) -> Path:
    """Measure parity and latency against the running server, then write OUT/report.md (and report.json)."""
    pipeline = out / "pipeline"
    stages = json.loads((pipeline / "report.json").read_text())["stages"]
    parity, parity_code = parity_lines(checkpoint, onnx, images)
    latency = measure_latency(runtime_paths(checkpoint, onnx, url), images)
    latency_plot(latency, out / "latency.png")
    report = {"machine": machine(), "date": utc_now(), "stages": stages, "parity_ok": parity_code == 0}
    report["latency"] = latency
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "report.md", markdown(out, report, parity, images))
    return out / "report.md"


def picture(out: Path, path: Path, caption: str) -> list[str]:
    return [f"![{caption}]({os.path.relpath(path, out)})", ""] if path.is_file() else []


def markdown(out: Path, report: dict[str, Any], parity: list[str], images: list[Path]) -> str:
    pipeline = out / "pipeline"
    lines = [
        "# FreeSOLO-Deploy demo report",
        "",
        f"{report['machine']}; {report['date']}. No label was used for training: the ground truth of the synthetic "
        "val images is used only to measure.",
        "",
        "## Stages (class-agnostic mask metrics, percent, on the val images)",
        "",
        stage_table(report["stages"]),
        "",
        *picture(out, pipeline / "overlays.png", "ground truth, coarse masks and each stage's predictions"),
        f"## Parity: PyTorch vs ONNX Runtime ({'PASS' if report['parity_ok'] else 'FAIL'})",
        "",
        "```",
        *parity,
        "```",
        "",
        f"## Latency: the final model, file to COCO results, batch 1 ({len(images)} held-out images x {ROUNDS} rounds)",
        "",
        "| runtime | p50 ms | p90 ms | p99 ms | images/s |",
        "|---|---|---|---|---|",
    ]
    for name, row in report["latency"].items():
        rate = 1000 / row["mean_ms"] if row["mean_ms"] else 0.0
        lines.append(f"| {name} | {row['p50_ms']:.1f} | {row['p90_ms']:.1f} | {row['p99_ms']:.1f} | {rate:.1f} |")
    lines += ["", *picture(out, out / "latency.png", "latency per runtime")]
    lines += ["## Served over gRPC (`freesolo infer --vis`)", ""]
    for file in sorted((out / "served").glob("*.png"))[:4]:
        lines += picture(out, file, f"served detections: {file.stem}")
    lines += ["## Loss curves", ""]
    for stage in ("pretrain", "weak", "selftrain/round1"):
        lines += picture(out, pipeline / stage / "loss_curve.png", f"{stage} loss")
    return "\n".join(lines).rstrip() + "\n"
