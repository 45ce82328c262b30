"""The run directory's ``log.jsonl`` (one json object per logged iteration) and its loss-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from training.fileio import atomic_write, atomic_write_text


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(path: Path, last_iteration: int) -> None:
    """Drop entries past a checkpoint (they are redone after resuming), so the log never repeats iterations."""
    kept = [entry for entry in read_log(path) if entry.get("iter", 0) <= last_iteration]
    atomic_write_text(path, "".join(json.dumps(entry) + "\n" for entry in kept))


def append_log(path: Path, entry: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def positive_or_gap(values: list[float]) -> list[float]:
    """A series as a log axis can draw it: values <= 0 (a loss logged as 0 or -0.0) become gaps, not a line falling
    off the bottom of the axis."""
    return [value if value > 0 else math.nan for value in values]


def loss_figure(entries: list[dict[str, Any]], title: str) -> Figure:
    """Every ``loss*`` series against the iteration, log-scaled, with the learning rate on a second axis; the legend
    sits outside, below the axes, so it covers no curve. A series with no positive value (a loss whose weight is 0
    logs 0) is not drawn: the legend says so."""
    figure = Figure(figsize=(7, 4.4), dpi=100, layout="constrained")
    axis = figure.subplots()
    iterations = [entry["iter"] for entry in entries]
    handles, labels = [], []
    for key in sorted({k for entry in entries for k in entry if k.startswith("loss")}):
        values = positive_or_gap([entry.get(key, math.nan) for entry in entries])
        if all(math.isnan(value) for value in values):
            handles.append(Line2D([], [], linestyle="none"))
            labels.append(f"{key}: 0 throughout, not drawn")
            continue
        (line,) = axis.plot(iterations, values, linewidth=2.0 if key == "loss" else 1.0)
        handles.append(line)
        labels.append(key)
    axis.set_yscale("log")
    axis.set_xlabel("iteration")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    if "lr" in entries[0]:
        lr_axis = axis.twinx()
        (line,) = lr_axis.plot(iterations, [entry["lr"] for entry in entries], color="grey", linestyle=":")
        lr_axis.set_ylabel("learning rate", color="grey")
        handles.append(line)
        labels.append("lr (right axis)")
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize="small")
    return figure


def plot_losses(log_path: Path, out_path: Path, title: str) -> None:
    """The run's loss curves as a PNG (see ``loss_figure``); nothing before the first logged iteration."""
    entries = read_log(log_path)
    if entries:
        figure = loss_figure(entries, title)
        atomic_write(out_path, lambda tmp: figure.savefig(tmp, format="png"))
