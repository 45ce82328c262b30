"""Latency and throughput of the four CPU runtimes side by side in one process, their FLOPs, and what each costs in
mask AP.

Runtimes, batch 1, random weights (speed does not depend on what weights learned):

- ``pytorch_fp32``: eager network + ``postprocess`` to the graph contract;
- ``pytorch_bf16``: the same network in bf16 the fast way (``Bf16Network``: bf16 weights and input in channels_last,
  not autocast; emulated where the CPU lacks bf16 instructions); post-processing (thresholds, Matrix NMS) stays fp32,
  as int8 keeps it float;
- ``ort_fp32`` and ``ort_int8``: ONNX Runtime's CPU provider with the project's session options
  (``export.onnx_inputs``), on ``export.onnx_export.build_onnx``
  and ``export.quantize.quantize_int8``. int8 of random weights is calibrated on one noise image: its ranges are
  meaningless, its speed is not;
- ORT bf16 is not run: its CPU provider has no bf16 kernels (``export.onnx_export.BF16_UNSUPPORTED``).

Cases: tiny at 128 and 256, r50 at 384 and 512. One dynamic-H/W export per preset serves both of its sizes (an
export and an int8 calibration cost 20-90 s each here; the budget holds three). Each case reports p50/p90/p99 ms
(``latency_summary``), images/s (1000 / mean ms; ORT also at batch 4), the network's FLOPs per image
(``FlopCounterMode`` on the meta device, batch 1; the dynamic 1x1 mask convolution of post-processing is not
counted) and the achieved GFLOP/s (GFLOPs / p50 s, post-processing included in the time).

The runtimes take turns in blocks (``interleaved_timings``) so that load from other processes hits them alike.
The budget (4.5 minutes on a quiet 2-core machine) sets the counts: three exports with their int8 calibrations
(about half of it), then per case 30/20/3/3 timed batch-1 runs per runtime and 6/4/0/0 batch-4 runs per ORT runtime
(an r50 run takes seconds; r50 gets no batch-4 runs). One thread under light load measured 384 s with
4 r50 runs; under load it takes much longer: see total_s.

Accuracy: the trained bench model (``benchmarks.bench_model``, or the ``model`` given to ``run``) at its test size,
class-agnostic mask AP on its val set (pycocotools) with each runtime; int8 calibrated on 32 of its training images.

Quick mode (tests, CI): one export only, the trained model's, whose test size is the one case (6 runs, weights
"trained"); int8 calibrated on 8 images.

    .venv/bin/python -m benchmarks.latency --out runs/bench/latency
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_model import BenchModel, ensure_bench_model
from benchmarks.reporting import latency_summary, machine, part_parser, utc_now, write_report
from benchmarks.torch_runtimes import Bf16Network, eager
from export.graph_contract import INPUT_NAME, SIZES_NAME
from export.onnx_export import BF16_UNSUPPORTED, InputSize, build_onnx, default_input_size, preset_model
from export.onnx_inputs import OnnxModel, calibration_images, session_options
from export.quantize import quantize_int8
from training.config import Config
from training.data.coco import CocoInstances
from training.evaluate import load_ground_truth
from training.geometry import InputPolicy
from training.inference import Predictor
from training.models import SOLOv2
from training.report import STAGE_KEYS, stage_row

STEM = "latency"
RUNTIMES = ("pytorch_fp32", "pytorch_bf16", "ort_fp32", "ort_int8")
# Each runtime's speed-up is against the runtime it would replace.
SPEEDUP_BASE = {"pytorch_bf16": "pytorch_fp32", "ort_fp32": "pytorch_fp32", "ort_int8": "ort_fp32"}
UNSUPPORTED = {"ort_bf16": BF16_UNSUPPORTED.replace("--precision bf16", "bf16")}
FLOP_PARTS = ("backbone", "head", "mask_branch")
THROUGHPUT_BATCH = 4
WARMUP = 1
CALIBRATION_COUNT = 32


@dataclass(frozen=True)
class Case:
    """One preset at one square input size, with its timed runs per runtime (batch 1) and per ORT runtime (batch
    ``THROUGHPUT_BATCH``; 0 skips it)."""

    preset: str
    size: int
    repeats: int
    batch_repeats: int


FULL = (Case("tiny", 128, 30, 6), Case("tiny", 256, 20, 4), Case("r50", 384, 3, 0), Case("r50", 512, 3, 0))
QUICK = Case("tiny", 128, 6, 2)  # preset and size: the trained model's
QUICK_CALIBRATION = 8


def progress(message: str) -> None:
    print(f"[latency] {message}", file=sys.stderr, flush=True)


def flops(model: SOLOv2, size: int) -> dict[str, int]:
    """FLOPs of one forward at batch 1, size x size, in total and per top-level part; counted on the meta device
    (shapes only, so r50 costs no real compute)."""
    meta = copy.deepcopy(model).to("meta")
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        meta(torch.zeros(1, 3, size, size, dtype=torch.uint8, device="meta"))
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    return {"total": counter.get_total_flops(), **{part: by_module.get(f"{root}.{part}", 0) for part in FLOP_PARTS}}


def interleaved_timings(
    functions: dict[str, Callable[[], Any]], repeats: int, warmup: int, blocks: int | None = None
) -> dict[str, list[float]]:
    """``repeats`` timed calls (ms) of each function. The functions take turns in ``blocks`` blocks (default: of
    about 5-10 calls, at least 2), each opened by ``warmup`` untimed calls: turns share out the load of other
    processes, and the untimed calls absorb the previous runtime's threads still spinning (ORT's and OpenMP's
    busy-wait after a run). Calls of seconds each can take turns call by call (``blocks=repeats``, ``warmup=0``,
    after one untimed first call of each function)."""
    samples: dict[str, list[float]] = {name: [] for name in functions}
    blocks = min(blocks, repeats) if blocks else max(2, repeats // 10)
    for block in range(blocks):
        count = repeats // blocks + (1 if block < repeats % blocks else 0)
        for name, function in functions.items():
            for call in range(warmup + count):
                started = time.perf_counter()
                function()
                if call >= warmup:
                    samples[name].append(1000 * (time.perf_counter() - started))
    return samples


def onnx_models(
    model: SOLOv2,
    config: Config,
    metadata: dict[str, Any],
    size: InputSize,
    calibration: list[dict[str, np.ndarray]],
    folder: Path,
    label: str,
) -> dict[str, tuple[Path, float]]:
    """fp32 and int8 files of one model (``label``_runtime.onnx), with the seconds each took to make."""
    started = time.perf_counter()
    fp32 = build_onnx(model, config, metadata, size, f"{config.preset} benchmark")
    fp32_seconds = time.perf_counter() - started
    started = time.perf_counter()
    int8 = quantize_int8(fp32, calibration)
    int8_seconds = time.perf_counter() - started
    paths = {}
    for name, proto, seconds in (("ort_fp32", fp32, fp32_seconds), ("ort_int8", int8, int8_seconds)):
        path = folder / f"{label}_{name}.onnx"
        onnx.save_model(proto, str(path))
        paths[name] = (path, seconds)
    return paths


def timed_case(
    model: SOLOv2, config: Config, paths: dict[str, tuple[Path, float]], case: Case, threads: int, weights: str
) -> dict[str, Any]:
    """Latency summaries, images/s, FLOPs and GFLOP/s of the four runtimes on one case (ORT on ``paths``)."""
    progress(f"{case.preset} at {case.size}x{case.size} ({weights} weights): timing")
    sessions = {name: OnnxModel(path, session_options(threads)) for name, (path, _) in paths.items()}
    image = np.random.default_rng(0).integers(0, 256, (THROUGHPUT_BATCH, 3, case.size, case.size), dtype=np.uint8)
    single = image[:1]
    tensor = torch.from_numpy(single)
    functions = {
        "pytorch_fp32": eager(model, config, tensor),
        "pytorch_bf16": eager(Bf16Network(model), config, tensor),
        **{name: (lambda s=s: s.run(single)) for name, s in sessions.items()},
    }
    samples = interleaved_timings(functions, case.repeats, WARMUP)
    counted = flops(model, case.size)
    gflops = counted["total"] / 1e9
    runtimes = {}
    for name, values in samples.items():
        summary = latency_summary(values)
        runtimes[name] = {
            **summary,
            "images_per_s": round(1000 / summary["mean_ms"], 3),
            "gflop_per_s": round(gflops / (summary["p50_ms"] / 1000), 2),
        }
    for name, base in SPEEDUP_BASE.items():
        runtimes[name]["speedup"] = round(runtimes[base]["p50_ms"] / runtimes[name]["p50_ms"], 3)
        runtimes[name]["speedup_vs"] = base
    if case.batch_repeats:
        batched = {name: (lambda s=s: s.run(image)) for name, s in sessions.items()}
        for name, values in interleaved_timings(batched, case.batch_repeats, WARMUP).items():
            mean_ms = latency_summary(values)["mean_ms"]
            runtimes[name][f"images_per_s_batch{THROUGHPUT_BATCH}"] = round(1000 * THROUGHPUT_BATCH / mean_ms, 3)
    return {
        "preset": case.preset,
        "input": f"{case.size}x{case.size}",
        "size": case.size,
        "repeats": case.repeats,
        "batch_repeats": case.batch_repeats,
        "weights": weights,
        "export_s": {name: round(seconds, 1) for name, (_, seconds) in paths.items()},
        "gflops": round(gflops, 3),
        "flops": counted,
        "runtimes": runtimes,
    }


def random_cases(cases: tuple[Case, ...], threads: int, folder: Path) -> list[dict[str, Any]]:
    """Every case with random weights, one dynamic export (fp32 + int8) per preset, traced and calibrated at its
    smallest size."""
    results = []
    for preset in dict.fromkeys(case.preset for case in cases):
        chosen = sorted((case for case in cases if case.preset == preset), key=lambda case: case.size)
        model, config, metadata = preset_model(preset)
        side = chosen[0].size
        progress(f"{preset}: exporting (dynamic H/W) and quantising")
        noise = np.random.default_rng(0).integers(0, 256, (1, 3, side, side), dtype=np.uint8)
        feeds = [{INPUT_NAME: noise, SIZES_NAME: np.array([[side, side]], np.int32)}]
        paths = onnx_models(model, config, metadata, InputSize(side, side, True), feeds, folder, f"{preset}_random")
        results += [timed_case(model, config, paths, case, threads, "random") for case in chosen]
    return results


@dataclass(frozen=True)
class Trained:
    """The trained model with its fp32 and int8 exports at its test size."""

    bench: BenchModel
    predictor: Predictor
    size: int
    paths: dict[str, tuple[Path, float]]
    calibration_images: int


def export_trained(bench: BenchModel, calibration_count: int, folder: Path) -> Trained:
    predictor = Predictor.from_checkpoint(bench.checkpoint)
    config = predictor.config
    side = default_input_size(config)[0]  # square
    policy = InputPolicy(side, side, False, config.input.test_size, config.input.max_size)
    calibration = calibration_images(bench.train_images, calibration_count, policy)
    progress(f"trained model: exporting at {side}x{side} and quantising on {len(calibration)} images")
    metadata = {"category_ids": predictor.category_ids, "class_names": predictor.class_names}
    paths = onnx_models(predictor.model, config, metadata, InputSize(side, side, False), calibration, folder, "trained")
    return Trained(bench, predictor, side, paths, len(calibration))


def accuracy(trained: Trained, threads: int) -> dict[str, Any]:
    """Class-agnostic mask metrics of the trained model with each runtime, and each one's AP change vs fp32."""
    bench, predictor = trained.bench, trained.predictor
    ground_truth = load_ground_truth(bench.val_ann)
    images = [(image["id"], bench.val_images / image["file_name"]) for image in ground_truth.dataset["images"]]
    dataset = CocoInstances(bench.val_images, bench.val_ann, predictor.test_policy)
    progress(f"trained model: mask AP on {len(images)} val images")
    results = {"pytorch_fp32": predictor.dataset_results(dataset, progress=False)}
    bf16 = Predictor(Bf16Network(predictor.model), predictor.config, predictor.category_ids, predictor.class_names)
    results["pytorch_bf16"] = bf16.dataset_results(dataset, progress=False)
    for name, (path, _) in trained.paths.items():
        results[name] = OnnxModel(path, session_options(threads)).results(images)
    mask = {name: stage_row(name, ground_truth, found) for name, found in results.items()}
    for row in mask.values():
        row["AP_change"] = round(row["AP"] - mask["pytorch_fp32"]["AP"], 4)
    return {
        "checkpoint": str(bench.checkpoint),
        "input": f"{trained.size}x{trained.size}",
        "val_images": len(images),
        "calibration_images": trained.calibration_images,
        "mask": mask,
    }


def plot_latency(cases: list[dict[str, Any]], path: Path) -> None:
    """p50 bars per runtime, one panel per case (their scales differ), p90 and p99 as marks."""
    figure, axes = plt.subplots(1, len(cases), figsize=(3.4 * len(cases) + 0.6, 3.8), squeeze=False)
    positions = np.arange(len(RUNTIMES))
    for axis, case in zip(axes[0], cases, strict=True):
        rows = [case["runtimes"][name] for name in RUNTIMES]
        axis.bar(positions, [row["p50_ms"] for row in rows], color=[f"C{i}" for i in range(len(RUNTIMES))])
        axis.scatter(positions, [row["p90_ms"] for row in rows], marker="_", s=300, color="black", label="p90")
        axis.scatter(positions, [row["p99_ms"] for row in rows], marker="v", s=25, color="black", label="p99")
        axis.set_xticks(positions, [name.replace("_", "\n") for name in RUNTIMES], fontsize=8)
        axis.set_title(f"{case['preset']} {case['input']} ({case['gflops']:.1f} GFLOPs)", fontsize=9)
        axis.set_ylabel("ms, batch 1 (bar: p50)")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_ap(accuracy_report: dict[str, Any], path: Path) -> None:
    metrics = ("AP", "AP50")
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    width = 0.8 / len(RUNTIMES)
    for index, name in enumerate(RUNTIMES):
        positions = np.arange(len(metrics)) + (index - (len(RUNTIMES) - 1) / 2) * width
        axis.bar(positions, [100 * accuracy_report["mask"][name][m] for m in metrics], width, label=name)
    axis.set_xticks(np.arange(len(metrics)), [f"mask {m}" for m in metrics])
    axis.set_ylabel("% (class-agnostic)")
    axis.set_title(f"Trained tiny model, {accuracy_report['val_images']} val images, {accuracy_report['input']}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Latency and throughput: PyTorch fp32/bf16 vs ONNX Runtime fp32/int8",
        "",
        f"{report['machine']}; torch {report['torch']}, onnxruntime {report['onnxruntime']}, {report['threads']} "
        f"threads each; {report['date']}. Batch 1, ms over the runs given per case; runtimes take turns in blocks, "
        f"each opened by {report['warmup']} untimed run. images/s = 1000 / mean ms (batch 4: ORT at batch 4). "
        "GFLOP/s = the network's FLOPs per image / p50 (post-processing in the time, not in the FLOPs). "
        "Speed-up: p50 ratio against the runtime in brackets. pytorch_bf16: bf16 weights and input in channels_last "
        "(not autocast), post-processing in fp32. 1-minute load average "
        f"{report['load_1min_start']:.1f} at the start, {report['load_1min_end']:.1f} at the end (other processes "
        f"share the cores: compare ratios); {report['total_s']:.0f} s in all.",
    ]
    for case in report["cases"]:
        parts = ", ".join(f"{part} {case['flops'][part] / 1e9:.2f}" for part in FLOP_PARTS)
        lines += [
            "",
            f"## {case['preset']} at {case['input']}, {case['weights']} weights",
            "",
            f"{case['gflops']:.2f} GFLOPs per image ({parts}); {case['repeats']} runs per runtime.",
            "",
            "| runtime | p50 ms | p90 ms | p99 ms | images/s | images/s batch 4 | GFLOP/s | speed-up |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name in RUNTIMES:
            row = case["runtimes"][name]
            batched = row.get(f"images_per_s_batch{THROUGHPUT_BATCH}")
            speedup = f"{row['speedup']:.2f}x ({row['speedup_vs']})" if "speedup" in row else "-"
            lines.append(
                f"| {name} | {row['p50_ms']:.1f} | {row['p90_ms']:.1f} | {row['p99_ms']:.1f} | "
                f"{row['images_per_s']:.2f} | {'-' if batched is None else f'{batched:.2f}'} | "
                f"{row['gflop_per_s']:.1f} | {speedup} |"
            )
    trained = report["accuracy"]
    lines += [
        "",
        f"## Class-agnostic mask metrics of the trained model ({trained['val_images']} val images)",
        "",
        f"`{trained['checkpoint']}` at {trained['input']}; int8 calibrated on {trained['calibration_images']} "
        "training images. pycocotools, `useCats=0`, percent; AP change against pytorch_fp32 in points.",
        "",
        "| runtime | " + " | ".join(f"mask {k}" if k == "AP" else k for k in STAGE_KEYS) + " | AP change |",
        "|---" * (len(STAGE_KEYS) + 2) + "|",
    ]
    for name in RUNTIMES:
        row = trained["mask"][name]
        cells = " | ".join(f"{100 * row[k]:.1f}" for k in STAGE_KEYS)
        lines.append(f"| {name} | {cells} | {100 * row['AP_change']:+.1f} |")
    lines += ["", *(f"{name}: not measured. {reason}" for name, reason in report["unsupported"].items())]
    lines += ["", "![p50 latency per runtime and case](latency.png)", "", "![mask AP per runtime](latency_ap.png)"]
    return "\n".join(lines) + "\n"


def run(out: Path, quick: bool = False, model: BenchModel | None = None) -> dict[str, Any]:
    """Times every case, scores the bench model (or ``model``) with each runtime, writes the report and plots."""
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    threads = torch.get_num_threads()
    out.mkdir(parents=True, exist_ok=True)
    bench = model or ensure_bench_model()
    with tempfile.TemporaryDirectory(prefix="freesolo-latency-") as folder:
        trained = export_trained(bench, QUICK_CALIBRATION if quick else CALIBRATION_COUNT, Path(folder))
        if quick:  # one export for both parts: the trained model at its test size is the one case
            case = replace(QUICK, preset=trained.predictor.config.preset, size=trained.size)
            predictor = trained.predictor
            cases = [timed_case(predictor.model, predictor.config, trained.paths, case, threads, "trained")]
        else:
            cases = random_cases(FULL, threads, Path(folder))
        accuracy_report = accuracy(trained, threads)
    report = {
        "machine": machine(),
        "date": utc_now(),
        "quick": quick,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "threads": threads,
        "warmup": WARMUP,
        "runtimes": list(RUNTIMES),
        "unsupported": UNSUPPORTED,
        "cases": cases,
        "accuracy": accuracy_report,
        "load_1min_start": load_start,
        "load_1min_end": os.getloadavg()[0],
        "total_s": round(time.perf_counter() - started, 1),
    }
    plot_latency(cases, out / "latency.png")
    plot_ap(accuracy_report, out / "latency_ap.png")
    write_report(out, STEM, report, markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = part_parser(__doc__, Path("runs/bench/latency"), "tiny at 64x64 only, few runs")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of every runtime")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
