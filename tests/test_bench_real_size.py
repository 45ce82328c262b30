"""The real-size benchmark's quick form, run for real (tiny preset at 128 x 224): every runtime timed at batch 1 and 4
in its own worker with its peak memory, the CPU's flags, `freesolo parity` and served-equals-predicted verdicts, the
report files and the headline rows. No wall-clock limits: only that every row and field is there and consistent."""

from __future__ import annotations

import json

import pytest

from benchmarks.headlines import headline_rows
from benchmarks.real_size import BASE, BATCH, QUICK, run
from benchmarks.reporting import CPU_FLAGS
from benchmarks.run import PART_NAMES
from benchmarks.runtime_worker import RUNTIMES
from serving.server_binary import pytriton_root

pytestmark = pytest.mark.skipif(pytriton_root() is None, reason="no tritonserver (nvidia-pytriton)")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("real_size")
    returned = run(out, quick=True)
    written = json.loads((out / "real_size.json").read_text())
    assert written == json.loads(json.dumps(returned))
    return {"report": written, "out": out}


def test_the_head_names_the_machine_and_its_flags(quick: dict) -> None:
    report = quick["report"]
    assert "real_size" in PART_NAMES and report["quick"] and report["threads"] >= 1
    assert report["machine"] and set(report["cpu_flags"]) <= set(CPU_FLAGS)
    assert report["plan"]["presets"] == list(QUICK.presets) and report["runtimes"] == list(RUNTIMES)
    text = (quick["out"] / "real_size.md").read_text()
    assert f"CPU flags: {' '.join(report['cpu_flags']) or 'unknown'};" in text


def test_every_runtime_is_timed_at_both_batches_with_its_memory(quick: dict) -> None:
    (preset,) = quick["report"]["presets"]
    assert preset["preset"] == "tiny" and preset["canvas"] == "128x224" and preset["resized"] == "128x224"
    runtimes = preset["runtimes"]
    assert set(runtimes) == set(RUNTIMES)
    for name, row in runtimes.items():
        for batch, runs in ((1, QUICK.runs), (BATCH, QUICK.batch_runs)):
            timing = row[f"batch{batch}"]
            assert timing["runs"] == runs and 0 < timing["p50_ms"] <= timing["p90_ms"], (name, batch)
            assert timing["images_per_s"] == pytest.approx(1000 * batch / timing["mean_ms"], rel=1e-3)
            base = runtimes[BASE][f"batch{batch}"]["p50_ms"]
            assert timing["speedup"] == pytest.approx(base / timing["p50_ms"], rel=1e-2)
            assert len(timing["num_dets"]) == batch and sum(timing["num_dets"]) > 0, (name, batch)
        assert 0 < row["baseline_rss_mb"] <= row["peak_rss_mb"], name
        assert row["peak_above_baseline_mb"] == pytest.approx(row["peak_rss_mb"] - row["baseline_rss_mb"], abs=0.1)
    assert runtimes[BASE]["batch1"]["speedup"] == 1.0
    # each worker imports only its runtime: ONNX Runtime's never loads torch
    assert max(runtimes[n]["baseline_rss_mb"] for n in ("ort_fp32", "ort_int8")) < min(
        runtimes[n]["baseline_rss_mb"] for n in ("pytorch_fp32", "pytorch_bf16")
    )
    assert runtimes[BASE]["layout"] in runtimes[BASE]["layout_probe_ms"]
    assert set(runtimes[BASE]["layout_probe_ms"]) == {"contiguous", "channels_last"}


def test_export_parity_and_serving_verdicts(quick: dict) -> None:
    (preset,) = quick["report"]["presets"]
    export, parity, served = preset["export"], preset["parity"], preset["serving"]
    assert export["dynamic"] and export["calibration_photographs"] == QUICK.calibration
    assert export["int8_mb"] < export["fp32_mb"]
    assert parity["passed"] and len(parity["images"]) == 3 and parity["worst_mask_iou"] >= 0.98
    assert parity["worst_score_diff"] <= 1e-3 and parity["worst_heads_diff"] is not None
    assert any(line.startswith("parity: PASS") for line in parity["table"])
    assert served["passed"] and served["problems"] == [] and len(served["images"]) == 3
    assert served["detections_served"] == served["detections_predicted"] and sum(served["detections_served"]) > 0


def test_report_files_and_headlines(quick: dict) -> None:
    out, report = quick["out"], quick["report"]
    text = (out / "real_size.md").read_text()
    for name in RUNTIMES:
        for batch in (1, BATCH):
            assert f"| {name} | {batch} |" in text
    assert "**PASS**" in text and "layout:" in text
    assert (out / "real_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = headline_rows({"real_size": report})
    assert len(rows) == 2 and all(row["part"] == "real_size" for row in rows)
    assert "parity PASS, served = predicted PASS" in rows[1]["value"]
