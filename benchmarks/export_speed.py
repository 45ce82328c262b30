"""Speed of the exported graph: PyTorch eager vs ONNX Runtime fp32 vs int8, side by side in one process, and what
int8 costs in mask AP.

- Random weights (speed does not depend on what the weights learned), batch 1: the tiny preset at 320 x 320 and
  ResNet-50 (r50 preset) at 512 x 512; PyTorch eager (network + post-processing to the graph contract) against
  ORT fp32 and int8 (ORT_ENABLE_ALL). int8 of random weights is calibrated on a few noise images: its ranges
  are meaningless, its speed is not.
- A trained tiny checkpoint (``--checkpoint``, skipped with a message when absent) at its 128 x 128 test size:
  the same three latencies, and pycocotools class-agnostic mask AP on ``--val-images``/``--val-ann`` of
  PyTorch, ORT fp32 and ORT int8 (calibrated on ``--calib-count`` images of ``--calib-images``).
- bf16 is not measured: ORT's CPU provider has no bfloat16 compute kernels (``export.onnx_export.BF16_UNSUPPORTED``).

The runtimes take turns in blocks (``interleaved_timings``), so load from other processes hits all of them alike.
Medians and p90 after warm-up go to OUT/export_speed.json and OUT/export_speed.md.

    .venv/bin/python -m benchmarks.export_speed --out runs/bench/export
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from benchmarks.run import cpu_name, write_report
from export.onnx_export import BF16_UNSUPPORTED, InputSize, build_onnx, preset_model
from export.onnx_inputs import InputPolicy, OnnxModel, calibration_images
from export.quantize import quantize_int8
from training.checkpoint import model_from_checkpoint
from training.config import Config
from training.evaluate import load_ground_truth
from training.models import SOLOv2
from training.models.postprocess import postprocess
from training.report import STAGE_KEYS, model_results, stage_row

RANDOM_CASES = [("tiny", 320), ("r50", 512)]
SMALL_REPEATS = 4  # tiny runs are short and noisier relative to their length: 4x --repeats (blocks of 10)
REPORT = Path("runs/freesolo_report")
RUNTIMES = ("pytorch", "ort_fp32", "ort_int8")


def interleaved_timings(functions: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, dict]:
    """Median and p90 (ms) of each function over ``repeats`` timed calls. The runtimes take turns in blocks of
    about 5-10 calls, each opened by ``warmup`` untimed calls: turns share out the load of other processes, and the
    untimed calls absorb the previous runtime's threads still spinning (ORT's and OpenMP's busy-wait after a run)."""
    samples: dict[str, list[float]] = {name: [] for name in functions}
    blocks = max(2, repeats // 10)
    for block in range(blocks):
        count = repeats // blocks + (1 if block < repeats % blocks else 0)
        for name, function in functions.items():
            for call in range(warmup + count):
                started = time.perf_counter()
                function()
                if call >= warmup:
                    samples[name].append(1000 * (time.perf_counter() - started))
    result = {}
    for name, values in samples.items():
        values.sort()
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        result[name] = {"median_ms": statistics.median(values), "p90_ms": p90}
    return result


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return options


def onnx_models(
    model: SOLOv2, config: Config, metadata: dict[str, Any], size: int, calibration: list[np.ndarray], folder: Path
) -> dict[str, tuple[Path, float]]:
    """fp32 and int8 files of one model at size x size, with the seconds each took to make."""
    started = time.perf_counter()
    fp32 = build_onnx(model, config, metadata, InputSize(size, size, False), f"{config.preset} benchmark")
    fp32_seconds = time.perf_counter() - started
    started = time.perf_counter()
    int8 = quantize_int8(fp32, calibration)
    int8_seconds = time.perf_counter() - started
    paths = {}
    for name, proto, seconds in (("ort_fp32", fp32, fp32_seconds), ("ort_int8", int8, int8_seconds)):
        path = folder / f"{config.preset}_{size}_{name}.onnx"
        onnx.save_model(proto, str(path))
        paths[name] = (path, seconds)
    return paths


def latency_case(
    model: SOLOv2,
    config: Config,
    metadata: dict[str, Any],
    size: int,
    calibration: list[np.ndarray],
    args: argparse.Namespace,
    folder: Path,
) -> tuple[dict[str, Any], dict[str, OnnxModel]]:
    """PyTorch eager, ORT fp32 and ORT int8 latency of one model at batch 1; also returns the ORT models."""
    paths = onnx_models(model, config, metadata, size, calibration, folder)
    sessions = {name: OnnxModel(path, session_options(args.threads)) for name, (path, _) in paths.items()}
    image = np.random.default_rng(0).integers(0, 256, (1, 3, size, size), dtype=np.uint8)
    tensor = torch.from_numpy(image)

    @torch.inference_mode()
    def eager() -> Any:
        return postprocess(model(tensor), config.inference, config.model.strides)

    functions = {"pytorch": eager, **{name: (lambda s=s: s.run(image)) for name, s in sessions.items()}}
    repeats = args.repeats * (SMALL_REPEATS if config.preset == "tiny" else 1)
    times = interleaved_timings(functions, repeats, args.warmup)
    case = {
        "preset": config.preset,
        "input": f"{size}x{size}",
        "repeats": repeats,
        "export_s": {name: round(seconds, 1) for name, (_, seconds) in paths.items()},
        **times,
    }
    return case, sessions


def trained_case(args: argparse.Namespace, folder: Path) -> dict[str, Any] | None:
    """Latency and class-agnostic mask AP of a trained checkpoint: PyTorch, ORT fp32, ORT int8."""
    missing = [p for p in (args.checkpoint, args.val_images, args.val_ann, args.calib_images) if not p.exists()]
    if missing:
        print(f"skipping the trained-checkpoint part: {', '.join(map(str, missing))} not found", file=sys.stderr)
        return None
    model, config, metadata = model_from_checkpoint(args.checkpoint)
    size = config.input.test_size
    policy = InputPolicy(size, size, False, config.input.test_size, config.input.max_size)
    calibration = calibration_images(args.calib_images, args.calib_count, policy)
    case, sessions = latency_case(model, config, metadata, size, calibration, args, folder)
    ground_truth = load_ground_truth(args.val_ann)
    images = [(image["id"], args.val_images / image["file_name"]) for image in ground_truth.dataset["images"]]
    results = {"pytorch": model_results(args.checkpoint, args.val_images, args.val_ann, progress=False)}
    results |= {name: session.results(images) for name, session in sessions.items()}
    case["mask"] = {name: stage_row(name, ground_truth, found) for name, found in results.items()}
    case["checkpoint"] = str(args.checkpoint)
    case["val_images"] = len(images)
    case["calibration_images"] = len(calibration)
    return case


def cell(row: dict[str, Any]) -> str:
    return f"{row['median_ms']:.1f} ({row['p90_ms']:.1f})"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# ONNX export speed",
        "",
        f"{report['machine']}; torch {report['torch']}, onnxruntime {report['onnxruntime']}, {report['threads']} "
        f"threads each; {report['date']}. Batch 1, median (p90) ms over `runs` timed runs; runtimes take turns in "
        f"blocks of 5-10 runs, each opened by {report['warmup']} untimed runs. ORT: CPU provider, ORT_ENABLE_ALL; "
        "int8: static QDQ, convolutions only, per-channel weights. 1-minute load average "
        f"{report['load_average_start']:.1f} at the start, {report['load_average_end']:.1f} at the end "
        f"(other processes share the cores: compare ratios); {report['total_s']:.0f} s in all.",
        "",
        "## Latency (random weights, and the trained tiny checkpoint)",
        "",
        "| preset | input | runs | PyTorch eager | ORT fp32 | ORT int8 | fp32 vs eager | int8 vs fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cases = list(report["random"]) + ([report["trained"]] if report["trained"] else [])
    for case in cases:
        eager, fp32, int8 = (case[name]["median_ms"] for name in RUNTIMES)
        label = case["preset"] + (" (trained)" if case is report["trained"] else "")
        lines.append(
            f"| {label} | {case['input']} | {case['repeats']} | {cell(case['pytorch'])} | {cell(case['ort_fp32'])} | "
            f"{cell(case['ort_int8'])} | {eager / fp32:.2f}x | {fp32 / int8:.2f}x |"
        )
    trained = report["trained"]
    if trained:
        lines += [
            "",
            f"## Trained tiny checkpoint: class-agnostic mask metrics on {trained['val_images']} val images",
            "",
            f"`{trained['checkpoint']}` at {trained['input']}; int8 calibrated on {trained['calibration_images']} "
            "training images. pycocotools, `useCats=0`, percent.",
            "",
            "| runtime | " + " | ".join(f"mask {k}" if k == "AP" else k for k in STAGE_KEYS) + " |",
            "|---" * (len(STAGE_KEYS) + 1) + "|",
        ]
        for name in RUNTIMES:
            row = trained["mask"][name]
            lines.append(f"| {name} | " + " | ".join(f"{100 * row[k]:.1f}" for k in STAGE_KEYS) + " |")
    else:
        lines += ["", f"Trained-checkpoint part skipped: {report['skipped']}"]
    lines += ["", f"bf16: not measured. {report['bf16']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/export"), help="report folder")
    parser.add_argument("--checkpoint", type=Path, default=REPORT / "supervised" / "model.pt", help="trained tiny")
    parser.add_argument("--val-images", type=Path, default=REPORT / "data" / "val")
    parser.add_argument("--val-ann", type=Path, default=REPORT / "data" / "val.json")
    parser.add_argument("--calib-images", type=Path, default=REPORT / "data" / "train")
    parser.add_argument("--calib-count", type=int, default=32, help="calibration images of the trained model")
    parser.add_argument("--random-calib-count", type=int, default=4, help="noise images to calibrate random weights")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per runtime, r50 (default 10; tiny 4x)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs opening each block (default 1)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of both runtimes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": os.getloadavg()[0],
        "bf16": BF16_UNSUPPORTED.replace("--precision bf16", "bf16"),
        "random": [],
        "trained": None,
    }
    with tempfile.TemporaryDirectory(prefix="freesolo-bench-") as folder:
        for preset, size in RANDOM_CASES:
            model, config, metadata = preset_model(preset)
            noise = np.random.default_rng(0).integers(0, 256, (args.random_calib_count, 1, 3, size, size), np.uint8)
            calibration = list(noise)
            print(f"{preset} at {size}x{size} ...", file=sys.stderr)
            report["random"].append(latency_case(model, config, metadata, size, calibration, args, Path(folder))[0])
        print("trained checkpoint ...", file=sys.stderr)
        report["trained"] = trained_case(args, Path(folder))
    if report["trained"] is None:
        report["skipped"] = f"{args.checkpoint} (or its val/calibration data) not found"
    report["total_s"] = round(time.perf_counter() - started, 1)
    report["load_average_end"] = os.getloadavg()[0]
    write_report(args.out, "export_speed", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
