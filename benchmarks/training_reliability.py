"""Does a run killed with SIGKILL resume to the result it would have had? Real processes, real signals.

- Training: ``freesolo train --mode supervised --preset tiny`` on a small synthetic set, once uninterrupted (the
  reference) and once killed (``os.killpg(SIGKILL)`` on its own process group) and resumed with ``--resume``. The
  first kill fires while the second checkpoint is being written (a ``.checkpoint.pt.*.tmp`` file exists): the
  checkpoint left behind must load; full mode kills the resumed run once more, between two checkpoints. The final
  model.pt is compared tensor by tensor with the reference (max abs difference, equal within atol 1e-5, rtol 0), and
  the log's losses iteration by iteration.
- Free Mask: ``freesolo freemask`` with a random torchvision ResNet-18, killed once some images are in its parts file,
  then rerun with the same command. The final json must hold every image exactly once, unique annotation ids, and
  the same images and annotations as an uninterrupted run.

Each scenario waits for its trigger by polling the run's own files (no fixed sleeps). The runs that go to their end
(references, resumes) are subprocesses too, except in quick mode, where they call the same ``freesolo`` entry point in
this process to save interpreter starts. Every run uses the same number of threads, so CPU results are reproducible.
Writes OUT/training_reliability.json, .md and .png.

    .venv/bin/python -m benchmarks.training_reliability --out runs/bench
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torchvision

from benchmarks.reporting import machine, part_parser, utc_now, write_report
from training.checkpoint import load_checkpoint
from training.cli import main as freesolo
from training.engine.run_log import read_log
from training.errors import UserError
from training.fileio import atomic_write
from training.freemask_run import parts_dir

STEM = "training_reliability"
ATOL = 1e-5  # on every weight, rtol 0
POLL_S = 0.002  # how often a trigger looks at the run's files (writing a 140 MB tiny checkpoint takes longer)
FREEMASK_POLL_S = 0.02  # its trigger counts the lines of a growing file; a batch takes far longer
DEADLINE_S = 900.0  # a run that never reaches its trigger is a failure, not a hang
FREEMASK_SETTINGS = ["--set", "freemask.score_thr=0.3"]  # a random backbone's maskness is low: keep a few masks


@dataclass(frozen=True)
class Kill:
    """Kill at ``iteration``: "save" while the checkpoint of that iteration is being written, "iteration" once the
    log shows it done (the process is then inside the next one)."""

    kind: str
    iteration: int


@dataclass(frozen=True)
class Plan:
    images: int
    iters: int
    batch_size: int
    checkpoint_period: int
    kills: tuple[Kill, ...]  # increasing and more than one apart, so no kill fires on the log of the one before
    freemask_batch: int
    freemask_kill_after: int  # complete image lines in the parts file


QUICK = Plan(8, 6, 1, 2, (Kill("save", 4),), 2, 2)
FULL = Plan(24, 20, 2, 4, (Kill("save", 8), Kill("iteration", 14)), 4, 8)


def say(message: str) -> None:
    print(f"[{STEM}] {message}", file=sys.stderr, flush=True)


class Runner:
    """Runs ``freesolo`` commands with a fixed thread count. Runs to be killed are subprocesses in their own process
    group (killed as a whole); runs that go to their end are subprocesses too, or, with ``in_process``, calls of the
    same entry point in this process."""

    def __init__(self, work: Path, threads: int, in_process: bool) -> None:
        self.work = work
        self.threads = threads
        self.in_process = in_process
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.logs: dict[int, Path] = {}

    def start(self, argv: list[str]) -> subprocess.Popen:
        log = self.work / f"process{len(self.logs) + 1}.log"
        command = [sys.executable, "-m", "training.cli", *argv]
        with log.open("wb") as output:
            process = subprocess.Popen(
                command, env=self.env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.logs[process.pid] = log
        return process

    def complete(self, argv: list[str]) -> float:
        """Run a command to its end; returns its wall time in seconds."""
        started = time.perf_counter()
        if self.in_process:
            threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                code, output = freesolo(argv), "see above"
            finally:
                torch.set_num_threads(threads)
        else:
            process = self.start(argv)
            code = process.wait()
            output = " ".join(self.logs[process.pid].read_text(errors="replace").strip().splitlines()[-3:])
        if code != 0:
            raise UserError(f"freesolo {argv[0]} failed ({code}): {output}")
        return time.perf_counter() - started

    def kill_when(self, argv: list[str], trigger: Callable[[], bool], poll_s: float = POLL_S) -> float:
        """Start a command, SIGKILL its process group as soon as ``trigger()`` holds; returns seconds to the kill."""
        process = self.start(argv)
        started = time.perf_counter()
        while not trigger():
            if process.poll() is not None:
                raise UserError(f"freesolo {argv[0]} ended ({process.returncode}) before its kill point")
            if time.perf_counter() - started > DEADLINE_S:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise UserError(f"freesolo {argv[0]} did not reach its kill point in {DEADLINE_S:.0f} s")
            time.sleep(poll_s)
        os.killpg(process.pid, signal.SIGKILL)
        if process.wait() != -signal.SIGKILL:
            raise UserError(f"freesolo {argv[0]} was not killed by SIGKILL (exit {process.returncode})")
        return time.perf_counter() - started


def last_logged(log: Path) -> int:
    """The last iteration in log.jsonl; a line being written is ignored."""
    last = 0
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                last = max(last, int(json.loads(line)["iter"]))
            except (json.JSONDecodeError, KeyError):
                continue
    return last


def checkpoint_temporaries(run: Path) -> list[Path]:
    """Temporary files of checkpoint.pt writes in progress (or left behind by a kill during one)."""
    return sorted(run.glob(".checkpoint.pt.*.tmp"))


def kill_trigger(run: Path, kill: Kill) -> Callable[[], bool]:
    """ "save": the log shows the iteration and a checkpoint temporary exists (or, if the write was missed between two
    polls, the next iteration is logged); "iteration": the log shows the iteration."""
    log = run / "log.jsonl"
    if kill.kind == "iteration":
        return lambda: last_logged(log) >= kill.iteration
    before = set(checkpoint_temporaries(run))

    def during_save() -> bool:
        done = last_logged(log)
        return done > kill.iteration or (done == kill.iteration and bool(set(checkpoint_temporaries(run)) - before))

    return during_save


def tensor_differences(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs difference of every tensor (inf where a tensor is missing or its shape differs)."""
    differences = {}
    for key, value in reference.items():
        mine = other.get(key)
        if mine is None or mine.shape != value.shape:
            differences[key] = float("inf")
        else:
            differences[key] = float((mine.double() - value.double()).abs().max()) if value.numel() else 0.0
    differences.update({key: float("inf") for key in other.keys() - reference.keys()})
    return differences


def training_scenario(runner: Runner, plan: Plan, data: Path) -> dict[str, Any]:
    """The reference run, the killed-and-resumed run, and their comparison."""
    common = ["train", "--images", str(data / "train"), "--ann", str(data / "train.json"), "--mode", "supervised"]
    common += ["--preset", "tiny", "--iters", str(plan.iters), "--batch-size", str(plan.batch_size), "--no-progress"]
    common += ["--set", f"solver.checkpoint_period={plan.checkpoint_period}", "--set", "solver.log_period=1"]
    reference, killed = runner.work / "train_reference", runner.work / "train_killed"
    say(f"training: reference run, {plan.iters} iterations")
    reference_s = runner.complete([*common, "--out", str(reference)])

    kills = []
    for number, kill in enumerate(plan.kills):
        say(f"training: kill {number + 1} ({kill.kind} at iteration {kill.iteration})")
        argv = [*common, "--out", str(killed)] + (["--resume"] if number else [])
        seconds = runner.kill_when(argv, kill_trigger(killed, kill))
        leftovers = checkpoint_temporaries(killed)
        started = time.perf_counter()
        checkpoint = load_checkpoint(killed / "checkpoint.pt")  # raises if the kill left it half-written
        kills.append(
            {
                "kind": kill.kind,
                "target_iteration": kill.iteration,
                "seconds_to_kill": round(seconds, 2),
                "iterations_done_at_kill": last_logged(killed / "log.jsonl"),
                "checkpoint_iteration": int(checkpoint["iteration"]),
                "checkpoint_load_s": round(time.perf_counter() - started, 3),
                "killed_during_checkpoint_write": bool(leftovers),
                "model_pt_exists": (killed / "model.pt").exists(),
            }
        )
    say("training: resume to the end")
    resume_s = runner.complete([*common, "--out", str(killed), "--resume"])
    stale = len(checkpoint_temporaries(killed))  # the resumed run removes what a kill during a write left

    expected = load_checkpoint(reference / "model.pt")["model"]
    differences = tensor_differences(expected, load_checkpoint(killed / "model.pt")["model"])
    worst = max(differences, key=differences.__getitem__)
    largest = differences[worst]
    reference_log, resumed_log = read_log(reference / "log.jsonl"), read_log(killed / "log.jsonl")
    iterations = [entry["iter"] for entry in resumed_log]
    loss_difference = max(
        (abs(a["loss"] - b["loss"]) for a, b in zip(reference_log, resumed_log, strict=False)), default=float("inf")
    )
    first_checkpoint = plan.checkpoint_period
    mid_run = all(first_checkpoint < k["iterations_done_at_kill"] < plan.iters for k in kills)
    resumed_from_checkpoint = all(first_checkpoint <= k["checkpoint_iteration"] < plan.iters for k in kills)
    weights_equal = largest <= ATOL
    log_ok = iterations == list(range(1, plan.iters + 1)) and loss_difference <= ATOL
    return {
        "iters": plan.iters,
        "batch_size": plan.batch_size,
        "checkpoint_period": plan.checkpoint_period,
        "images": plan.images,
        "reference_s": round(reference_s, 2),
        "resume_s": round(resume_s, 2),
        "kills": kills,
        "tensors": len(differences),
        "max_abs_weight_difference": largest,
        "worst_tensor": worst if largest > 0 else None,
        "tensors_differing": sum(d > 0 for d in differences.values()),
        "atol": ATOL,
        "weights_equal_within_atol": weights_equal,
        "log_iterations_once_each": iterations == list(range(1, plan.iters + 1)),
        "max_abs_loss_difference": loss_difference,
        "killed_mid_run": mid_run,
        "stale_temporaries_after_resume": stale,
        "passed": weights_equal and log_ok and mid_run and resumed_from_checkpoint and not stale,
        "losses": {
            "reference": [[e["iter"], e["loss"]] for e in reference_log],
            "resumed": [[e["iter"], e["loss"]] for e in resumed_log],
        },
    }


def complete_lines(part: Path) -> int:
    return part.read_bytes().count(b"\n") if part.is_file() else 0


def coarse_json_check(document: dict[str, Any], expected_names: list[str]) -> dict[str, Any]:
    """Every image exactly once, unique ids, annotations pointing at existing images."""
    names = Counter(image["file_name"] for image in document["images"])
    image_ids = Counter(image["id"] for image in document["images"])
    annotation_ids = Counter(ann["id"] for ann in document["annotations"])
    return {
        "images": len(document["images"]),
        "annotations": len(document["annotations"]),
        "duplicate_images": sum(count - 1 for count in names.values()),
        "missing_images": len(set(expected_names) - names.keys()),
        "unexpected_images": len(names.keys() - set(expected_names)),
        "duplicate_image_ids": sum(count - 1 for count in image_ids.values()),
        "duplicate_annotation_ids": sum(count - 1 for count in annotation_ids.values()),
        "orphan_annotations": sum(ann["image_id"] not in image_ids for ann in document["annotations"]),
    }


def annotation_differences(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """How the rerun's output differs from the uninterrupted one (all zero and identical when they agree)."""
    pairs = list(zip(reference["annotations"], other["annotations"], strict=False))
    return {
        "identical": reference["images"] == other["images"] and reference["annotations"] == other["annotations"],
        "annotation_count_difference": len(other["annotations"]) - len(reference["annotations"]),
        "masks_differing": sum(a["segmentation"] != b["segmentation"] for a, b in pairs),
        "max_abs_score_difference": max((abs(a["score"] - b["score"]) for a, b in pairs), default=0.0),
        "max_abs_embedding_difference": max(
            (abs(x - y) for a, b in pairs for x, y in zip(a["embedding"], b["embedding"], strict=True)), default=0.0
        ),
    }


def freemask_scenario(runner: Runner, plan: Plan, data: Path) -> dict[str, Any]:
    """The uninterrupted Free Mask run, the killed one and its rerun, and their comparison."""
    backbone = runner.work / "resnet18.pth"
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    atomic_write(backbone, lambda tmp: torch.save(state, tmp))
    images = data / "train"
    common = ["freemask", "--images", str(images), "--backbone", str(backbone), "--no-progress"]
    common += ["--set", f"freemask.batch_size={plan.freemask_batch}", *FREEMASK_SETTINGS]
    reference, killed = runner.work / "coarse_reference.json", runner.work / "coarse_killed.json"
    say(f"freemask: reference run, {plan.images} images")
    reference_s = runner.complete([*common, "--out", str(reference)])

    say(f"freemask: kill after {plan.freemask_kill_after} images")
    part = parts_dir(killed) / "rank0.jsonl"
    argv = [*common, "--out", str(killed)]
    seconds = runner.kill_when(argv, lambda: complete_lines(part) >= plan.freemask_kill_after, FREEMASK_POLL_S)
    done_at_kill = complete_lines(part)
    partial_line = part.is_file() and not part.read_bytes().endswith(b"\n") and part.stat().st_size > 0
    output_after_kill = killed.exists()
    say("freemask: rerun")
    resume_s = runner.complete(argv)

    expected_names = sorted(str(p.relative_to(images)) for p in images.iterdir() if p.is_file())
    result = json.loads(killed.read_text())
    check = coarse_json_check(result, expected_names)
    compared = annotation_differences(json.loads(reference.read_text()), result)
    clean = all(
        check[key] == 0
        for key in (
            "duplicate_images",
            "missing_images",
            "unexpected_images",
            "duplicate_image_ids",
            "duplicate_annotation_ids",
            "orphan_annotations",
        )
    )
    mid_run = 0 < done_at_kill < plan.images
    return {
        "images_total": plan.images,
        "batch_size": plan.freemask_batch,
        "reference_s": round(reference_s, 2),
        "seconds_to_kill": round(seconds, 2),
        "images_done_at_kill": done_at_kill,
        "partial_line_at_kill": partial_line,
        "output_written_before_rerun": output_after_kill,
        "resume_s": round(resume_s, 2),
        "parts_removed": not parts_dir(killed).exists(),
        **check,
        **compared,
        "killed_mid_run": mid_run,
        "passed": clean and compared["identical"] and mid_run and not output_after_kill,
    }


def plot(training: dict[str, Any], out: Path) -> None:
    """Loss per iteration, uninterrupted vs killed and resumed, with the kill points."""
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    for name, style in (("reference", {"linewidth": 3, "alpha": 0.4}), ("resumed", {"linestyle": "--"})):
        points = training["losses"][name]
        axis.plot([p[0] for p in points], [p[1] for p in points], label=f"{name}", **style)
    for number, kill in enumerate(training["kills"]):
        axis.axvline(
            kill["iterations_done_at_kill"], color="red", linestyle=":", label="SIGKILL" if not number else None
        )
    axis.set_xlabel("iteration")
    axis.set_ylabel("loss")
    axis.set_title(f"killed and resumed vs uninterrupted (max weight diff {training['max_abs_weight_difference']:.1e})")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    atomic_write(out / f"{STEM}.png", lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def markdown(report: dict[str, Any]) -> str:
    training, freemask = report["training"], report["freemask"]
    verdict = {True: "pass", False: "FAIL"}
    where = "calls in this process" if report["finishing_runs_in_process"] else "subprocesses"
    lines = [
        f"# Reliability under SIGKILL: training and Free Mask ({report['machine']}, {report['threads']} threads, "
        f"{report['date']}{', quick' if report['quick'] else ''})",
        "",
        f"Load average {report['load_average_start']:.2f} at start, {report['load_average_end']:.2f} at end; "
        f"{report['total_s']:.0f} s in all. Killed runs are subprocesses; the runs that go to their end (references, "
        f"resumes) are {where}, so their times {'exclude' if report['finishing_runs_in_process'] else 'include'} "
        "the interpreter's start.",
        "",
        f"## Training ({training['iters']} iterations, batch {training['batch_size']}, checkpoint every "
        f"{training['checkpoint_period']}, {training['images']} images): {verdict[training['passed']]}",
        "",
        "| kill | trigger | iterations done at kill | checkpoint left (loads) | killed during checkpoint write |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {n + 1} | {k['kind']} at {k['target_iteration']} | {k['iterations_done_at_kill']} | "
        f"{k['checkpoint_iteration']} | {'yes' if k['killed_during_checkpoint_write'] else 'no'} |"
        for n, k in enumerate(training["kills"])
    ]
    lines += [
        "",
        f"- final model.pt vs uninterrupted: max abs difference {training['max_abs_weight_difference']:.3g} over "
        f"{training['tensors']} tensors ({training['tensors_differing']} differ at all"
        + (f"; worst `{training['worst_tensor']}`" if training["worst_tensor"] else "")
        + f"); equal within atol {training['atol']:g}, rtol 0: "
        f"{training['weights_equal_within_atol']}",
        f"- log.jsonl: every iteration once: {training['log_iterations_once_each']}; max abs loss difference "
        f"{training['max_abs_loss_difference']:.3g}",
        f"- resume to the end: {training['resume_s']:.1f} s; uninterrupted run {training['reference_s']:.1f} s; "
        f"stale checkpoint temporaries after resuming: {training['stale_temporaries_after_resume']}",
        "",
        f"## Free Mask ({freemask['images_total']} images, batch {freemask['batch_size']}): "
        f"{verdict[freemask['passed']]}",
        "",
        "| killed after (images) | partial line | rerun s | images | duplicates | missing | duplicate annotation ids "
        "| annotations | identical to uninterrupted |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {freemask['images_done_at_kill']} | {'yes' if freemask['partial_line_at_kill'] else 'no'} | "
        f"{freemask['resume_s']:.1f} | {freemask['images']} | {freemask['duplicate_images']} | "
        f"{freemask['missing_images']} | {freemask['duplicate_annotation_ids']} | {freemask['annotations']} | "
        f"{freemask['identical']} |",
        "",
        f"Uninterrupted Free Mask: {freemask['reference_s']:.1f} s. Masks differing "
        f"{freemask['masks_differing']}, max score difference {freemask['max_abs_score_difference']:.3g}, max "
        f"embedding difference {freemask['max_abs_embedding_difference']:.3g}.",
        "",
        f"![training loss of the uninterrupted run and of the killed and resumed run]({STEM}.png)",
    ]
    return "\n".join(lines) + "\n"


def run(out: Path, quick: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Both scenarios in a temporary folder; the report goes to OUT. ``threads`` defaults to this process's torch
    threads (OMP_NUM_THREADS)."""
    threads = threads or torch.get_num_threads()
    plan = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": STEM,
        "machine": machine(),
        "date": utc_now(),
        "torch": torch.__version__,
        "threads": threads,
        "quick": quick,
        "finishing_runs_in_process": quick,
        "load_average_start": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory(prefix="freesolo-reliability-") as folder:
        runner = Runner(Path(folder), threads, in_process=quick)
        data = runner.work / "data"
        say(f"synthesising {plan.images} images")
        runner.complete(["data", "synth", "--out", str(data), "--train", str(plan.images), "--val", "0"])
        report["training"] = training_scenario(runner, plan, data)
        report["freemask"] = freemask_scenario(runner, plan, data)
    report["passed"] = report["training"]["passed"] and report["freemask"]["passed"]
    report["load_average_end"] = os.getloadavg()[0]
    report["total_s"] = round(time.perf_counter() - started, 1)
    plot(report["training"], out)
    write_report(out, STEM, report, markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = part_parser(__doc__, Path("runs/bench"), "a few iterations and images (seconds)")
    parser.add_argument("--threads", type=int, help="torch threads of every run (default: OMP_NUM_THREADS or all)")
    args = parser.parse_args(argv)
    return 0 if run(args.out, args.quick, args.threads)["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
