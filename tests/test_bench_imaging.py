"""The imaging benchmark's quick form, run for real: the project's decode + resize and Pillow's timed side by side
on one generated JPEG, with the ratio, the machine and the headline row the bench report shows."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.headlines import headline_rows
from benchmarks.imaging import QUICK_RUNS, run
from benchmarks.run import PART_NAMES


def test_quick_imaging_bench_reports_the_ratio_to_pillow(tmp_path: Path) -> None:
    report = run(tmp_path, quick=True)
    assert "imaging" in PART_NAMES
    assert report["image"]["megapixels"] == 2.0 and report["resized_to"] == [800, 1067]
    medians = report["median_ms"]
    assert set(medians) == {"project", "pillow", "pillow_draft", "project_decode_only", "project_resize_only"}
    assert all(value > 0 for value in medians.values()) and report["runs"] == QUICK_RUNS
    assert report["ratio_to_pillow"]["project"] == round(medians["project"] / medians["pillow"], 2)
    assert report["machine"] and isinstance(report["cpu_flags"], list)
    assert json.loads((tmp_path / "imaging.json").read_text()) == report
    assert "| 1.00x |" in (tmp_path / "imaging.md").read_text()
    (row,) = headline_rows({"imaging": report})
    assert row["part"] == "imaging" and f"{report['ratio_to_pillow']['project']:.2f}x Pillow's time" in row["value"]
