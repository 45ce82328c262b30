"""The run directory's ``log.jsonl`` (one json object per logged iteration) and its loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

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


def plot_losses(log_path: Path, out_path: Path, title: str) -> None:
    """Every ``loss*`` series against the iteration, log-scaled, with the learning rate on a second axis."""
    entries = read_log(log_path)
    if not entries:
        return
    keys = sorted({k for entry in entries for k in entry if k.startswith("loss")})
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    iterations = [entry["iter"] for entry in entries]
    for key in keys:
        axis.plot(
            iterations,
            [entry.get(key, float("nan")) for entry in entries],
            label=key,
            linewidth=2.0 if key == "loss" else 1.0,
        )
    axis.set_yscale("log")
    axis.set_xlabel("iteration")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    axis.legend(loc="upper right")
    if "lr" in entries[0]:
        lr_axis = axis.twinx()
        lr_axis.plot(iterations, [entry["lr"] for entry in entries], color="grey", linestyle=":", label="lr")
        lr_axis.set_ylabel("learning rate", color="grey")
    figure.tight_layout()
    atomic_write(out_path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
