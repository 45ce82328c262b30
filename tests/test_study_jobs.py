"""The studies' job graph: jobs start once their inputs exist, finished jobs are skipped, and a failed job, a job
that does not write its output, or inputs nothing will make stop the study with a message naming them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import studies.jobs as jobs_module
from studies.jobs import Job, run_jobs


@pytest.fixture(autouse=True)
def fast_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_module, "POLL_SECONDS", 0.05)


def writer(out: Path, reads: Path | None = None) -> list[str]:
    """A command that writes ``out`` (with the text of ``reads`` when given, which must exist)."""
    source = f"open({str(reads)!r}).read() + '+'" if reads else "'first'"
    return [sys.executable, "-c", f"open({str(out)!r}, 'w').write({source})"]


def test_jobs_wait_for_their_inputs_whatever_their_order(tmp_path: Path) -> None:
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    graph = [
        Job("third", writer(third, second), third, (second,)),
        Job("second", writer(second, first), second, (first,)),
        Job("first", writer(first), first),
    ]
    run_jobs(graph, tmp_path / "logs", width=2)
    assert third.read_text() == "first++"
    assert (tmp_path / "logs" / "third.log").is_file()


def test_finished_jobs_are_skipped(tmp_path: Path) -> None:
    done = tmp_path / "done"
    done.write_text("kept")
    run_jobs([Job("done", writer(done), done)], tmp_path / "logs", width=1)
    assert done.read_text() == "kept"


def test_a_failed_job_stops_the_study_and_names_its_log(tmp_path: Path) -> None:
    failing = Job("broken", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "never")
    with pytest.raises(SystemExit, match=r"broken failed \(exit 3\); see .*broken\.log"):
        run_jobs([failing], tmp_path / "logs", width=1)


def test_a_job_that_writes_nothing_is_an_error(tmp_path: Path) -> None:
    silent = Job("silent", [sys.executable, "-c", "pass"], tmp_path / "expected")
    with pytest.raises(SystemExit, match=r"silent exited 0 without writing .*expected"):
        run_jobs([silent], tmp_path / "logs", width=1)


def test_inputs_no_job_makes_are_named(tmp_path: Path) -> None:
    orphan = Job("orphan", writer(tmp_path / "out"), tmp_path / "out", (tmp_path / "nobody_makes_this",))
    with pytest.raises(SystemExit, match=r"no job can start; missing inputs: .*nobody_makes_this"):
        run_jobs([orphan], tmp_path / "logs", width=1)


def test_two_jobs_of_one_file_run_once(tmp_path: Path) -> None:
    out, runs = tmp_path / "shared", tmp_path / "runs"
    count = [sys.executable, "-c", f"open({str(runs)!r}, 'a').write('x'); open({str(out)!r}, 'w').write('')"]
    run_jobs([Job("one", count, out), Job("same", count, out)], tmp_path / "logs", width=2)
    assert runs.read_text() == "x"
