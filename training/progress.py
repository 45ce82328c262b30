"""Progress of long work: a tqdm bar on a terminal; in a log file or a pipe, one plain line every ``PERIOD_S``
seconds instead (carriage-return bars fill a log with redrawn bars). Bars appear only after ``BAR_DELAY_S``, so a
command that fails at once on bad input prints its one error line, not a 0 % bar before it."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

PERIOD_S = 30.0
BAR_DELAY_S = 0.5


class LineProgress:
    """tqdm's ``update``, ``set_postfix`` and ``close`` as plain lines on ``stream``: one every ``PERIOD_S`` seconds,
    and a last one at the end when any was printed (work shorter than a period prints nothing)."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, stream: TextIO | None = None) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream or sys.stderr
        self.started = self.last = time.monotonic()
        self.postfix = ""
        self.printed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= PERIOD_S:
            self.line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def line(self) -> None:
        self.last = time.monotonic()
        self.printed = True
        extra = f" ({self.postfix})" if self.postfix else ""
        elapsed = self.last - self.started
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} in {elapsed:.0f} s{extra}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.printed:
            self.line()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0) -> tqdm | LineProgress:
    """A bar on a terminal, plain periodic lines elsewhere, nothing when not ``enabled``."""
    if enabled and not sys.stderr.isatty():
        return LineProgress(total, desc, unit, initial)
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not enabled,
        dynamic_ncols=True,
        delay=BAR_DELAY_S,
    )
