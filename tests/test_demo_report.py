"""The demo's one-page report: the stage table with the supervised upper bound in whole percents and whether the
stages keep FreeSOLO's order, what the numbers mean at the demo's length, parity, latency of the three runtimes
against a real server with the load it ran under, and its pictures."""

from __future__ import annotations

import json
import os
from pathlib import Path

from serving.launcher import ServerState
from studies.demo_report import (
    RUNTIMES,
    Schedule,
    demo_stages,
    load_lines,
    order_sentence,
    stage_section,
    under_load,
    write_demo_report,
)

SCHEDULE = Schedule(pretrain_iters=100, weak_iters=200, train_images=400)


def pipeline_rows(*aps: float) -> list[dict[str, float | str]]:
    """The pipeline's report.json rows (fractions) with the given mask APs."""
    names = ("freemask", "weak", "selftrain1")
    return [
        {"name": n, "AP": ap, "AP50": 2 * ap, "AP75": ap / 2, "AR100": 0.25} for n, ap in zip(names, aps, strict=True)
    ]


def supervised(ap: float) -> dict[str, float | str]:
    return {"name": "supervised", "AP": ap, "AP50": 0.804, "AP75": 0.3, "AR100": 0.5}


def test_stage_table_has_the_supervised_bound_in_whole_percents() -> None:
    stages = demo_stages(pipeline_rows(0.0949, 0.1251, 0.1302), supervised(0.376), SCHEDULE)
    text = stage_section(stages)
    lines = text.splitlines()
    assert lines[0] == "| stage | mask AP | AP50 | AR100 |"
    assert lines[2:6] == [
        "| Free Mask coarse masks | 9 | 19 | 25 |",
        "| weak SOLO (200 steps on the coarse masks) | 13 | 25 | 25 |",
        "| self-training (one round, 200 steps) | 13 | 26 | 25 |",
        "| supervised upper bound (labels, 200 steps) | 38 | 80 | 50 |",
    ]
    assert "keep FreeSOLO's order" in text and "coarse masks 9.5 < weak SOLO 12.5 < self-training 13.0" in text


def test_a_broken_order_is_said_with_its_numbers() -> None:
    stages = demo_stages(pipeline_rows(0.05, 0.12, 0.11), supervised(0.30), SCHEDULE)
    sentence = order_sentence(stages)
    assert "do NOT keep" in sentence and "self-training 11.0 is not above weak SOLO 12.0" in sentence
    assert "coarse masks" not in sentence  # only the broken step is named
    stages = demo_stages(pipeline_rows(0.05, 0.12, 0.13), supervised(0.10), SCHEDULE)
    assert "supervised 10.0 is not above self-training 13.0" in order_sentence(stages)


def test_latency_context_names_the_load_and_flags_noise() -> None:
    latency, load = under_load(lambda: {name: {"p50_ms": 10.0, "p90_ms": 11.0} for name in RUNTIMES})
    assert load["cores"] == os.cpu_count() and load["load_1min_start"] >= 0
    assert load["busy_cores"] is None or 0 <= load["busy_cores"] <= load["cores"]
    steady = " ".join(load_lines(load, latency))
    assert "load average" in steady and "PyTorch" in steady and "steady" in steady and "noisy" not in steady
    quiet = {**load, "load_1min_start": 0.5, "load_1min_end": 0.5}
    assert not any("was loaded" in line for line in load_lines(quiet, latency))
    own_work = {**load, "load_1min_start": 0.5, "load_1min_end": 2.0 * load["cores"] + 1}  # the measurement's own
    assert not any("was loaded" in line for line in load_lines(own_work, latency))
    busy = {**load, "load_1min_start": 2.0 * load["cores"] + 1}
    assert any("was loaded" in line for line in load_lines(busy, latency))
    latency[RUNTIMES[0]]["p90_ms"] = 50.0  # PyTorch p90 5 x its p50, as in the run
    noisy = load_lines(load, latency)[-1]
    assert noisy.startswith("The run was noisy") and f"{RUNTIMES[0]}'s p90 is 5.0 x its p50" in noisy
    assert RUNTIMES[1] not in noisy and RUNTIMES[2] not in noisy


def test_demo_report_measures_every_runtime_and_links_its_pictures(
    tmp_path: Path, lively_checkpoint: Path, dynamic_onnx: Path, shared_server: ServerState, synth_data: Path
) -> None:
    stages = demo_stages(pipeline_rows(0.002, 0.004, 0.006), supervised(0.4), SCHEDULE)
    images = sorted((synth_data / "val").iterdir())[:2]

    path = write_demo_report(
        tmp_path, lively_checkpoint, dynamic_onnx, shared_server.grpc_url, images, stages, SCHEDULE, 200
    )

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["parity_ok"] is True
    assert set(report["latency"]) == set(RUNTIMES)
    for row in report["latency"].values():
        assert row["runs"] == 2 * 3  # two images, three timed rounds
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert report["load"]["torch_threads"] >= 1 and report["schedule"]["weak_iters"] == 200
    text = path.read_text()
    assert stage_section(stages) in text
    assert "| supervised upper bound (labels, 200 steps) | 40 |" in text
    assert "weak SOLO 200 (1600)" in text and "measured on 200 val images" in text  # the demo's and the preset's
    results_link = text.split("[docs/freesolo_results.md](")[1].split(")")[0]
    assert (tmp_path / results_link).resolve() == Path(__file__).resolve().parents[1] / "docs" / "freesolo_results.md"
    assert "parity: PASS" in text
    assert all(f"| {name} |" in text for name in RUNTIMES)
    assert "| runtime | p50 ms | p90 ms | p90/p50 |" in text and "1-minute load average" in text
    assert (tmp_path / "latency.png").stat().st_size > 0
    assert "![latency per runtime](latency.png)" in text
    assert "overlays.png" not in text  # pictures that do not exist are not linked
