"""`make demo`: the main job end to end on the embedded default, through the real `freesolo` commands.

synthetic data -> `freesolo pipeline`: DenseCL pre-training -> Free Mask coarse masks -> self-supervised SOLO ->
one self-training round -> class-agnostic evaluation of every stage (pycocotools; the labels are used only here) ->
overlays of the coarse masks beside the final predictions. The schedules are shortened from the tiny preset's so the
demo fits in about 15 minutes on 2 cores; every finished stage is skipped, so an interrupted demo resumes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from training.cli import main as freesolo

TRAIN_IMAGES = 400  # 40% of the default set: Free Mask and the pseudo-labels go over every training image


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
            "1/2 synthetic COCO set (labels used only for evaluation)",
            ["data", "synth", "--out", str(data), "--train", str(TRAIN_IMAGES)],
        )
    pipeline = ["pipeline", "--images", str(data / "train"), "--out", str(run)]
    pipeline += ["--eval-images", str(data / "val"), "--eval-ann", str(data / "val.json")]
    pipeline += ["--set", f"pretrain.solver.iters={pretrain_iters}", "--set", f"weak.solver.iters={weak_iters}"]
    step("2/2 FreeSOLO without labels: pretrain -> freemask -> weak SOLO -> self-training -> evaluation", pipeline)
    print(f"\nreport: {run / 'report.md'}  overlays: {run / 'overlays.png'}")


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
