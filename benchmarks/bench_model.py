"""The trained model the benchmarks measure accuracy with: the tiny preset trained with labels on a small synthetic
set, made once by the real `freesolo` commands and reused (``make bench`` stays inside its time budget).

Speed does not depend on what weights learned, but the AP columns (int8 and bf16 against fp32, each NMS of the
Matrix NMS study) need a model that finds objects; the unsupervised models of the demo are too weak (mask AP < 1 %) for
their differences to mean anything. ``runs/bench/model/`` holds the data and the run; a finished run is reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.cli import main as freesolo
from training.engine.trainer import resume_option
from training.errors import UserError

TRAIN_IMAGES = 300
VAL_IMAGES = 100
ITERS = 200  # about 4.5 minutes on 2 cores (300 steps: 6.5 min, mask AP 10 %, AP50 20 % on its val)


@dataclass(frozen=True)
class BenchModel:
    checkpoint: Path
    train_images: Path
    val_images: Path
    val_ann: Path


def ensure_bench_model(work: Path = Path("runs/bench/model"), iters: int = ITERS) -> BenchModel:
    """Synthesise the data and train the model unless ``work`` already holds them; returns where they are."""
    data, run = work / "data", work / "supervised"
    model = BenchModel(run / "model.pt", data / "train", data / "val", data / "val.json")
    if not model.val_ann.is_file():
        synth = ["data", "synth", "--out", str(data), "--train", str(TRAIN_IMAGES), "--val", str(VAL_IMAGES)]
        if freesolo(synth) != 0:
            raise UserError(f"could not write the benchmark's synthetic data to {data}")
    if not model.checkpoint.is_file():
        train = ["train", "--images", str(model.train_images), "--ann", str(data / "train.json"), "--out", str(run)]
        train += ["--mode", "supervised", "--iters", str(iters), *resume_option(run)]
        if freesolo(train) != 0:
            raise UserError(f"training the benchmark model in {run} failed")
    return model
