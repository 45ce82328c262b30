"""`make demo`: the main job end to end on the embedded default, through the real `freesolo` commands.

synthetic data -> supervised class-agnostic tiny training (the upper bound the unsupervised pipeline is compared
to) -> class-agnostic evaluation with pycocotools -> predictions with overlay pictures. Every step that already
finished is skipped, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from training.cli import main as freesolo
from training.evaluate import format_table

VIS_IMAGES = 8


def step(title: str, argv: list[str]) -> None:
    """Run one `freesolo` command, stop the demo if it fails."""
    print(f"\n==> {title}\n    freesolo {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    code = freesolo(argv)
    if code:
        sys.exit(code)
    print(f"    done in {time.perf_counter() - started:.0f} s", flush=True)


def run_demo(out: Path, iters: int | None) -> None:
    data, run = out / "data", out / "supervised"
    if not (data / "val.json").is_file():
        step("1/4 synthetic COCO set (labels used only for evaluation)", ["data", "synth", "--out", str(data)])
    train = [
        "train",
        "--images",
        str(data / "train"),
        "--ann",
        str(data / "train.json"),
        "--out",
        str(run),
        "--preset",
        "tiny",
        "--class-agnostic",
        "--resume",
    ]
    step("2/4 supervised class-agnostic SOLOv2, tiny preset", train + (["--iters", str(iters)] if iters else []))
    model = str(run / "model.pt")
    step(
        "3/4 class-agnostic evaluation (pycocotools)",
        [
            "eval",
            "--checkpoint",
            model,
            "--images",
            str(data / "val"),
            "--ann",
            str(data / "val.json"),
            "--class-agnostic",
            "--json",
            str(out / "metrics_class_agnostic.json"),
        ],
    )
    images = sorted((data / "val").glob("*.png"))[:VIS_IMAGES]
    step(
        "4/4 predictions with overlays",
        [
            "predict",
            "--checkpoint",
            model,
            *map(str, images),
            "--out",
            str(out / "predictions.json"),
            "--vis",
            str(out / "overlays"),
        ],
    )
    metrics = json.loads((out / "metrics_class_agnostic.json").read_text())
    print("\n" + format_table(metrics, "demo: supervised tiny on the synthetic val split (class-agnostic)"))
    print(f"\nrun directory: {run}  (loss curve: {run / 'loss_curve.png'})\noverlays: {out / 'overlays'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo folder (default runs/demo)")
    parser.add_argument("--iters", type=int, help="training iterations (default: the tiny preset's schedule)")
    args = parser.parse_args(argv)
    run_demo(args.out, args.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
