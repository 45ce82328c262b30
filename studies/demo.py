"""`make demo`: the main job end to end on the embedded default, through the real `freesolo` commands.

synthetic data -> `freesolo pipeline`: DenseCL pre-training -> Free Mask coarse masks -> self-supervised SOLO ->
one self-training round -> class-agnostic evaluation of every stage (pycocotools; the labels are used only here) ->
overlays of the coarse masks beside the final predictions; then the supervised upper bound (`freesolo train` on the
labels, class-agnostic, as many steps as the weak stage) for the stage table to be read against; then the final
model is exported to ONNX (Matrix NMS inside), served by the real Triton Inference Server (python backend, 127.0.0.1
only) and queried over gRPC with `freesolo infer` on held-out images; last, runs/demo/report.md puts the stage table,
what it means at the demo's length, PyTorch-vs-ONNX parity, a latency table of the three runtimes with the load it
ran under, and the pictures on one page. The schedules are shortened from the tiny preset's; every finished stage is
skipped, so an interrupted demo resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from benchmarks.serving_setup import free_ports
from studies.demo_report import Schedule, demo_stages, stage_section, write_demo_report
from training.cli import main as freesolo
from training.engine.trainer import resume_option
from training.evaluate import load_ground_truth
from training.report import model_results, stage_row

TRAIN_IMAGES = 400  # 40% of the default set: Free Mask and the pseudo-labels go over every training image
SERVED_IMAGES = 8  # held-out val images sent to the server


def step(title: str, argv: list[str]) -> None:
    """Run one `freesolo` command, stop the demo if it fails."""
    print(f"\n==> {title}\n    freesolo {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    code = freesolo(argv)
    if code:
        sys.exit(code)
    print(f"    done in {time.perf_counter() - started:.0f} s", flush=True)


def run_demo(out: Path, pretrain_iters: int, weak_iters: int) -> None:
    data, run = out / "data", out / "pipeline"
    if not (data / "val.json").is_file():
        step(
            "1/5 synthetic COCO set (labels used only for evaluation and the supervised upper bound)",
            ["data", "synth", "--out", str(data), "--train", str(TRAIN_IMAGES)],
        )
    pipeline = ["pipeline", "--images", str(data / "train"), "--out", str(run)]
    pipeline += ["--eval-images", str(data / "val"), "--eval-ann", str(data / "val.json")]
    pipeline += ["--set", f"pretrain.solver.iters={pretrain_iters}", "--set", f"weak.solver.iters={weak_iters}"]
    pipeline += ["--set", f"weak.selftrain_iters={weak_iters}"]
    step("2/5 FreeSOLO without labels: pretrain -> freemask -> weak SOLO -> self-training -> evaluation", pipeline)
    supervised = out / "supervised"
    if not (supervised / "model.pt").is_file():
        step(
            f"3/5 the supervised upper bound: the labels, class-agnostic, {weak_iters} steps like the weak stage",
            _supervised(data, supervised, weak_iters),
        )
    schedule = Schedule(pretrain_iters, weak_iters, TRAIN_IMAGES)
    ground_truth = load_ground_truth(data / "val.json")
    stages = demo_stages(json.loads((run / "report.json").read_text())["stages"], _bound(out, ground_truth), schedule)
    print(f"\n==> stage table (class-agnostic, percent, on the val images)\n{stage_section(stages)}", flush=True)
    onnx, final = out / "model.onnx", run / "selftrain" / "model.pt"
    if not onnx.is_file():
        step("4/5 export the final model: one ONNX graph, Matrix NMS inside", _export(final, onnx))
    served = sorted((data / "val").iterdir())[:SERVED_IMAGES]
    val_images = len(ground_truth.getImgIds())
    serve(out, onnx, served, lambda url: write_demo_report(out, final, onnx, url, served, stages, schedule, val_images))
    print(f"\nreport: {out / 'report.md'}  stages: {run / 'report.md'}  served: {out / 'served'}")


def _supervised(data: Path, run: Path, iters: int) -> list[str]:
    command = ["train", "--images", str(data / "train"), "--ann", str(data / "train.json"), "--out", str(run)]
    return [*command, "--class-agnostic", "--iters", str(iters), *resume_option(run)]


def _bound(out: Path, ground_truth: COCO) -> dict[str, Any]:
    """The supervised model's row on the val images (its results cached beside it: a resumed demo reads them)."""
    val, ann = out / "data" / "val", out / "data" / "val.json"
    found = model_results(out / "supervised" / "model.pt", val, ann, progress=False, cache=out / "supervised" / "eval")
    return stage_row("supervised", ground_truth, found)


def _export(checkpoint: Path, onnx: Path) -> list[str]:
    return ["export", "onnx", "--checkpoint", str(checkpoint), "--out", str(onnx)]


def serve(out: Path, onnx: Path, images: list[Path], report: Callable[[str], Path]) -> None:
    """Serve the model with Triton, run `freesolo infer` over gRPC on ``images``, write the demo report (``report``
    of the server's gRPC address) while the server is up (its latency table includes Triton), always stop the
    server."""
    repo = out / "triton"
    step(
        "5/5 serve with Triton: prepare the repository",
        ["serve", "prepare", "--onnx", str(onnx), "--repo", str(repo), "--force"],
    )
    free = free_ports()  # so the demo never collides with a server already running
    grpc = free.grpc
    ports = ["--grpc-port", str(grpc), "--http-port", str(free.http), "--metrics-port", str(free.metrics)]
    step("    start tritonserver (127.0.0.1)", ["serve", "start", "--repo", str(repo), *ports])
    try:
        infer = ["infer", "--url", f"127.0.0.1:{grpc}", *map(str, images)]
        infer += ["--out", str(out / "served" / "predictions.json"), "--vis", str(out / "served")]
        step(f"    freesolo infer over gRPC on {len(images)} held-out images", infer)
        print("\n==> the demo report: parity, latency of PyTorch / ONNX Runtime / Triton, pictures", flush=True)
        started = time.perf_counter()
        page = report(f"127.0.0.1:{grpc}")
        print(f"    {page} in {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        step("    stop the server", ["serve", "stop", "--repo", str(repo)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo folder (default runs/demo)")
    parser.add_argument("--pretrain-iters", type=int, default=100, help="DenseCL iterations (default 100)")
    parser.add_argument(
        "--weak-iters", type=int, default=200, help="iterations of weak training and of self-training (default 200)"
    )
    args = parser.parse_args(argv)
    run_demo(args.out, args.pretrain_iters, args.weak_iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
