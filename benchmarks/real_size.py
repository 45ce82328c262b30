"""Real sizes end to end: the r50 and r101 presets at their own test size (800 x 1333), exported, checked and served
as a deployment would be, then timed on the CPU in four runtimes at batch 1 and 4.

Per preset, on a class-agnostic model with seeded random weights made lively (``benchmarks.lively``: no published
weights can be fetched here, and the speed of a network does not depend on what its weights learned; sharpened, they
give a few dozen detections per photograph, so that parity and serving compare real detections, not empty sets):

1. **Export**: one ONNX graph with dynamic batch, H and W and Matrix NMS inside (``export.onnx_export.export_onnx``,
   what ``freesolo export onnx --checkpoint CKPT --dynamic`` runs), and its int8 version (``export.quantize``),
   calibrated on the photographs below at their own sizes.
2. **Parity**: ``freesolo parity``'s comparisons (``export.parity_cli.parity_rows``), PyTorch against ONNX Runtime on
   three photographs at their own sizes (a square and two non-square ones, each resized by the model's InputPolicy):
   raw heads and detections; the verdict and the worst mask IoU and score difference.
3. **Serving**: the fp32 graph served by the real ``tritonserver`` (python backend running ONNX Runtime, each image on
   its own canvas), ``freesolo infer`` against ``freesolo predict`` on the same photographs, every detection matched
   one to one (``export.parity.results_mismatches``: mask IoU >= 0.98, score within 1e-3).
4. **Timing**: ``pytorch_fp32`` (eager, in the faster of the contiguous and channels_last layouts, chosen by a probe
   the report shows), ``pytorch_bf16`` (``benchmarks.torch_runtimes.Bf16Network``: bf16 weights and input in
   channels_last, post-processing in fp32), ``ort_fp32`` and ``ort_int8`` (the project's session options). Batch 1 is
   one photograph and batch 4 four, each cut to the aspect max_size / test_size so that the InputPolicy resizes it to
   800 x 1333: one 800 x 1344 canvas. Each runtime runs in a worker process of its own
   (``benchmarks.runtime_worker``), whose peak resident memory is the runtime's; the runtimes take turns call by call
   after one untimed first call each per batch size (``benchmarks.latency.interleaved_timings``), so load from other
   processes hits them alike. A call is timed in the parent around the pipe to the worker (under a millisecond of
   calls that take seconds). p50/p90 ms, images/s (batch / mean ms) and the ratio to pytorch_fp32's p50 in the same
   run.

Budget: on a quiet 2-core machine about 15 minutes for both presets (r101 about 60 % of it): per preset an export of
1-2 minutes and an int8 calibration on 4 photographs, parity (3 photographs, three forward passes each), serving
(server start, 3 photographs through the server and through predict), then per runtime 1 + 3 calls at batch 1 and
1 + 2 at batch 4 (``FULL``; ``--runs``/``--batch-runs`` to change). With 3 and 2 timed calls, p90 is the slowest call.

Quick mode (tests, CI): the tiny preset at its own sizes (128 x 224), 2 and 1 timed calls, int8 calibrated on two
photographs; every step above runs.

    .venv/bin/python -m benchmarks.real_size --out runs/bench/real_size
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import onnx
import onnxruntime as ort
import torch

from benchmarks.latency import interleaved_timings
from benchmarks.lively import lively_checkpoint
from benchmarks.reporting import cpu_flags, latency_summary, machine, part_parser, utc_now, write_report
from benchmarks.runtime_worker import RUNTIMES, RuntimeSpec, workers
from benchmarks.serving_setup import photographs, serving
from export.onnx_export import check_graph, export_onnx
from export.onnx_inputs import calibration_images
from export.parity import results_by_image, results_mismatches
from export.parity_cli import Row, parity_rows
from export.quantize import quantize_int8
from serving.repository import Settings
from training.cli import main as freesolo
from training.data.images import read_rgb
from training.geometry import InputPolicy, prepare_image

STEM = "real_size"
BATCH = 4
BASE = "pytorch_fp32"
PARITY_PHOTOS = ("astronaut", "coffee", "chelsea")  # 512 x 512, 400 x 600, 300 x 451
SERVER_START_S = 600.0  # the model step loads an r101 graph into ONNX Runtime before the server is ready
INFER_TIMEOUT_S = 600  # one r101 image through the python backend on a busy machine


@dataclass(frozen=True)
class Plan:
    """What a run covers: presets, timed calls per runtime at batch 1 (``runs``) and batch 4 (``batch_runs``), and
    how many photographs int8 is calibrated on."""

    presets: tuple[str, ...]
    runs: int
    batch_runs: int
    calibration: int


FULL = Plan(("r50", "r101"), runs=3, batch_runs=2, calibration=4)
QUICK = Plan(("tiny",), runs=2, batch_runs=1, calibration=2)


def progress(message: str) -> None:
    print(f"[real_size] {message}", file=sys.stderr, flush=True)


def wide_crop(image: np.ndarray, aspect: float) -> np.ndarray:
    """The middle of ``image`` cut to width / height = ``aspect``."""
    height, width = image.shape[:2]
    if width / height < aspect:
        keep = round(width / aspect)
        top = (height - keep) // 2
        return image[top : top + keep]
    keep = round(height * aspect)
    left = (width - keep) // 2
    return image[:, left : left + keep]


def timing_batch(files: list[Path], policy: InputPolicy) -> tuple[np.ndarray, tuple[int, int]]:
    """The photographs cut to the policy's widest aspect and prepared by it: uint8 [n, 3, H, W] on one canvas, and the
    size (h, w) the first one is resized to."""
    prepared = [prepare_image(wide_crop(read_rgb(file), policy.max_size / policy.test_size), policy) for file in files]
    canvases = {inputs.shape for inputs, _ in prepared}
    if len(canvases) != 1:
        raise RuntimeError(f"the timing photographs landed on different canvases: {sorted(canvases)}")
    geometry = prepared[0][1]
    return np.stack([inputs for inputs, _ in prepared]), (geometry.resized_height, geometry.resized_width)


def exports(
    checkpoint: Path, photos: Path, calibration: int, folder: Path
) -> tuple[dict[str, Path], dict[str, Any], InputPolicy]:
    """The dynamic fp32 graph and its int8 version, with the seconds and MB of each, and the graph's InputPolicy."""
    started = time.perf_counter()
    fp32 = export_onnx(checkpoint, folder / "fp32.onnx", dynamic=True, log=progress)
    fp32_s = time.perf_counter() - started
    policy = InputPolicy.from_metadata({p.key: p.value for p in fp32.metadata_props})
    started = time.perf_counter()
    calibration_inputs = calibration_images(photos, calibration, policy)
    int8 = check_graph(quantize_int8(fp32, calibration_inputs))
    onnx.save_model(int8, str(folder / "int8.onnx"))
    int8_s = time.perf_counter() - started
    paths = {"ort_fp32": folder / "fp32.onnx", "ort_int8": folder / "int8.onnx"}
    report = {
        "dynamic": policy.dynamic,
        "fp32_s": round(fp32_s, 1),
        "int8_s": round(int8_s, 1),
        "calibration_photographs": len(calibration_inputs),
        **{f"{name.removeprefix('ort_')}_mb": round(path.stat().st_size / 1e6, 1) for name, path in paths.items()},
    }
    return paths, report, policy


def parity_summary(rows: list[Row], table: list[str]) -> dict[str, Any]:
    """``freesolo parity``'s verdict and its worst numbers over the images."""
    matched = [row.detections for row in rows if row.detections.matched]
    heads = [row.heads.max_abs_diff for row in rows if row.heads is not None]
    return {
        "passed": all(row.ok for row in rows),
        "images": [f"{row.image} {row.input_size[0]}x{row.input_size[1]}" for row in rows],
        "detections": [list(row.detections.num_dets) for row in rows],
        "worst_mask_iou": round(min((d.min_iou for d in matched), default=1.0), 5),
        "worst_score_diff": max((d.max_score_diff for d in matched), default=0.0),
        "worst_heads_diff": max(heads) if heads else None,
        "table": table,
    }


def served_equals_predicted(checkpoint: Path, onnx_path: Path, files: list[Path], threads: int, folder: Path) -> dict:
    """``freesolo infer`` through a real tritonserver against ``freesolo predict``, detection by detection."""
    served_json, predicted_json = folder / "served.json", folder / "predicted.json"
    settings = Settings(threads=threads, python_env=sys.prefix)
    with serving(onnx_path, folder / "repo", settings, timeout=SERVER_START_S) as server:
        infer = ["infer", "--url", server.grpc_url, *map(str, files), "--out", str(served_json)]
        infer_code = freesolo([*infer, "--timeout", str(INFER_TIMEOUT_S)])
    predict = ["predict", "--checkpoint", str(checkpoint), *map(str, files), "--out", str(predicted_json)]
    predict_code = freesolo([*predict, "--no-progress"])
    if infer_code or predict_code:
        return {"passed": False, "problems": [f"infer exited {infer_code}, predict exited {predict_code}"]}
    served = results_by_image(json.loads(served_json.read_text()), len(files))
    predicted = results_by_image(json.loads(predicted_json.read_text()), len(files))
    pairs = zip(files, predicted, served, strict=True)
    problems = [f"{file.name}: {problem}" for file, p, s in pairs for problem in results_mismatches(p, s)]
    if not any(predicted):
        problems.append("no detections to compare")
    return {
        "passed": not problems,
        "images": [file.name for file in files],
        "detections_predicted": [len(p) for p in predicted],
        "detections_served": [len(s) for s in served],
        "problems": problems,
    }


def timed_runtimes(
    checkpoint: Path, paths: dict[str, Path], inputs: np.ndarray, plan: Plan, threads: int
) -> dict[str, dict[str, Any]]:
    """p50/p90, images/s and the ratio to pytorch_fp32 of every runtime at batch 1 and ``BATCH``, with each
    worker's memory and the detections per image of its last call."""
    specs = [RuntimeSpec(name, paths.get(name, checkpoint), threads) for name in RUNTIMES]
    batches = {1: inputs[:1], BATCH: inputs[:BATCH]}
    rows: dict[str, dict[str, Any]] = {}
    with workers(specs, batches) as running:
        for batch, repeats in ((1, plan.runs), (BATCH, plan.batch_runs)):
            progress(f"timing at batch {batch}: {repeats} calls per runtime after one untimed call")
            functions = {name: partial(worker, batch) for name, worker in running.items()}
            for call in functions.values():
                call()  # untimed: first allocations at this size, kernels chosen
            samples = interleaved_timings(functions, repeats, warmup=0, blocks=repeats)
            for name, values in samples.items():
                summary = latency_summary(values)
                rows.setdefault(name, {})[f"batch{batch}"] = {
                    **summary,
                    "images_per_s": round(1000 * batch / summary["mean_ms"], 3),
                    "num_dets": running[name].last_num_dets,
                }
        for name, worker in running.items():
            rows[name] |= worker.close()
    for row in rows.values():
        for batch in (1, BATCH):
            timing = row[f"batch{batch}"]
            timing["speedup"] = round(rows[BASE][f"batch{batch}"]["p50_ms"] / timing["p50_ms"], 3)
    return rows


def measure_preset(preset: str, plan: Plan, photo_files: list[Path], threads: int, folder: Path) -> dict[str, Any]:
    """Export, parity, serving and timing of one preset."""
    started = time.perf_counter()
    work = folder / preset
    work.mkdir()
    checkpoint = lively_checkpoint(preset, work / "model.pt", read_rgb(photo_files[0]))
    progress(f"{preset}: exporting (dynamic) and quantising to int8")
    paths, export_report, policy = exports(checkpoint, photo_files[0].parent, plan.calibration, work)
    parity_files = [file for file in photo_files if file.stem in PARITY_PHOTOS]
    progress(f"{preset}: parity on {len(parity_files)} photographs")
    table: list[str] = []

    def log(line: str) -> None:
        table.append(line)
        progress(line)

    rows = parity_rows(checkpoint, paths["ort_fp32"], parity_files, log=log)
    parity = parity_summary(rows, table)
    progress(f"{preset}: serving through tritonserver, against freesolo predict")
    served = served_equals_predicted(checkpoint, paths["ort_fp32"], parity_files, threads, work)
    inputs, resized = timing_batch(photo_files[:BATCH], policy)
    runtimes = timed_runtimes(checkpoint, paths, inputs, plan, threads)
    return {
        "preset": preset,
        "canvas": f"{inputs.shape[2]}x{inputs.shape[3]}",
        "resized": f"{resized[0]}x{resized[1]}",
        "timing_photographs": [file.stem for file in photo_files[:BATCH]],
        "export": export_report,
        "parity": parity,
        "serving": served,
        "runtimes": runtimes,
        "seconds": round(time.perf_counter() - started, 1),
    }


def plot(presets: list[dict[str, Any]], path: Path) -> None:
    """images/s per runtime at batch 1 and 4, one panel per preset."""
    figure, axes = plt.subplots(1, len(presets), figsize=(4.8 * len(presets) + 0.6, 3.8), squeeze=False)
    positions = np.arange(len(RUNTIMES))
    for axis, preset in zip(axes[0], presets, strict=True):
        for offset, batch in ((-0.2, 1), (0.2, BATCH)):
            values = [preset["runtimes"][name][f"batch{batch}"]["images_per_s"] for name in RUNTIMES]
            axis.bar(positions + offset, values, 0.4, label=f"batch {batch}")
        axis.set_xticks(positions, [name.replace("_", "\n") for name in RUNTIMES], fontsize=8)
        axis.set_title(f"{preset['preset']} at {preset['canvas']}", fontsize=9)
        axis.set_ylabel("images/s")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def preset_markdown(preset: dict[str, Any]) -> list[str]:
    export, parity, served = preset["export"], preset["parity"], preset["serving"]
    fp32 = preset["runtimes"][BASE]
    heads = "n/a" if parity["worst_heads_diff"] is None else f"{parity['worst_heads_diff']:.1e}"
    lines = [
        "",
        f"## {preset['preset']}: {preset['resized']} on a {preset['canvas']} canvas",
        "",
        f"Export (dynamic batch, H and W; Matrix NMS inside): fp32 {export['fp32_s']:.0f} s, {export['fp32_mb']} MB; "
        f"int8 {export['int8_s']:.0f} s (calibrated on {export['calibration_photographs']} photographs), "
        f"{export['int8_mb']} MB.",
        "",
        f"`freesolo parity` (PyTorch vs ONNX Runtime fp32, {len(parity['images'])} photographs at their own sizes): "
        f"**{'PASS' if parity['passed'] else 'FAIL'}**; worst matched mask IoU {parity['worst_mask_iou']:.4f}, "
        f"worst score difference {parity['worst_score_diff']:.1e}, worst raw-head difference {heads}.",
        "",
        "```",
        *parity["table"],
        "```",
        "",
        f"Served through tritonserver = `freesolo predict`: **{'PASS' if served['passed'] else 'FAIL'}**"
        + (
            f" ({sum(served['detections_served'])} served detections on {len(served['images'])} photographs, "
            f"each matched one to one: mask IoU >= 0.98, score within 1e-3)."
            if served["passed"]
            else f": {'; '.join(served['problems'])}."
        ),
        "",
        f"pytorch_fp32 layout: {fp32['layout']} (probe, batch 1: "
        + ", ".join(f"{layout} {ms:.0f} ms" for layout, ms in fp32["layout_probe_ms"].items())
        + "). Ratio: pytorch_fp32's p50 / the runtime's p50 at the same batch. Memory: the worker's peak resident set "
        "(MB), and above its baseline after imports.",
        "",
        "| runtime | batch | p50 ms | p90 ms | images/s | vs pytorch_fp32 | peak MB (above baseline) | detections |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in RUNTIMES:
        row = preset["runtimes"][name]
        for batch in (1, BATCH):
            timing = row[f"batch{batch}"]
            lines.append(
                f"| {name} | {batch} | {timing['p50_ms']:.0f} | {timing['p90_ms']:.0f} | "
                f"{timing['images_per_s']:.2f} | {timing['speedup']:.2f}x | "
                f"{row['peak_rss_mb']:.0f} ({row['peak_above_baseline_mb']:.0f}) | "
                f"{' '.join(map(str, timing['num_dets']))} |"
            )
    return lines


def markdown(report: dict[str, Any]) -> str:
    plan = report["plan"]
    lines = [
        "# Real sizes end to end: r50 and r101 at 800 x 1333",
        "",
        f"{report['machine']}; CPU flags: {' '.join(report['cpu_flags']) or 'unknown'}; torch {report['torch']}, "
        f"onnxruntime {report['onnxruntime']}, {report['threads']} thread(s) per runtime; {report['date']}; "
        f"{'quick form' if report['quick'] else 'full form'}; 1-minute load average {report['load_1min_start']:.1f} "
        f"at the start, {report['load_1min_end']:.1f} at the end; {report['total_s'] / 60:.1f} min in all.",
        "",
        "Class-agnostic models with seeded random weights, sharpened to detect (`benchmarks.lively`). Each runtime "
        "runs in its own worker process; the runtimes take turns call by call, after one untimed call each per batch "
        f"size; {plan['runs']} timed calls per runtime at batch 1, {plan['batch_runs']} at batch {BATCH}. "
        "pytorch_bf16: bf16 weights and input in channels_last, post-processing (thresholds, Matrix NMS) in fp32. "
        "ORT bf16 is not run (its CPU provider has no bf16 kernels). images/s = batch / mean ms.",
    ]
    for preset in report["presets"]:
        lines += preset_markdown(preset)
    lines += ["", f"![images/s per runtime]({STEM}.png)"]
    return "\n".join(lines) + "\n"


def run(out: Path, quick: bool = False, plan: Plan | None = None) -> dict[str, Any]:
    """Every preset of the plan (``FULL``, quick: ``QUICK``); writes OUT/real_size.{json,md,png}."""
    plan = plan or (QUICK if quick else FULL)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    threads = torch.get_num_threads()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="freesolo-real-size-") as folder:
        photos = Path(folder) / "photos"
        photos.mkdir()
        photo_files = []
        for name, data in photographs().items():
            photo_files.append(photos / f"{name}.jpg")
            photo_files[-1].write_bytes(data)
        presets = [measure_preset(preset, plan, photo_files, threads, Path(folder)) for preset in plan.presets]
    report = {
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "date": utc_now(),
        "quick": quick,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "threads": threads,
        "plan": asdict(plan),
        "runtimes": list(RUNTIMES),
        "presets": presets,
        "load_1min_start": load_start,
        "load_1min_end": os.getloadavg()[0],
        "total_s": round(time.perf_counter() - started, 1),
    }
    plot(presets, out / f"{STEM}.png")
    write_report(out, STEM, report, markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = part_parser(__doc__ or "", Path("runs/bench/real_size"), "the tiny preset at 128 x 224, 2 and 1 runs")
    parser.add_argument("--presets", help=f"comma-separated presets (default {','.join(FULL.presets)})")
    parser.add_argument("--runs", type=int, help=f"timed calls per runtime at batch 1 (default {FULL.runs})")
    parser.add_argument("--batch-runs", type=int, help=f"timed calls at batch {BATCH} (default {FULL.batch_runs})")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of every runtime")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    if args.presets:
        plan = replace(plan, presets=tuple(name.strip() for name in args.presets.split(",") if name.strip()))
    plan = replace(plan, runs=args.runs or plan.runs, batch_runs=args.batch_runs or plan.batch_runs)
    run(args.out, args.quick, plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
