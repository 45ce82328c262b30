"""`make demo`: the main job end to end on the embedded default, through the real `freesolo` commands.

synthetic data -> `freesolo pipeline`: DenseCL pre-training -> Free Mask coarse masks -> self-supervised SOLO ->
one self-training round -> class-agnostic evaluation of every stage (pycocotools; the labels are used only here) ->
overlays of the coarse masks beside the final predictions; then the final model is exported to ONNX (Matrix NMS
inside), served by the real Triton Inference Server (python backend, 127.0.0.1 only) and queried over gRPC with
`freesolo infer` on held-out images; last, runs/demo/report.md puts the stage table, PyTorch-vs-ONNX parity, a
latency table of the three runtimes and the pictures on one page. The schedules are shortened from the tiny preset's
so the demo fits in about 11 minutes on 2 cores; every finished stage is skipped, so an interrupted demo resumes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.serving_setup import free_ports
from studies.demo_report import write_demo_report
from training.cli import main as freesolo

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
            "1/4 synthetic COCO set (labels used only for evaluation)",
            ["data", "synth", "--out", str(data), "--train", str(TRAIN_IMAGES)],
        )
    pipeline = ["pipeline", "--images", str(data / "train"), "--out", str(run)]
    pipeline += ["--eval-images", str(data / "val"), "--eval-ann", str(data / "val.json")]
    pipeline += ["--set", f"pretrain.solver.iters={pretrain_iters}", "--set", f"weak.solver.iters={weak_iters}"]
    pipeline += ["--set", f"weak.selftrain_iters={weak_iters}"]
    step("2/4 FreeSOLO without labels: pretrain -> freemask -> weak SOLO -> self-training -> evaluation", pipeline)
    onnx, final = out / "model.onnx", run / "selftrain" / "model.pt"
    if not onnx.is_file():
        step("3/4 export the final model: one ONNX graph, Matrix NMS inside", _export(final, onnx))
    serve(out, onnx, final, sorted((data / "val").iterdir())[:SERVED_IMAGES])
    print(f"\nreport: {out / 'report.md'}  stages: {run / 'report.md'}  served: {out / 'served'}")


def _export(checkpoint: Path, onnx: Path) -> list[str]:
    return ["export", "onnx", "--checkpoint", str(checkpoint), "--out", str(onnx)]


def serve(out: Path, onnx: Path, checkpoint: Path, images: list[Path]) -> None:
    """Serve the model with Triton, run `freesolo infer` over gRPC on ``images``, write the demo report while the
    server is up (its latency table includes Triton), always stop the server."""
    repo = out / "triton"
    step(
        "4/4 serve with Triton: prepare the repository",
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
        report = write_demo_report(out, checkpoint, onnx, f"127.0.0.1:{grpc}", images)
        print(f"    {report} in {time.perf_counter() - started:.0f} s", flush=True)
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
