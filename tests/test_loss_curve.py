"""The loss-curve PNG of a run: a loss logged as 0 (its weight is 0) draws no line falling off the log axis, a loss
that is 0 for a while leaves a gap, and the legend sits outside the axes, covering no curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image

from training.engine.run_log import loss_figure, plot_losses

ITERS = range(10, 210, 10)


def entries() -> list[dict[str, float]]:
    """A weak stage's log: the embedding loss off (logged as -0.0), the pairwise loss after its warm-up."""
    return [
        {
            "iter": i,
            "lr": 0.002 * min(1.0, i / 100),
            "loss": 3.0 / (1 + i / 50),
            "loss_mask": 2.0 / (1 + i / 50),
            "loss_embed": -0.0,
            "loss_pairwise": 0.0 if i < 100 else 0.3,
        }
        for i in ITERS
    ]


def test_zero_series_are_not_drawn_and_the_legend_covers_no_curve() -> None:
    figure = loss_figure(entries(), "tiny - weak")
    figure.draw_without_rendering()
    axis, lr_axis = figure.axes
    plotted = [line.get_ydata() for line in axis.get_lines()]
    assert len(plotted) == 3  # loss, loss_mask, loss_pairwise: not loss_embed
    pairwise = plotted[2]
    assert all(math.isnan(v) for v in pairwise[:9]) and all(v == 0.3 for v in pairwise[9:])  # a gap, then the line
    low, high = axis.get_ylim()
    assert low > 0.2 and high < 4  # the axis spans the drawn values: nothing pulled it toward 0
    legend = figure.legends[0]
    texts = [text.get_text() for text in legend.get_texts()]
    assert texts == ["loss", "loss_embed: 0 throughout, not drawn", "loss_mask", "loss_pairwise", "lr (right axis)"]
    box = legend.get_window_extent()
    for data_area in (axis.get_window_extent(), lr_axis.get_window_extent()):
        assert not box.overlaps(data_area)


def test_plot_losses_writes_the_picture_of_a_run_log(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(entry) + "\n" for entry in entries()))
    plot_losses(log, tmp_path / "loss_curve.png", "tiny - weak")
    with Image.open(tmp_path / "loss_curve.png") as picture:
        assert picture.format == "PNG" and picture.width > 500
    plot_losses(tmp_path / "missing.jsonl", tmp_path / "none.png", "nothing logged")
    assert not (tmp_path / "none.png").exists()
