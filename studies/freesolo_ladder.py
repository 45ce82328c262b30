"""The FreeSOLO ladder: which stage of the unsupervised pipeline broke, measured on the default synthetic set.

    python -m studies.freesolo_ladder --work runs/ladder [--backbone CKPT] [--iters N] [--set KEY=VALUE ...]

(a) the weak trainer given the ground-truth masks as coarse labels (one class, score 1, no embeddings) beside the
    supervised recipe (class-agnostic), both from scratch and as many steps: the weak trainer itself works when (a)
    comes within a few points;
(b) Free Mask from hand-made colour statistics (``freemask.low_level_weight=1``: a fixed, documented noisy coarse
    set) and the weak trainer on it (the tiny preset's weak stage, from scratch): the weak stage learns from noisy
    coarse masks when the model ends above its labels;
(c) Free Mask from a backbone (``--backbone``, with the preset's features) beside the colour-statistics baseline on
    the same images: the backbone's features help when (c) is at least the baseline.
Every number is class-agnostic mask AP on the val split (labels only in evaluation); every step is skipped when its
output exists, so the study resumes; trainings run one at a time with one thread (``--jobs`` for more). The results
report (``studies.freesolo_report``) runs the same rungs in its own folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from studies.jobs import Job, freesolo, run_jobs, sets
from studies.rows import coarse_results, measured_row, trained_results
from training.config import load_preset
from training.engine.trainer import resume_option
from training.evaluate import load_ground_truth
from training.fileio import atomic_write_text
from training.report import stage_table

COLOUR = ["freemask.low_level_weight=1"]
# The weak stage's own schedule: at 400 steps the weak model on colour-statistics coarse masks stays at a quarter of
# their AP, at 1600 it is above them (docs/freesolo_results.md), so a shorter rung (b) would not say whether it holds.
WEAK_ITERS = load_preset("tiny").weak.solver.iters


def truth_as_coarse(ann: Path, out: Path) -> Path:
    """Ground-truth masks as a coarse json: every annotation kept, scored 1."""
    if not out.is_file():
        document = json.loads(ann.read_text())
        document["annotations"] = [{**a, "score": 1.0} for a in document["annotations"]]
        atomic_write_text(out, json.dumps(document))
    return out


def free_mask(name: str, images: Path, out: Path, backbone: Path | None, overrides: list[str]) -> Job:
    """The job writing a Free Mask json of ``images``, from ``backbone`` (None: colour statistics alone)."""
    chosen = ["--backbone", str(backbone)] if backbone else []
    command = freesolo("freemask", "--images", str(images), "--out", str(out), *chosen, *sets(overrides))
    return Job(name, command, out, (backbone,) if backbone else ())


def training(images: Path, ann: Path, out: Path, mode: str, iters: int, overrides: list[str], *flags: str) -> Job:
    """The job of a resumable training run from scratch on ``ann``."""
    command = ["train", "--mode", mode, "--images", str(images), "--ann", str(ann), "--out", str(out)]
    command += resume_option(out)  # --resume only for a started run: it refuses a folder with nothing to resume
    return Job(out.name, freesolo(*command, "--iters", str(iters), *flags, *sets(overrides)), out / "model.pt", (ann,))


def colour_jobs(work: Path, folders: dict[str, Path], overrides: list[str]) -> list[Job]:
    """Free Mask from colour statistics (the hand-made-feature baseline) of each folder, as work/colour_NAME.json."""
    return [
        free_mask(f"colour_{name}", images, work / f"colour_{name}.json", None, overrides)
        for name, images in folders.items()
    ]


def ladder_jobs(work: Path, data: Path, iters: int, overrides: list[str]) -> list[Job]:
    """Rungs (a) and (b) in ``work`` on the synthetic set ``data``, with the colour baseline of its train and val
    images (rung (b)'s labels and rung (c)'s baseline)."""
    train, train_ann = data / "train", data / "train.json"
    truth = truth_as_coarse(train_ann, work / "truth_as_coarse.json")
    colour = [*COLOUR, *overrides]
    return [
        *colour_jobs(work, {"train": train, "val": data / "val"}, colour),
        training(train, train_ann, work / "a_supervised", "supervised", iters, overrides, "--class-agnostic"),
        training(train, truth, work / "a_weak_on_truth", "weak", iters, overrides),
        training(train, work / "colour_train.json", work / "b_weak_on_colour", "weak", iters, overrides),
    ]


def ladder_rows(work: Path, data: Path, cache: Path | None = None) -> list[dict[str, Any]]:
    """Rungs (a) and (b) on the val split of ``data``; rows of what is not made yet are dashes."""
    val, val_ann = data / "val", data / "val.json"
    truth = load_ground_truth(val_ann)
    rows = [("(a) supervised recipe (all labels)", "a_supervised")]
    rows.append(("(a) weak trainer, ground truth as coarse labels", "a_weak_on_truth"))
    measured = [
        measured_row(name, truth, trained_results(work / run / "model.pt", val, val_ann, cache)) for name, run in rows
    ]
    baseline = coarse_results(work / "colour_val.json", truth)
    measured.append(measured_row("(b) colour-statistics Free Mask (= (c) baseline)", truth, baseline))
    weak = trained_results(work / "b_weak_on_colour" / "model.pt", val, val_ann, cache)
    measured.append(measured_row("(b) weak trainer on the colour-statistics coarse masks", truth, weak))
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/ladder"), help="working folder")
    parser.add_argument("--backbone", type=Path, help="backbone of rung (c): a `freesolo pretrain` model.pt")
    parser.add_argument(
        "--iters", type=int, default=WEAK_ITERS, help=f"training steps of every rung (default {WEAK_ITERS})"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (all runs)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at a time (default 1)")
    args = parser.parse_args(argv)
    work, data = args.work, args.work / "data"
    if not (data / "val.json").is_file():
        subprocess.run(freesolo("data", "synth", "--out", str(data)), check=True)
    jobs = ladder_jobs(work, data, args.iters, args.set)
    if args.backbone:
        jobs.append(free_mask("backbone_val", data / "val", work / "backbone_val.json", args.backbone, args.set))
    run_jobs(jobs, work / "logs", args.jobs)
    rows = ladder_rows(work, data)
    if args.backbone:
        truth = load_ground_truth(data / "val.json")
        found = coarse_results(work / "backbone_val.json", truth)
        rows.append(measured_row("(c) Free Mask from the backbone", truth, found))
    table = stage_table(rows)
    atomic_write_text(work / "ladder.md", table + "\n")
    atomic_write_text(work / "ladder.json", json.dumps(rows, indent=2) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
