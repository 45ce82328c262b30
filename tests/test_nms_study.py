"""The Matrix NMS study's quick form, run for real: every method at every N, the Matrix NMS implementations agreeing
on the same inputs, AP of each NMS on a small checkpoint, and the files it leaves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import nms_study
from benchmarks.bench_model import BenchModel
from triton_plugins.matrix_nms import host_build


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, lively_checkpoint: Path, synth_data: Path) -> dict:
    model = BenchModel(lively_checkpoint, synth_data / "train", synth_data / "val", synth_data / "val.json")
    out = tmp_path_factory.mktemp("nms_study")
    result = nms_study.run(out, quick=True, model=model)
    result["out"] = out
    return result


def test_every_method_at_every_size(report: dict) -> None:
    assert report["sizes"] == list(nms_study.QUICK.sizes)
    not_run = {"matrix_tensorrt"} | (set() if torch.cuda.is_available() else {"matrix_triton"})
    not_run |= set() if host_build.find_compiler() else {"matrix_cuda_host"}
    for method in nms_study.METHODS:
        rows = report["timing"][method.key]
        assert [row["n"] for row in rows] == report["sizes"], method.key
        for row in rows:
            if method.key in not_run:
                assert row["status"].startswith("not run:"), (method.key, row)
                continue
            assert row["status"] == "ok", (method.key, row)
            assert row["runs"] >= nms_study.QUICK.min_runs
            assert 0 < row["p50_ms"] <= row["p90_ms"], (method.key, row)


def test_matrix_nms_implementations_agree(report: dict) -> None:
    for row in report["agreement"]:
        assert row["decayed_fraction"] > 0.1, row  # overlaps enough that agreement means something
        diffs = row["max_abs_diff"]
        assert diffs["matrix_onnxruntime"] is not None
        assert (diffs["matrix_cuda_host"] is not None) == (host_build.find_compiler() is not None)
        for key, diff in diffs.items():
            assert diff is None or diff <= 1e-5, (key, row)


def test_candidate_masks_follow_the_node_contract() -> None:
    inputs = nms_study.candidate_masks(30, side=32)
    assert inputs["masks"].shape == (1, 30, 32, 32) and inputs["masks"].dtype == np.float32
    assert set(np.unique(inputs["masks"])) <= {0.0, 1.0}
    assert inputs["labels"].dtype == np.int32 and inputs["labels"].shape == (1, 30)
    assert np.all(np.diff(inputs["scores"][0]) <= 0)
    np.testing.assert_array_equal(inputs["areas"][0], inputs["masks"][0].sum(axis=(1, 2)))


def test_ap_of_each_nms(report: dict) -> None:
    ap = report["ap"]
    assert ap["images"] == 4
    assert [row["name"] for row in ap["variants"]] == [variant.key for variant in nms_study.AP_VARIANTS]
    for row in ap["variants"]:
        assert row["detections"] > 0, row
        for key in ("AP", "AP50", "AP75", "AR100"):
            assert 0.0 <= row[key] <= 1.0, row
        assert row["AP50"] >= row["AP75"]
        assert row["postprocess_ms_per_image"] > 0


def test_files_written(report: dict) -> None:
    out: Path = report["out"]
    saved = json.loads((out / "nms_study.json").read_text())
    assert saved["ratios"]["n"] == 50 and saved["total_s"] > 0 and "machine" in saved
    text = (out / "nms_study.md").read_text()
    for method in nms_study.METHODS:
        assert method.label in text
    for picture in ("nms_time.png", "nms_ap.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({picture})" in text
