"""The FreeSOLO results report: every stage, three training seeds, a held-out set, the ablations, 10%-label
fine-tuning and the ladder, with the tiny preset's full schedules on the default synthetic set (labels are used only
by evaluation and by the labelled rows).

    python -m studies.freesolo_report --work runs/freesolo_report --out docs [--jobs 2] [--tables-only]

Per training seed (0, 1, 2: `freesolo pipeline --set seed=S` on the same 1000 training images), on the 200 val
images and on 2000 held-out images of another data seed (each half also on its own): the colour-statistics Free Mask
(the hand-made-feature baseline, ``freemask.low_level_weight=1``), the pipeline's Free Mask coarse masks, weak SOLO,
one self-training round, and the round's control (the weak model trained as many more steps on its own coarse
masks: what a round gains beyond it is what its labels teach); on the held-out set also the paper's round
(pseudo-labels alone) from the same teacher. On val, for seed 0: each of the tiny preset's
deviations from the paper undone one at a time (Free Mask's colour statistics, its filters and tau; the weak stage's
Dice loss and embedding weight, with the paper's L_avg and L_pairwise ablations; self-training's kept coarse masks),
the supervised upper bound, 10%-label fine-tuning (600 steps) from the FreeSOLO backbone (the self-trained
model's), from the DenseCL backbone and from scratch, and the ladder's rungs (a) and (b) at full size.

Every training is a job (``studies.jobs``) that is skipped when its output exists and resumes from its checkpoint,
jobs run in the order of the list above as their inputs appear, and every model's results are cached, so the
report resumes where it was killed. ``--tables-only`` trains nothing and writes the tables from what exists, with
dashes for the rest; ``OUT/freesolo_tables.md`` holds the tables, ``OUT/freesolo_results.json`` the numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from studies.freesolo_ladder import COLOUR, WEAK_ITERS, colour_jobs, free_mask, ladder_jobs, ladder_rows
from studies.jobs import Job, freesolo, run_jobs, sets
from studies.rows import NOT_MADE, coarse_results, coco_subset, folds, measured_row, trained_results
from training.config import load_preset
from training.engine.trainer import resume_option
from training.evaluate import load_ground_truth
from training.fileio import atomic_write_text
from training.pipeline import PipelinePaths
from training.report import stage_table

# The ablations: the paper's losses, and each of the tiny preset's deviations from the paper undone, one at a time,
# each weak training 800 steps (half the weak stage's schedule, so that they fit one session) from the main run's
# DenseCL backbone, beside the preset itself at 800 steps. Weak-stage ablations train on the main run's coarse masks.
ABLATION_ITERS = "weak.solver.iters=800"
WEAK = "weak.mask_loss=weak"
ABLATIONS = {
    "preset_800": ("the preset (full-mask Dice, no embedding loss)", []),
    "embedding_on": ("the paper's embedding loss on (beta 4)", ["weak.embedding_weight=4"]),
    "weak_losses": ("the paper's weak losses instead of Dice", [WEAK]),
    "weak_no_avg": ("the paper's weak losses, without L_avg", [WEAK, "weak.avg_weight=0"]),
    "weak_no_pairwise": ("the paper's weak losses, without L_pairwise", [WEAK, "weak.pairwise_weight=0"]),
}
# Free Mask with one deviation undone: its coarse masks on val, and a weak training on its coarse masks of the
# training images.
FREEMASK_ABLATIONS = {
    "no_colour": ("res5 alone, the paper's features (no colour statistics)", ["freemask.low_level_weight=0"]),
    "no_filters": (
        "no area filter, the paper's maskness threshold 0.7",
        ["freemask.min_area_fraction=0", "freemask.score_thr=0.7"],
    ),
    "tau_05": ("the paper's tau 0.5", ["freemask.mask_thr=0.5"]),
    "no_border": ("zero padding (no mirrored border cells)", ["freemask.border_cells=0"]),
    "no_centering": ("features not mean-centred", ["freemask.center_features=false"]),
}
LABEL_SHARE = 10  # every 10th training image keeps its labels: 10%
FINETUNE_ITERS = 600  # the 10%-label rows: 600 steps of 8 images, about 48 epochs of the 100 labelled images
FINETUNE_STARTS = {"freesolo": "the FreeSOLO backbone", "densecl": "the DenseCL backbone", "scratch": "scratch"}
# 10x the val split: small AP differences on 200 images are noise. An image depends only on (seed, index). Each fold
# (1000 images) is measured on its own too, to show how far AP moves between two evaluation sets alone.
HOLDOUT_IMAGES, HOLDOUT_SEED, HOLDOUT_FOLDS = 2000, 11, 2
ROUND_ITERS = load_preset("tiny").weak.selftrain_iters  # a self-training round's steps, and so its control's
SEEDS = (0, 1, 2)  # training seeds; seed 0's run is the main one (pictures, ablations, fine-tuning)
CACHE = "results_cache"  # models' results on the evaluation sets (training.report.model_results)
MIN_COARSE_AP, WEAK_OVER_COARSE = 0.08, 1.5  # issue 15's acceptance: coarse AP >= 8 %, weak >= 1.5 x its coarse


def run_folder(work: Path, seed: int) -> Path:
    return work / ("pipeline" if seed == 0 else f"seed{seed}")


def control_folder(work: Path, seed: int) -> Path:
    return work / f"control_seed{seed}"


def paper_round_folder(work: Path, seed: int) -> Path:
    """The paper's self-training round (the teacher's confident predictions alone) of a seed's pipeline."""
    return work / ("selftrain_pseudo_only" if seed == 0 else f"selftrain_pseudo_only_seed{seed}")


def final_model(run: Path) -> Path:
    """The self-trained model of a pipeline run (its one round)."""
    return PipelinePaths(run).selftrain / "round1" / "model.pt"


def weak_training(images: Path, coarse: Path, out: Path, init: Path, overrides: list[str]) -> Job:
    """A resumable weak-mode training on ``coarse`` from ``init``, with config overrides."""
    command = ["--images", str(images), "--ann", str(coarse), "--out", str(out), "--init", str(init)]
    command = freesolo("train", "--mode", "weak", *command, *resume_option(out), *sets(overrides))
    return Job(out.name, command, out / "model.pt", (coarse, init))


def labelled_subset(ann: Path, out: Path) -> Path:
    """Every LABEL_SHARE-th image of a COCO json with its annotations."""
    data = json.loads(ann.read_text())
    atomic_write_text(out, json.dumps(coco_subset(data, data["images"][::LABEL_SHARE])))
    return out


def seed_jobs(work: Path, data: Path, holdout: Path) -> list[Job]:
    """The three pipelines, Free Mask of the evaluation sets from each run's DenseCL model, and each run's control."""
    train = data / "train"
    jobs = []
    for seed in SEEDS:
        run = run_folder(work, seed)
        command = ["pipeline", "--images", str(train), "--out", str(run), "--set", f"seed={seed}"]
        if seed == 0:  # the main run writes the pipeline's own report and overlays on val
            command += ["--eval-images", str(data / "val"), "--eval-ann", str(data / "val.json")]
        done = run / "report.json" if seed == 0 else final_model(run)
        jobs.append(Job(f"pipeline_seed{seed}", freesolo(*command), done))
    for seed in SEEDS:
        paths = PipelinePaths(run_folder(work, seed))
        for name, images in (("eval", data / "val"), ("holdout", holdout / "val")):
            if seed == 0 and name == "eval":
                continue  # the main run's pipeline makes it
            out = paths.coarse_train.with_name(f"{name}.json")
            jobs.append(free_mask(f"freemask_{name}_seed{seed}", images, out, paths.pretrain.model, []))
    jobs += colour_jobs(work, {"val": data / "val", "holdout": holdout / "val"}, COLOUR)
    for seed in SEEDS:
        paths = PipelinePaths(run_folder(work, seed))
        overrides = [f"weak.solver.iters={ROUND_ITERS}", f"seed={seed}"]
        jobs.append(weak_training(train, paths.coarse_train, control_folder(work, seed), paths.weak.model, overrides))
    return jobs


def finetune_jobs(work: Path, data: Path) -> list[Job]:
    """10%-label supervised training from the FreeSOLO backbone, the DenseCL backbone and scratch."""
    main_run = PipelinePaths(run_folder(work, 0))
    backbone = work / "freesolo_backbone.pth"
    export = ["export-backbone", "--checkpoint", str(final_model(main_run.root)), "--format", "torchvision"]
    jobs = [
        Job(
            backbone.stem,
            freesolo(*export, "--out", str(backbone), progress=True),
            backbone,
            (final_model(main_run.root),),
        )
    ]
    subset = labelled_subset(data / "train.json", data / f"train_{100 // LABEL_SHARE}pct.json")
    starts = {"freesolo": backbone, "densecl": main_run.backbone, "scratch": None}
    for key, start in starts.items():
        out = work / f"finetune_{key}"
        command = ["train", "--images", str(data / "train"), "--ann", str(subset), "--out", str(out)]
        command += ["--class-agnostic", *resume_option(out), "--iters", str(FINETUNE_ITERS)]
        command += ["--init", str(start)] if start else []
        jobs.append(Job(out.name, freesolo(*command), out / "model.pt", (start,) if start else ()))
    return jobs


def freemask_folder(work: Path, slug: str) -> Path:
    return work / f"freemask_{slug}"


def val_extra_jobs(work: Path, data: Path) -> list[Job]:
    """The ablations (the paper's round, Free Mask's and the weak stage's) and the supervised upper bound, in the
    order they are worth a session's time: cheap Free Mask rows and the weak stage's deviations first."""
    train, main_run = data / "train", PipelinePaths(run_folder(work, 0))
    model = main_run.pretrain.model
    jobs = []
    for slug, (_, overrides) in FREEMASK_ABLATIONS.items():
        out = freemask_folder(work, slug) / "eval.json"
        jobs.append(free_mask(f"freemask_{slug}_val", data / "val", out, model, overrides))
    iters = [ABLATION_ITERS]
    for slug, (_, overrides) in ABLATIONS.items():
        out = work / f"ablation_{slug}"
        jobs.append(weak_training(train, main_run.coarse_train, out, main_run.backbone, [*iters, *overrides]))
    for seed in SEEDS:  # the paper's round beside each pipeline's own: no coarse masks given, so none are kept
        teacher, out = PipelinePaths(run_folder(work, seed)).weak.model, paper_round_folder(work, seed)
        command = ["selftrain", "--checkpoint", str(teacher), "--images", str(train), "--out", str(out)]
        jobs.append(Job(out.name, freesolo(*command, *sets([f"seed={seed}"])), out / "model.pt", (teacher,)))
    for slug, (_, overrides) in FREEMASK_ABLATIONS.items():
        coarse = freemask_folder(work, slug) / "train.json"
        jobs.append(free_mask(f"freemask_{slug}_train", train, coarse, model, overrides))
        jobs.append(weak_training(train, coarse, work / f"ablation_freemask_{slug}", main_run.backbone, iters))
    supervised = work / "supervised"
    command = ["train", "--images", str(train), "--ann", str(data / "train.json"), "--out", str(supervised)]
    command += ["--class-agnostic", *resume_option(supervised)]
    jobs.append(Job(supervised.name, freesolo(*command), supervised / "model.pt"))
    return jobs


def seed_rows(
    work: Path, seed: int, images: Path, ann: Path, coarse_name: str, parts: list[COCO]
) -> list[dict[str, Any]]:
    """One run's stages on an evaluation set, beside the colour baseline of the same images."""
    paths, truth, cache = PipelinePaths(run_folder(work, seed)), load_ground_truth(ann), work / CACHE
    colour = "val" if coarse_name == "eval" else coarse_name
    models = {
        f"weak SOLO ({WEAK_ITERS} steps)": paths.weak.model,
        f"after one self-training round ({ROUND_ITERS} steps)": final_model(paths.root),
        f"control: weak SOLO {ROUND_ITERS} more steps on its coarse masks": control_folder(work, seed) / "model.pt",
    }
    rows = [
        measured_row(
            "colour-statistics Free Mask (hand-made baseline)",
            truth,
            coarse_results(work / f"colour_{colour}.json", truth),
            parts,
        ),
        measured_row(
            "Free Mask coarse masks",
            truth,
            coarse_results(paths.coarse_train.with_name(f"{coarse_name}.json"), truth),
            parts,
        ),
    ]
    rows += [
        measured_row(name, truth, trained_results(model, images, ann, cache), parts) for name, model in models.items()
    ]
    return rows


ROUND_ROW = 3  # seed_rows' order: colour baseline, coarse masks, weak SOLO, the self-training round, its control


def checks(rows: list[dict[str, Any]]) -> dict[str, bool | None]:
    """Issue 15's acceptance on one run's rows (colour, coarse, weak, self-trained, control); None: not measured."""
    colour, coarse, weak, final, control = (row["AP"] for row in rows)
    tests = {
        "coarse AP >= 8 and >= the colour baseline": (
            (coarse, colour),
            lambda: coarse >= MIN_COARSE_AP and coarse >= colour,
        ),
        "weak AP >= 1.5 x its coarse masks": ((weak, coarse), lambda: weak >= WEAK_OVER_COARSE * coarse),
        "self-training above its teacher and its control": ((final, weak, control), lambda: final > max(weak, control)),
    }
    return {name: None if None in values else verdict() for name, (values, verdict) in tests.items()}


def val_extra_rows(work: Path, data: Path) -> list[dict[str, Any]]:
    """Seed 0 on val: the supervised upper bound, the ablations and 10%-label fine-tuning."""
    images, ann = data / "val", data / "val.json"
    truth, cache = load_ground_truth(ann), work / CACHE
    rows = []
    for slug, (name, _) in FREEMASK_ABLATIONS.items():
        coarse = coarse_results(freemask_folder(work, slug) / "eval.json", truth)
        rows.append(measured_row(f"Free Mask coarse masks, {name}", truth, coarse))
    runs = {"supervised upper bound (all labels)": work / "supervised"}
    runs.update({f"weak SOLO 800 steps, {name}": work / f"ablation_{slug}" for slug, (name, _) in ABLATIONS.items()})
    for slug, (name, _) in FREEMASK_ABLATIONS.items():
        runs[f"weak SOLO 800 steps on the coarse masks of Free Mask with {name}"] = work / f"ablation_freemask_{slug}"
    runs["one self-training round on pseudo-labels only (the paper's round)"] = paper_round_folder(work, 0)
    for key, name in FINETUNE_STARTS.items():
        runs[f"10% labels, from {name}"] = work / f"finetune_{key}"
    for name, run in runs.items():
        rows.append(measured_row(name, truth, trained_results(run / "model.pt", images, ann, cache)))
    return rows


def round_rows(
    work: Path, holdout: Path, parts: list[COCO], preset_rounds: dict[int, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each seed's two self-training rounds on the held-out set, where half a point is more than noise: the preset's
    (``preset_rounds``: its row of the seed's held-out stage table, already measured) and the paper's (pseudo-labels
    alone)."""
    images, ann = holdout / "val", holdout / "val.json"
    truth, cache = load_ground_truth(ann), work / CACHE
    rows = []
    for seed, preset in preset_rounds.items():
        marker = NOT_MADE if preset["name"].endswith(NOT_MADE) else ""
        name = f"seed {seed}: the preset's round (pseudo-labels + uncovered coarse masks)"
        rows.append({**preset, "name": name + marker})
        paper = trained_results(paper_round_folder(work, seed) / "model.pt", images, ann, cache)
        rows.append(measured_row(f"seed {seed}: the paper's round (pseudo-labels only)", truth, paper, parts))
    return rows


VERDICT = {None: "not measured", True: "yes", False: "NO"}
TITLE = "# FreeSOLO report tables (generated by `python -m studies.freesolo_report`)"
LEGEND = "Class-agnostic mask metrics in percent (pycocotools, `useCats=0`); `-`: not made yet."


def fold_table(rows: list[dict[str, Any]]) -> str:
    """Mask AP of each row on each fold of the held-out set."""
    lines = ["| stage | " + " | ".join(f"AP, fold {i + 1}" for i in range(HOLDOUT_FOLDS)) + " |"]
    lines.append("|---" * (HOLDOUT_FOLDS + 1) + "|")
    for row in rows:
        cells = [f"{100 * fold['AP']:.2f}" for fold in row.get("folds", [])] or ["-"] * HOLDOUT_FOLDS
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ap_by_seed(seeds: dict[int, dict[str, list[dict[str, Any]]]]) -> str:
    """Mask AP of every stage (rows) for every evaluation set and seed (columns), the stage table at a glance."""
    columns = [(where, seed) for where in ("val", "held-out") for seed in seeds]
    lines = ["| stage | " + " | ".join(f"{where}, seed {seed}" for where, seed in columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    first = seeds[next(iter(seeds))]["val"]
    for index, row in enumerate(first):
        cells = [seeds[seed][where][index]["AP"] for where, seed in columns]
        name = row["name"].removesuffix(NOT_MADE)
        lines.append(f"| {name} | " + " | ".join("-" if ap is None else f"{100 * ap:.1f}" for ap in cells) + " |")
    return "\n".join(lines)


def tables(report: dict[str, Any]) -> str:
    """The report as markdown: AP by seed, one table per seed and evaluation set, the checks, the seed-0 rows, the
    ladder."""
    parts = [TITLE, LEGEND, f"### Mask AP by seed\n\n{ap_by_seed(report['seeds'])}"]
    for seed, per_set in report["seeds"].items():
        for where, rows in per_set.items():
            parts.append(f"### Seed {seed}, {where}\n\n{stage_table(rows, digits=2)}")
            if where == "held-out":
                parts.append(fold_table(rows))
    lines = ["| seed | set | check | holds |", "|---|---|---|---|"]
    for seed, per_set in report["checks"].items():
        for where, verdicts in per_set.items():
            lines += [f"| {seed} | {where} | {name} | {VERDICT[held]} |" for name, held in verdicts.items()]
    parts.append("### Acceptance checks (issue 15)\n\n" + "\n".join(lines))
    extra = stage_table(report["val_extra"], digits=2)
    parts.append(f"### Seed 0, val: upper bound, the paper's round, ablations, fine-tuning\n\n{extra}")
    rounds = report["rounds_held_out"]
    parts.append(f"### Held-out: the preset's self-training round and the paper's\n\n{stage_table(rounds, digits=2)}")
    parts.append(fold_table(rounds))
    parts.append(f"### The ladder (val)\n\n{stage_table(report['ladder'], digits=2)}")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/freesolo_report"), help="working folder")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where the report goes (default docs)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time, one thread each (default 2)")
    parser.add_argument("--tables-only", action="store_true", help="train nothing; tabulate what exists")
    args = parser.parse_args(argv)
    work, data, holdout = args.work, args.work / "data", args.work / "holdout"
    if not (data / "val.json").is_file():
        subprocess.run(freesolo("data", "synth", "--out", str(data), progress=True), check=True)
    if not (holdout / "val.json").is_file():
        command = ["data", "synth", "--out", str(holdout), "--train", "0", "--val", str(HOLDOUT_IMAGES)]
        subprocess.run(freesolo(*command, "--seed", str(HOLDOUT_SEED), progress=True), check=True)
    started = time.perf_counter()
    jobs = seed_jobs(work, data, holdout)
    jobs += finetune_jobs(work, data)
    jobs += val_extra_jobs(work, data)
    jobs += ladder_jobs(work, data, WEAK_ITERS, [])  # last: at full size it costs about 1.5 hours of both cores
    if not args.tables_only:
        run_jobs(jobs, work / "logs", args.jobs)
    holdout_parts = folds(load_ground_truth(holdout / "val.json"), HOLDOUT_FOLDS)
    report: dict[str, Any] = {"seeds": {}, "checks": {}}
    for seed in SEEDS:
        on_val = seed_rows(work, seed, data / "val", data / "val.json", "eval", [])
        on_holdout = seed_rows(work, seed, holdout / "val", holdout / "val.json", "holdout", holdout_parts)
        report["seeds"][seed] = {"val": on_val, "held-out": on_holdout}
        report["checks"][seed] = {"val": checks(on_val), "held-out": checks(on_holdout)}
    report["val_extra"] = val_extra_rows(work, data)
    preset_rounds = {seed: per_set["held-out"][ROUND_ROW] for seed, per_set in report["seeds"].items()}
    report["rounds_held_out"] = round_rows(work, holdout, holdout_parts, preset_rounds)
    report["ladder"] = ladder_rows(work, data, work / CACHE)
    report["held_out"] = {"images": HOLDOUT_IMAGES, "seed": HOLDOUT_SEED, "folds": HOLDOUT_FOLDS}
    report["hours_of_this_invocation"] = round((time.perf_counter() - started) / 3600, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "freesolo_results.json", json.dumps(report, indent=2) + "\n")
    text = tables(report)
    atomic_write_text(args.out / "freesolo_tables.md", text)
    overlays = run_folder(work, 0) / "overlays.png"
    if overlays.is_file():
        shutil.copyfile(overlays, args.out / "freesolo_overlays.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
