"""The studies' trainings as a graph of resumable jobs: each job is one `freesolo` command that writes a known file
when it succeeds and may start once the files it reads exist, so a study killed anywhere is resumed by running it
again, and independent trainings share the cores as soon as their inputs are there."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

POLL_SECONDS = 5


def freesolo(*argv: str, progress: bool = False) -> list[str]:
    """The command line of a `freesolo` subcommand run with this interpreter."""
    return [sys.executable, "-m", "training.cli", *argv, *([] if progress else ["--no-progress"])]


def sets(overrides: list[str]) -> list[str]:
    """Config overrides as `--set` options."""
    return [item for override in overrides for item in ("--set", override)]


@dataclass(frozen=True)
class Job:
    """A command that writes ``done`` when it succeeds; it may start once every file in ``needs`` exists."""

    name: str
    command: list[str]
    done: Path
    needs: tuple[Path, ...] = ()

    def ready(self) -> bool:
        return all(path.exists() for path in self.needs)


def run_jobs(jobs: list[Job], logs: Path, width: int) -> None:
    """Run the jobs whose ``done`` file is missing, ``width`` at a time with one thread each (several two-thread
    trainings on 2 cores thrash), each as soon as its inputs exist, earlier jobs first; stop at the first failure,
    at a job that exits 0 without writing its ``done`` file, or when no job can start and none is running."""
    pending = [job for job in jobs if not job.done.exists()]
    running: list[tuple[Job, subprocess.Popen]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    logs.mkdir(parents=True, exist_ok=True)
    while pending or running:
        pending = [job for job in pending if not job.done.exists()]  # made meanwhile, e.g. by a job of the same file
        for job in [job for job in pending if job.ready()][: width - len(running)]:
            if job.done in {other.done for other, _ in running}:
                continue  # another job is making the same file
            pending.remove(job)
            print(f"start  {job.name}", flush=True)
            with (logs / f"{job.name}.log").open("w") as log:
                running.append((job, subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, env=env)))
        if not running:
            if not pending:
                break
            missing = sorted({str(path) for job in pending for path in job.needs if not path.exists()})
            raise SystemExit(f"no job can start; missing inputs: {', '.join(missing)}")
        time.sleep(POLL_SECONDS)
        for job, process in list(running):
            if process.poll() is None:
                continue
            running.remove((job, process))
            if process.returncode:
                raise SystemExit(f"{job.name} failed (exit {process.returncode}); see {logs / job.name}.log")
            if not job.done.exists():
                raise SystemExit(f"{job.name} exited 0 without writing {job.done}; see {logs / job.name}.log")
            print(f"done   {job.name}", flush=True)
