"""``runs/demo/report.md``: what the demo did, in one page: the stage table with the supervised upper bound and what
its numbers mean at the demo's length, PyTorch-vs-ONNX parity, end-to-end latency of the three ways to run the final
model with the load it ran under, and the pictures (overlays, served detections, loss curves, latency plot).

The latency table times each held-out image, file to COCO results, through PyTorch eager (the checkpoint), ONNX
Runtime (the exported file, in this process) and Triton over gRPC (the running server), taking turns per image so
the three share whatever else loads the machine. A few rounds only: the demo's table shows the shape of the costs;
``make bench`` measures them properly.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from matplotlib.figure import Figure

from benchmarks.reporting import cpu_name, latency_summary, machine, utc_now
from export.onnx_inputs import OnnxModel
from export.parity_cli import exit_code, parity_rows
from serving.client import FreeSOLOClient
from training.config import load_preset
from training.data.images import read_rgb
from training.fileio import atomic_write, atomic_write_text
from training.geometry import prepare_image
from training.inference import Predictor
from training.report import stage_table
from training.results import image_results

ROUNDS = 3
PARITY_IMAGES = 4
RUNTIMES = ("PyTorch eager", "ONNX Runtime", "Triton gRPC")
DEMO_KEYS = ("AP", "AP50", "AR100")  # the demo's table, in whole percents
# FreeSOLO's stages from worst to best, then the bound, with their short names for sentences
ORDER = {"freemask": "coarse masks", "weak": "weak SOLO", "selftrain1": "self-training", "supervised": "supervised"}
NOISY = 1.5  # a runtime whose p90 is more than this many times its p50 was measured on a busy machine
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "freesolo_results.md"  # the full schedules' numbers
T = TypeVar("T")


@dataclass(frozen=True)
class Schedule:
    """The demo's shortened schedules and its training set (the tiny preset's own are longer)."""

    pretrain_iters: int
    weak_iters: int  # the weak stage's steps, and those of the self-training round and of the supervised bound
    train_images: int


def stage_names(schedule: Schedule) -> dict[str, str]:
    """What each stage is called on the page, by its key in ORDER."""
    steps = schedule.weak_iters
    return {
        "freemask": "Free Mask coarse masks",
        "weak": f"weak SOLO ({steps} steps on the coarse masks)",
        "selftrain1": f"self-training (one round, {steps} steps)",
        "supervised": f"supervised upper bound (labels, {steps} steps)",
    }


def demo_stages(pipeline: list[dict[str, Any]], supervised: dict[str, Any], schedule: Schedule) -> list[dict[str, Any]]:
    """The pipeline's stage rows and the supervised bound's, named for the page; each keeps its key."""
    names = stage_names(schedule)
    rows = [*pipeline, {**supervised, "name": "supervised"}]
    return [{**row, "key": row["name"], "name": names.get(row["name"], row["name"])} for row in rows]


def order_sentence(stages: list[dict[str, Any]]) -> str:
    """Whether the stages keep FreeSOLO's order (coarse masks < weak SOLO < self-training < supervised, by mask AP),
    with the numbers, and which step breaks it when one does."""
    by_key = {stage["key"]: stage for stage in stages}
    rows = [by_key[key] for key in ORDER if key in by_key]
    chain = " < ".join(f"{ORDER[stage['key']]} {100 * stage['AP']:.1f}" for stage in rows)
    broken = [(low, high) for low, high in itertools.pairwise(rows) if not high["AP"] > low["AP"]]
    if not broken:
        return f"At this length the stages keep FreeSOLO's order (mask AP, %): {chain}."
    steps = "; ".join(
        f"{ORDER[high['key']]} {100 * high['AP']:.1f} is not above {ORDER[low['key']]} {100 * low['AP']:.1f}"
        for low, high in broken
    )
    return f"At this length the stages do NOT keep FreeSOLO's order (mask AP, %): {steps}."


def stage_section(stages: list[dict[str, Any]]) -> str:
    """The demo's stage table (whole percents) and whether it keeps the order: what `make demo` prints and the page
    shows."""
    return stage_table(stages, DEMO_KEYS, digits=0) + "\n\n" + order_sentence(stages)


def meaning(out: Path, schedule: Schedule, val_images: int) -> str:
    """What the stage table's numbers are at the demo's length, against the preset's full schedules."""
    preset = load_preset("tiny")
    link = os.path.relpath(RESULTS, out.resolve())
    return (
        f"These are the demo's shortened schedules: DenseCL {schedule.pretrain_iters} steps (the tiny preset's "
        f"{preset.pretrain.solver.iters}), weak SOLO {schedule.weak_iters} ({preset.weak.solver.iters}), one "
        f"self-training round {schedule.weak_iters} ({preset.weak.selftrain_iters}) and the supervised bound "
        f"{schedule.weak_iters} steps of {preset.solver.batch_size} labelled images (the full report's "
        f"{preset.solver.iters}), on {schedule.train_images} training images, with one seed, measured on "
        f"{val_images} val images. Models trained this briefly are far from converged, so read the table for the "
        "shape of the pipeline (each stage above the last, all below the supervised bound) rather than for its "
        "values; with one seed and this many images another run would move every number, so a point or so "
        "between two rows may be chance. The full schedules' numbers, with replicate seeds and a 2000-image "
        f"held-out set, are in [docs/freesolo_results.md]({link})."
    )


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


def cpu_times() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat (Linux); None elsewhere."""
    stat = Path("/proc/stat")
    if not stat.is_file():
        return None
    ticks = [int(value) for value in stat.read_text().split("\n", 1)[0].split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # idle and iowait are not busy


def under_load(run: Callable[[], T]) -> tuple[T, dict[str, Any]]:
    """``run()``, and the load it ran under: the 1-minute load average before and after, the cores busy on the whole
    machine meanwhile and how many of them this process used (the rest: the Triton server's share of the work and
    every other process), and the thread settings of the runtimes in this process."""
    load_start, machine_start = os.getloadavg()[0], cpu_times()
    wall_start, own_start = time.perf_counter(), time.process_time()
    result = run()
    wall, own = time.perf_counter() - wall_start, time.process_time() - own_start
    machine_end, cores = cpu_times(), os.cpu_count() or 1
    busy = None
    if machine_start is not None and machine_end is not None and machine_end[1] > machine_start[1]:
        busy = cores * (machine_end[0] - machine_start[0]) / (machine_end[1] - machine_start[1])
    load = {
        "cpu": cpu_name(),
        "cores": cores,
        "load_1min_start": round(load_start, 2),
        "load_1min_end": round(os.getloadavg()[0], 2),
        "busy_cores": None if busy is None else round(busy, 2),
        "this_process_cores": round(own / wall, 2) if wall else 0.0,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    return result, load


def noise_ratio(row: dict[str, float]) -> float:
    """p90 / p50: near 1 on a quiet machine; a large ratio means some runs waited for the cores."""
    return row["p90_ms"] / row["p50_ms"] if row["p50_ms"] else 0.0


def load_lines(load: dict[str, Any], latency: dict[str, dict[str, float]]) -> list[str]:
    """The latency section's context: the machine's load while it was measured, and how noisy the numbers are."""
    busy = "unknown" if load["busy_cores"] is None else f"{load['busy_cores']:.2f}"
    others = "" if load["busy_cores"] is None else f"{max(0.0, load['busy_cores'] - load['this_process_cores']):.2f}"
    lines = [
        f"Measured on {load['cpu']} ({load['cores']} cores) while the demo's Triton server was up: the 1-minute load "
        f"average was {load['load_1min_start']:.2f} before and {load['load_1min_end']:.2f} after; {busy} cores were "
        f"busy on average, {load['this_process_cores']:.2f} of them in this process (PyTorch {load['torch_threads']} "
        f"thread(s), ONNX Runtime its default pool, OMP_NUM_THREADS={load['OMP_NUM_THREADS'] or 'unset'})"
        + (f" and {others} in others (the Triton server's share and any other work)." if others else ".")
    ]
    if load["load_1min_start"] > load["cores"]:  # the end's average counts this measurement's own work
        lines.append(
            f"The machine was loaded (a load average above its {load['cores']} cores before the measurement): every "
            "time here is longer than on a quiet machine."
        )
    noisy = {name: noise_ratio(row) for name, row in latency.items() if noise_ratio(row) > NOISY}
    if noisy:
        named = ", ".join(f"{name}'s p90 is {ratio:.1f} x its p50" for name, ratio in noisy.items())
        lines.append(
            f"The run was noisy: {named} (above {NOISY} x, some images waited for a core that other work held). "
            "Read the p50 column; `make bench` on a quiet machine measures latency properly."
        )
    else:
        lines.append(f"Every runtime's p90 is within {NOISY} x its p50: the measurement was steady.")
    return lines


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
    rows = parity_rows(checkpoint, onnx, images[:PARITY_IMAGES], log=lines.append)
    return lines, exit_code(rows)


def write_demo_report(
    out: Path,
    checkpoint: Path,
    onnx: Path,
    url: str,
    images: list[Path],
    stages: list[dict[str, Any]],
    schedule: Schedule,
    val_images: int,
) -> Path:
    """Measure parity and latency against the running server, then write OUT/report.md (and report.json) around
    ``stages`` (``demo_stages``) measured on ``val_images`` images."""
    parity, parity_code = parity_lines(checkpoint, onnx, images)
    paths = runtime_paths(checkpoint, onnx, url)
    latency, load = under_load(lambda: measure_latency(paths, images))
    latency_plot(latency, out / "latency.png")
    report = {"machine": machine(), "date": utc_now(), "schedule": asdict(schedule), "val_images": val_images}
    report |= {"stages": stages, "parity_ok": parity_code == 0, "latency": latency, "load": load}
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
        f"{report['machine']}; {report['date']}. No label was used to train the FreeSOLO stages: the synthetic "
        "images' ground truth is used only to measure them and to train the supervised upper bound they are read "
        "against.",
        "",
        "## Stages (class-agnostic mask metrics, percent, on the val images)",
        "",
        stage_section(report["stages"]),
        "",
        meaning(out, Schedule(**report["schedule"]), report["val_images"]),
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
        *load_lines(report["load"], report["latency"]),
        "",
        "| runtime | p50 ms | p90 ms | p90/p50 | p99 ms | images/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in report["latency"].items():
        rate = 1000 / row["mean_ms"] if row["mean_ms"] else 0.0
        cells = f"{row['p50_ms']:.1f} | {row['p90_ms']:.1f} | {noise_ratio(row):.1f} | {row['p99_ms']:.1f} | {rate:.1f}"
        lines.append(f"| {name} | {cells} |")
    lines += ["", *picture(out, out / "latency.png", "latency per runtime")]
    lines += ["## Served over gRPC (`freesolo infer --vis`)", ""]
    for file in sorted((out / "served").glob("*.png"))[:4]:
        lines += picture(out, file, f"served detections: {file.stem}")
    lines += ["## Loss curves", ""]
    for stage in ("pretrain", "weak", "selftrain/round1"):
        lines += picture(out, pipeline / stage / "loss_curve.png", f"{stage} loss")
    return "\n".join(lines).rstrip() + "\n"
