"""The demo's one-page report: parity, latency of the three runtimes against a real server, stage table, pictures."""

from __future__ import annotations

import json
from pathlib import Path

from serving.launcher import ServerState
from studies.demo_report import RUNTIMES, write_demo_report


def test_demo_report_measures_every_runtime_and_links_its_pictures(
    tmp_path: Path, lively_checkpoint: Path, dynamic_onnx: Path, shared_server: ServerState, synth_data: Path
) -> None:
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    stages = [{"name": "freemask", "AP": 0.002, "AP50": 0.013, "AP75": 0.0, "AR100": 0.019}]
    (pipeline / "report.json").write_text(json.dumps({"stages": stages}))
    images = sorted((synth_data / "val").iterdir())[:2]

    path = write_demo_report(tmp_path, lively_checkpoint, dynamic_onnx, shared_server.grpc_url, images)

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["parity_ok"] is True
    assert set(report["latency"]) == set(RUNTIMES)
    for row in report["latency"].values():
        assert row["runs"] == 2 * 3  # two images, three timed rounds
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    text = path.read_text()
    assert "| freemask | 0.2 | 1.3 | 0.0 | 1.9 |" in text
    assert "parity: PASS" in text
    assert all(f"| {name} |" in text for name in RUNTIMES)
    assert (tmp_path / "latency.png").stat().st_size > 0
    assert "![latency per runtime](latency.png)" in text
    assert "overlays.png" not in text  # pictures that do not exist are not linked
