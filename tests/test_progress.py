"""Progress output: bars only on a terminal; in logs and pipes plain lines, with no carriage returns."""

from __future__ import annotations

import io

import pytest
from tqdm import tqdm

from training import progress
from training.progress import LineProgress


def test_a_log_gets_plain_periodic_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "PERIOD_S", 0.0)  # every update is due
    stream = io.StringIO()
    with LineProgress(3, "train", "it", stream=stream) as bar:
        for _ in range(3):
            bar.update(1)
            bar.set_postfix(loss="0.500")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0].startswith("train: 1/3 it in ") and lines[-1].endswith("(loss=0.500)") and len(lines) == 4


def test_short_work_prints_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "PERIOD_S", 3600.0)
    stream = io.StringIO()
    with LineProgress(2, "eval", "image", stream=stream) as bar:
        bar.update(2)
    assert stream.getvalue() == ""


def test_bars_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    assert isinstance(progress.progress(5, "x", "it"), LineProgress)
    assert progress.progress(5, "x", "it", enabled=False).disable

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    bar = progress.progress(5, "x", "it")
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()
