"""Matrix NMS study (the SOLOv2 paper's Matrix NMS table; docs/algorithms.md, "Matrix NMS"): time against the number of
masks N for each implementation of Matrix NMS and for the sequential baselines, greedy mask NMS and Soft-NMS; then
class-agnostic mask AP of the trained bench model with each NMS. The paper claims 500 masks in < 1 ms (IoU matrix
excluded, on a GPU), 9x faster than greedy mask NMS, and +0.3 AP.

Timing inputs: N candidate masks of 128 x 128 (the stride-4 masks of a 512 px input), jittered ellipses around
N/10 objects (so that masks overlap like SOLOv2's candidates around an object), 4 labels, scores sorted. For every
N the methods take turns (one call each per round, after one untimed warm-up call each), so load from other
processes hits them alike. A method whose call would take longer than ``max_call_s`` (predicted from the previous
N, quadratically) is not run at that N. What is timed, all on the CPU:

- Matrix NMS, PyTorch reference (``training.ops.matrix_nms``): IoU matrix included;
- its decay step alone (``matrix_nms_decay``, IoU matrix given): what the paper's < 1 ms claim times;
- the ``freesolo::MatrixNMS`` ONNX function body run by ONNX Runtime (one-node model, IoU included);
- the plugin's CUDA thread code, host build (g++ -O2, ``triton_plugins.matrix_nms.host_build``): the GPU kernels'
  per-thread bodies run one thread after another on one core. It checks the plugin's math; its time says nothing
  about the GPU kernel;
- greedy mask NMS and Soft-NMS (gaussian) from ``training.ops.mask_nms``: IoU matrix + sequential walk, and the
  walk alone (IoU matrix given), to set against the decay step.

The OpenAI Triton kernel is timed only where CUDA exists (interpreter timings would be meaningless); the TensorRT
plugin needs a GPU with TensorRT and is not run here. The three CPU Matrix NMS implementations must agree: the
report carries their largest difference from the reference at every N.

AP: the network runs once per val image; its outputs go through ``postprocess(..., nms=...)`` once per NMS, and
pycocotools scores each result set class-agnostically (``training.report.stage_row``).

    .venv/bin/python -m benchmarks.nms_study --out runs/bench/nms
"""

from __future__ import annotations

import ctypes
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
import onnxruntime as ort
import torch

from benchmarks.bench_model import BenchModel, ensure_bench_model
from benchmarks.reporting import latency_summary, machine, part_parser, utc_now, write_report
from training.data.coco import CocoInstances
from training.evaluate import load_ground_truth
from training.inference import Predictor
from training.models.postprocess import postprocess
from training.ops import greedy_mask_nms, matrix_nms, soft_mask_nms
from training.ops.mask_nms import greedy_nms_decay, soft_nms_decay
from training.ops.matrix_nms import MaskNms, matrix_nms_decay, pairwise_mask_iou
from training.report import stage_row
from triton_plugins.matrix_nms import host_build, onnx_function

STEM = "nms_study"
MASK_SIDE = 128  # stride-4 masks of a 512 px input
NUM_LABELS = 4
PAPER = {"matrix_500_ms": 1.0, "greedy_over_matrix": 9.0, "ap_gain_over_greedy": 0.003}
RATIO_N = 500
AP_BATCH = 8
LONG_CALL_S = 1.0  # a warm-up call longer than this: timed runs may drop to one


@dataclass(frozen=True)
class Plan:
    """How much to measure: mask counts, and the time each (method, N) cell may spend."""

    sizes: tuple[int, ...]
    cell_budget_s: float
    min_runs: int
    max_runs: int
    max_call_s: float

    def runs(self, warmup_s: float) -> int:
        fit = int(self.cell_budget_s / max(warmup_s, 1e-9))
        return min(self.max_runs, max(fit, 1 if warmup_s > LONG_CALL_S else self.min_runs))


FULL = Plan(sizes=(50, 100, 200, 500, 1000), cell_budget_s=2.0, min_runs=3, max_runs=25, max_call_s=8.0)
QUICK = Plan(sizes=(20, 50), cell_budget_s=0.05, min_runs=3, max_runs=5, max_call_s=8.0)


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    includes_iou: bool


METHODS = (
    Method("matrix_torch", "Matrix NMS, PyTorch reference", True),
    Method("matrix_torch_decay", "Matrix NMS decay step alone, PyTorch", False),
    Method("matrix_onnxruntime", "MatrixNMS ONNX function, ONNX Runtime", True),
    Method("matrix_cuda_host", "plugin CUDA thread code, host build run serially on 1 core", True),
    Method("matrix_triton", "OpenAI Triton kernel (CUDA)", True),
    Method("matrix_tensorrt", "TensorRT plugin (CUDA)", True),
    Method("greedy", "greedy mask NMS (IoU > 0.5)", True),
    Method("greedy_walk", "greedy mask NMS, sequential walk alone", False),
    Method("soft", "Soft-NMS, gaussian", True),
    Method("soft_walk", "Soft-NMS, sequential walk alone", False),
)
AGREEING = ("matrix_onnxruntime", "matrix_cuda_host", "matrix_triton")  # compared with matrix_torch


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    nms: MaskNms
    kernel: str


AP_VARIANTS = (
    Variant("matrix_gaussian", "Matrix NMS, gaussian (sigma 2)", matrix_nms, "gaussian"),
    Variant("matrix_linear", "Matrix NMS, linear", matrix_nms, "linear"),
    Variant("greedy", "greedy mask NMS (IoU > 0.5)", greedy_mask_nms, "gaussian"),
    Variant("soft_gaussian", "Soft-NMS, gaussian (sigma 2)", soft_mask_nms, "gaussian"),
)


def progress(message: str) -> None:
    print(f"[nms_study] {message}", file=sys.stderr, flush=True)


def candidate_masks(n: int, side: int = MASK_SIDE, seed: int = 0) -> dict[str, np.ndarray]:
    """The MatrixNMS node's inputs for one image of N candidates (batch 1): ellipses jittered around N/10 objects,
    a tenth of them with a random label, scores sorted descending, areas = pixel counts."""
    rng = np.random.default_rng([seed, n])
    objects = max(2, n // 10)
    centres = rng.uniform(0.1 * side, 0.9 * side, (objects, 2))
    radii = rng.uniform(0.05 * side, 0.25 * side, (objects, 2))
    object_labels = rng.integers(0, NUM_LABELS, objects)
    owner = rng.integers(0, objects, n)
    centre = centres[owner] + rng.normal(0.0, 0.025 * side, (n, 2))
    radius = radii[owner] * rng.uniform(0.8, 1.25, (n, 2))
    yy, xx = np.mgrid[0:side, 0:side]
    dx = (xx[None] - centre[:, 0, None, None]) / radius[:, 0, None, None]
    dy = (yy[None] - centre[:, 1, None, None]) / radius[:, 1, None, None]
    masks = (dx**2 + dy**2 <= 1.0).astype(np.float32)
    labels = np.where(rng.random(n) < 0.1, rng.integers(0, NUM_LABELS, n), object_labels[owner]).astype(np.int32)
    scores = np.sort(rng.random(n).astype(np.float32))[::-1]
    return {
        "masks": masks[None],
        "labels": labels[None],
        "scores": np.ascontiguousarray(scores)[None],
        "areas": masks.reshape(n, -1).sum(axis=1)[None],
    }


def unavailable_reasons(host_library: ctypes.CDLL | None) -> dict[str, str]:
    """Methods that cannot run on this machine, with why."""
    reasons = {"matrix_tensorrt": "not run: needs a CUDA GPU with TensorRT and the built plugin"}
    if not torch.cuda.is_available():
        reasons["matrix_triton"] = "not run: needs a CUDA GPU (interpreter timings are meaningless)"
    if host_library is None:
        reasons["matrix_cuda_host"] = "not run: no C++ compiler"
    return reasons


def method_calls(
    inputs: dict[str, np.ndarray], session: ort.InferenceSession, host_library: ctypes.CDLL | None, skip: set[str]
) -> dict[str, Callable[[], np.ndarray]]:
    """One zero-argument call per runnable method, each returning the decayed scores [1, N] as numpy."""
    masks, labels, scores, areas = (torch.from_numpy(inputs[key]) for key in ("masks", "labels", "scores", "areas"))
    iou = pairwise_mask_iou(masks.flatten(-2), areas)
    calls: dict[str, Callable[[], np.ndarray]] = {
        "matrix_torch": lambda: matrix_nms(masks, labels, scores, mask_area=areas).numpy(),
        "matrix_torch_decay": lambda: matrix_nms_decay(iou, labels, scores).numpy(),
        "matrix_onnxruntime": lambda: session.run(None, inputs)[0],
        "matrix_cuda_host": lambda: host_build.run_host(host_library, inputs)[1],
        "greedy": lambda: greedy_mask_nms(masks, labels, scores, mask_area=areas).numpy(),
        "greedy_walk": lambda: greedy_nms_decay(iou, labels, scores).numpy(),
        "soft": lambda: soft_mask_nms(masks, labels, scores, mask_area=areas).numpy(),
        "soft_walk": lambda: soft_nms_decay(iou, labels, scores).numpy(),
    }
    if torch.cuda.is_available():
        from triton_plugins.matrix_nms import matrix_nms_triton

        device = [t.cuda() for t in (masks, labels, scores, areas)]
        calls["matrix_triton"] = lambda: matrix_nms_triton(*device).cpu().numpy()  # .cpu() waits for the kernel
    return {key: call for key, call in calls.items() if key not in skip}


def time_side_by_side(calls: dict[str, Callable[[], np.ndarray]], plan: Plan) -> tuple[dict, dict[str, np.ndarray]]:
    """Latency summaries of every call (one untimed warm-up each, then rounds in which each takes one turn) and
    each call's output."""
    outputs, runs, warmup = {}, {}, {}
    for key, call in calls.items():
        started = time.perf_counter()
        outputs[key] = call()
        warmup[key] = time.perf_counter() - started
        runs[key] = plan.runs(warmup[key])
    samples: dict[str, list[float]] = {key: [] for key in calls}
    for turn in range(max(runs.values(), default=0)):
        for key, call in calls.items():
            if turn < runs[key]:
                started = time.perf_counter()
                call()
                samples[key].append(1000 * (time.perf_counter() - started))
    return {key: {**latency_summary(samples[key]), "warmup_ms": round(1000 * warmup[key], 3)} for key in calls}, outputs


def timing_study(plan: Plan, host_library: ctypes.CDLL | None) -> dict[str, Any]:
    """Every method at every N, and how far each Matrix NMS implementation is from the reference."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    model = onnx_function.standalone_model().SerializeToString()
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    reasons = unavailable_reasons(host_library)
    timing: dict[str, list[dict[str, Any]]] = {method.key: [] for method in METHODS}
    agreement = []
    last_ms: dict[str, tuple[int, float]] = {}
    for n in plan.sizes:
        too_slow = {
            key: f"not run: about {predicted / 1000:.0f} s per call (> {plan.max_call_s:.0f} s)"
            for key, (previous_n, p50) in last_ms.items()
            if (predicted := p50 * (n / previous_n) ** 2) > 1000 * plan.max_call_s
        }
        skipped = {**reasons, **too_slow}
        inputs = candidate_masks(n)
        summaries, outputs = time_side_by_side(method_calls(inputs, session, host_library, set(skipped)), plan)
        for method in METHODS:
            if method.key in summaries:
                timing[method.key].append({"n": n, "status": "ok", **summaries[method.key]})
                last_ms[method.key] = (n, summaries[method.key]["p50_ms"])
            else:
                timing[method.key].append({"n": n, "status": skipped[method.key]})
        reference = outputs["matrix_torch"]
        agreement.append(
            {
                "n": n,
                "decayed_fraction": round(float((reference < 0.9 * inputs["scores"]).mean()), 4),
                "max_abs_diff": {
                    key: float(np.abs(outputs[key] - reference).max()) if key in outputs else None for key in AGREEING
                },
            }
        )
        row = ", ".join(f"{key} {s['p50_ms']:.2f}" for key, s in summaries.items())
        progress(f"N={n}: p50 ms {row}")
    return {"timing": timing, "agreement": agreement}


def p50_at(timing: dict[str, list[dict[str, Any]]], key: str, n: int) -> float | None:
    return next((row["p50_ms"] for row in timing[key] if row["n"] == n and row["status"] == "ok"), None)


def ratios(timing: dict[str, list[dict[str, Any]]], n: int) -> dict[str, Any]:
    """Baseline / Matrix NMS p50 ratios at N = n: whole calls, and the sequential walks against the decay step."""

    def ratio(numerator: str, denominator: str) -> float | None:
        top, bottom = p50_at(timing, numerator, n), p50_at(timing, denominator, n)
        return None if top is None or not bottom else round(top / bottom, 2)

    return {
        "n": n,
        "greedy_over_matrix": ratio("greedy", "matrix_torch"),
        "soft_over_matrix": ratio("soft", "matrix_torch"),
        "greedy_walk_over_matrix_decay": ratio("greedy_walk", "matrix_torch_decay"),
        "soft_walk_over_matrix_decay": ratio("soft_walk", "matrix_torch_decay"),
        "matrix_decay_p50_ms": p50_at(timing, "matrix_torch_decay", n),
        "paper_greedy_over_matrix": PAPER["greedy_over_matrix"],
        "paper_matrix_500_ms": PAPER["matrix_500_ms"],
    }


@torch.inference_mode()
def ap_study(model: BenchModel) -> dict[str, Any]:
    """Class-agnostic mask AP of one network pass per image, post-processed with each NMS."""
    predictor = Predictor.from_checkpoint(model.checkpoint)
    dataset = CocoInstances(model.val_images, model.val_ann, predictor.test_policy)
    strides = predictor.config.model.strides
    results: dict[str, list[dict[str, Any]]] = {variant.key: [] for variant in AP_VARIANTS}
    seconds = dict.fromkeys(results, 0.0)
    for batch in predictor.loader(dataset, AP_BATCH):
        output = predictor.model(batch.images)
        for variant in AP_VARIANTS:
            config = replace(predictor.config.inference, nms_kernel=variant.kernel)
            started = time.perf_counter()
            dets = postprocess(output, config, strides, nms=variant.nms)
            seconds[variant.key] += time.perf_counter() - started
            results[variant.key] += [r for image in predictor.contract_results(batch, dets) for r in image]
    ground_truth = load_ground_truth(model.val_ann)
    rows = []
    for variant in AP_VARIANTS:
        row = stage_row(variant.key, ground_truth, results[variant.key])
        row["label"] = variant.label
        row["detections"] = len(results[variant.key])
        row["postprocess_ms_per_image"] = round(1000 * seconds[variant.key] / len(dataset), 2)
        rows.append(row)
    by_name = {row["name"]: row for row in rows}
    gain = None
    if by_name["matrix_gaussian"]["AP"] is not None and by_name["greedy"]["AP"] is not None:
        gain = round(by_name["matrix_gaussian"]["AP"] - by_name["greedy"]["AP"], 4)
    return {
        "checkpoint": str(model.checkpoint),
        "images": len(dataset),
        "candidates": predictor.config.inference.nms_pre,
        "variants": rows,
        "matrix_gaussian_minus_greedy_AP": gain,
        "paper_AP_gain": PAPER["ap_gain_over_greedy"],
    }


def plot_timing(report: dict[str, Any], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(11, 5))
    for method in METHODS:
        rows = [row for row in report["timing"][method.key] if row["status"] == "ok"]
        if rows:
            style = "-" if method.includes_iou else "--"
            axes.plot([r["n"] for r in rows], [r["p50_ms"] for r in rows], style, marker="o", label=method.label)
    axes.plot([RATIO_N], [PAPER["matrix_500_ms"]], "k*", markersize=12, label="paper: 500 masks < 1 ms (GPU)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("masks N")
    axes.set_ylabel("p50 ms (CPU)")
    axes.set_title(f"NMS time against N ({MASK_SIDE}x{MASK_SIDE} masks; dashed: IoU matrix excluded)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_ap(ap: dict[str, Any], path: Path) -> None:
    metrics = ("AP", "AP50", "AP75")
    figure, axes = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / len(ap["variants"])
    for index, row in enumerate(ap["variants"]):
        positions = np.arange(len(metrics)) + (index - (len(ap["variants"]) - 1) / 2) * width
        axes.bar(positions, [100 * (row[m] or 0.0) for m in metrics], width, label=row["label"])
    axes.set_xticks(np.arange(len(metrics)), [f"mask {m}" for m in metrics])
    axes.set_ylabel("% (class-agnostic)")
    axes.set_title(f"Mask AP with each NMS ({ap['images']} val images, one network pass each)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def cell(row: dict[str, Any]) -> str:
    return f"{row['p50_ms']:.2f} / {row['p90_ms']:.2f}" if row["status"] == "ok" else "not run"


def number(value: float | None, unit: str = "", digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def markdown(report: dict[str, Any]) -> str:
    sizes = report["sizes"]
    lines = [
        f"# Matrix NMS study ({report['machine']}, {report['threads']} threads, {report['date']}"
        f"{', quick' if report['quick'] else ''})",
        "",
        f"Load average (1 min) {report['load_1min_start']:.2f} at start, {report['load_1min_end']:.2f} at end; "
        f"{report['total_s']:.0f} s in all.",
        "",
        f"## Time against N ({MASK_SIDE}x{MASK_SIDE} masks, p50 / p90 ms, CPU)",
        "",
        "| method | IoU matrix | " + " | ".join(f"N={n}" for n in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for method in METHODS:
        cells = " | ".join(cell(row) for row in report["timing"][method.key])
        lines.append(f"| {method.label} | {'included' if method.includes_iou else 'given'} | {cells} |")
    not_run: dict[tuple[str, str], list[str]] = {}
    for method in METHODS:
        for row in report["timing"][method.key]:
            if row["status"] != "ok":
                not_run.setdefault((method.label, row["status"]), []).append(str(row["n"]))
    lines += ["", *[f"- {label}, N = {', '.join(ns)}: {status}" for (label, status), ns in not_run.items()]]
    r = report["ratios"]
    lines += [
        "",
        "![time against N](nms_time.png)",
        "",
        f"## Against the paper (N = {r['n']})",
        "",
        "| | measured | paper |",
        "|---|---|---|",
        f"| greedy / Matrix NMS, whole calls | {number(r['greedy_over_matrix'], 'x')} | "
        f"{r['paper_greedy_over_matrix']:.0f}x |",
        f"| greedy walk / Matrix NMS decay step (IoU matrix given to both) | "
        f"{number(r['greedy_walk_over_matrix_decay'], 'x')} | |",
        f"| Soft-NMS / Matrix NMS, whole calls | {number(r['soft_over_matrix'], 'x')} | |",
        f"| Soft-NMS walk / Matrix NMS decay step | {number(r['soft_walk_over_matrix_decay'], 'x')} | |",
        f"| Matrix NMS decay step (IoU matrix excluded) | {number(r['matrix_decay_p50_ms'], ' ms')} (CPU) | "
        f"< {r['paper_matrix_500_ms']:.0f} ms (GPU) |",
        "",
        "## The Matrix NMS implementations agree (largest |difference| from the PyTorch reference)",
        "",
        "| N | masks decayed > 10% | " + " | ".join(AGREEING) + " |",
        "|---|---|" + "---|" * len(AGREEING),
    ]
    for row in report["agreement"]:
        diffs = " | ".join("-" if (d := row["max_abs_diff"][key]) is None else f"{d:.1e}" for key in AGREEING)
        lines.append(f"| {row['n']} | {100 * row['decayed_fraction']:.0f}% | {diffs} |")
    ap = report["ap"]
    lines += [
        "",
        f"## Mask AP with each NMS ({ap['images']} val images, {ap['candidates']} candidates per image, "
        "class-agnostic, pycocotools)",
        "",
        "| NMS | mask AP | AP50 | AP75 | AR100 | detections | post-processing ms/image |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in ap["variants"]:
        metrics = " | ".join("-" if row[k] is None else f"{100 * row[k]:.1f}" for k in ("AP", "AP50", "AP75", "AR100"))
        lines.append(f"| {row['label']} | {metrics} | {row['detections']} | {row['postprocess_ms_per_image']:.1f} |")
    gain = ap["matrix_gaussian_minus_greedy_AP"]
    lines += [
        "",
        f"Matrix NMS (gaussian) minus greedy: {number(None if gain is None else 100 * gain, ' AP points', 1)} "
        f"(paper: +{100 * ap['paper_AP_gain']:.1f}).",
        "",
        "![mask AP with each NMS](nms_ap.png)",
        "",
        "Notes: every time is a CPU time on this machine. The host build runs the plugin's CUDA per-thread code one "
        "thread after another on one core: it proves the plugin's math, not its speed. Greedy and Soft-NMS take the "
        "same IoU matrix as Matrix NMS and then walk the masks in Python/numpy; the 'walk alone' rows set that "
        "sequential part against Matrix NMS's decay step. Soft-NMS's sigma multiplies IoU^2 as in Matrix NMS "
        "(sigma 2 here is the Soft-NMS paper's 0.5).",
    ]
    return "\n".join(lines) + "\n"


def host_library_in(folder: Path) -> ctypes.CDLL | None:
    """The host build compiled into ``folder``, or None without a C++ compiler."""
    compiler = host_build.find_compiler()
    if compiler is None:
        return None
    return host_build.load_host_library(host_build.build_host_library(folder, compiler))


def run(out: Path, quick: bool = False, model: BenchModel | None = None) -> dict[str, Any]:
    """Times every NMS against N, scores the bench model (or ``model``) with each NMS, writes the report and plots."""
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    plan = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        progress("compiling the host build of the plugin's CUDA code")
        host_library = host_library_in(Path(folder))
        study = timing_study(plan, host_library)
    progress("mask AP with each NMS")
    ap = ap_study(model or ensure_bench_model())
    report = {
        "machine": machine(),
        "date": utc_now(),
        "quick": quick,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "mask_side": MASK_SIDE,
        "sizes": list(plan.sizes),
        "methods": {m.key: {"label": m.label, "includes_iou": m.includes_iou} for m in METHODS},
        **study,
        "ratios": ratios(study["timing"], RATIO_N if RATIO_N in plan.sizes else plan.sizes[-1]),
        "ap": ap,
        "load_1min_start": load_start,
        "load_1min_end": os.getloadavg()[0],
        "total_s": round(time.perf_counter() - started, 1),
    }
    plot_timing(report, out / "nms_time.png")
    plot_ap(ap, out / "nms_ap.png")
    write_report(out, STEM, report, markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = part_parser(__doc__, Path("runs/bench/nms"), "N in {20, 50}, few runs (seconds, plus the AP part)")
    args = parser.parse_args(argv)
    run(args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
