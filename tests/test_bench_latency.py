"""The latency benchmark's quick form, run for real: every runtime timed, FLOPs that add up and scale with the
input, ORT bf16 refused with its reason, ORT fp32 scoring what PyTorch scores.

The small checkpoint (``lively_checkpoint``) is untrained: against the synthetic ground truth every runtime scores
AP 0, which would make "ORT fp32 scores what PyTorch scores" vacuous. So its val images are labelled with its own
PyTorch fp32 masks: PyTorch then scores about 1, and each runtime's AP says how closely it reproduces PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pycocotools import mask as mask_utils
from torch import nn

from benchmarks.bench_model import BenchModel
from benchmarks.latency import FLOP_PARTS, RUNTIMES, flops, run
from benchmarks.torch_runtimes import Bf16Network
from export.onnx_export import BF16_UNSUPPORTED, preset_model
from training.config import load_preset
from training.data.coco import CocoInstances
from training.inference import Predictor
from training.models import SOLOv2


@pytest.fixture(scope="module")
def self_labelled(tmp_path_factory: pytest.TempPathFactory, lively_checkpoint: Path, synth_data: Path) -> BenchModel:
    """The lively checkpoint with the synthetic val images labelled by its own PyTorch fp32 masks."""
    predictor = Predictor.from_checkpoint(lively_checkpoint)
    dataset = CocoInstances(synth_data / "val", synth_data / "val.json", predictor.test_policy)
    found = predictor.dataset_results(dataset, progress=False)
    assert len(found) >= 2 * len(dataset)
    ground_truth = json.loads((synth_data / "val.json").read_text())
    ground_truth["annotations"] = [
        {**result, "id": index, "area": float(mask_utils.area(result["segmentation"])), "iscrowd": 0}
        for index, result in enumerate(found, start=1)
    ]
    path = tmp_path_factory.mktemp("self_labelled") / "val.json"
    path.write_text(json.dumps(ground_truth))
    return BenchModel(lively_checkpoint, synth_data / "train", synth_data / "val", path)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, self_labelled: BenchModel) -> dict:
    out = tmp_path_factory.mktemp("latency")
    returned = run(out, quick=True, model=self_labelled)
    written = json.loads((out / "latency.json").read_text())
    assert written == json.loads(json.dumps(returned))
    return {"json": written, "out": out}


def test_every_runtime_is_timed(report: dict) -> None:
    cases = report["json"]["cases"]
    assert cases and report["json"]["threads"] >= 1
    for case in cases:
        assert set(case["runtimes"]) == set(RUNTIMES)
        for name, row in case["runtimes"].items():
            assert row["runs"] == case["repeats"]
            assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"], name
            assert row["images_per_s"] == pytest.approx(1000 / row["mean_ms"], rel=1e-3)
            assert row["gflop_per_s"] == pytest.approx(case["gflops"] / row["p50_ms"] * 1000, rel=1e-2)
        for name in ("ort_fp32", "ort_int8"):
            assert case["runtimes"][name]["images_per_s_batch4"] > 0
        speedups = {name: row.get("speedup_vs") for name, row in case["runtimes"].items()}
        assert speedups == {
            "pytorch_fp32": None,
            "pytorch_bf16": "pytorch_fp32",
            "ort_fp32": "pytorch_fp32",
            "ort_int8": "ort_fp32",
        }
        fp32, ort_fp32 = case["runtimes"]["pytorch_fp32"], case["runtimes"]["ort_fp32"]
        assert ort_fp32["speedup"] == pytest.approx(fp32["p50_ms"] / ort_fp32["p50_ms"], rel=1e-2)


def test_flops_add_up_and_scale(report: dict) -> None:
    case = report["json"]["cases"][0]
    counted = case["flops"]
    assert counted["total"] > 0 and case["gflops"] == pytest.approx(counted["total"] / 1e9, rel=1e-3)
    assert counted["total"] == sum(counted[part] for part in FLOP_PARTS)
    model = preset_model(case["preset"])[0]
    assert flops(model, case["size"]) == counted
    double = flops(model, 2 * case["size"])
    # convolutions over the image scale with its area; the head works on fixed S x S grids
    for part in ("backbone", "mask_branch"):
        assert double[part] == pytest.approx(4 * counted[part], rel=0.02), part
    assert double["head"] == counted["head"]
    with torch.device("meta"):
        r50 = SOLOv2(load_preset("r50").model)
    assert flops(r50, case["size"])["total"] > 20 * counted["total"]


def test_ort_bf16_refused_with_reason(report: dict) -> None:
    reason = report["json"]["unsupported"]["ort_bf16"]
    assert "bfloat16 kernels" in reason and reason in BF16_UNSUPPORTED.replace("--precision bf16", "bf16")
    assert reason in (report["out"] / "latency.md").read_text()


def test_report_files(report: dict) -> None:
    out = report["out"]
    text = (out / "latency.md").read_text()
    for name in RUNTIMES:
        assert f"| {name} |" in text
    for picture in ("latency.png", "latency_ap.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["json"]["total_s"] > 0 and report["json"]["machine"]


def test_accuracy_per_runtime(report: dict) -> None:
    trained = report["json"]["accuracy"]
    mask = trained["mask"]
    assert set(mask) == set(RUNTIMES) and trained["val_images"] == 4
    for row in mask.values():
        assert 0 <= row["AP"] <= 1 and 0 <= row["AP50"] <= 1
    assert mask["pytorch_fp32"]["AP"] > 0.9  # its own masks: the comparison below means something
    assert mask["ort_fp32"]["AP"] == pytest.approx(mask["pytorch_fp32"]["AP"], abs=0.01)
    for name, row in mask.items():
        assert row["AP_change"] == pytest.approx(row["AP"] - mask["pytorch_fp32"]["AP"], abs=1e-4), name


def test_bf16_network_runs_bf16_weights_on_channels_last_input() -> None:
    """What makes bf16 fast on a CPU (``Bf16Network``): bf16 weights in channels_last and channels_last bf16 inputs to
    the convolutions, not fp32 weights cast by autocast; the model it copies stays fp32, and post-processing gets
    fp32. The CoordConv concatenations (head grids, P5 of the mask branch) come out NCHW: small maps oneDNN
    reorders."""
    model = preset_model("tiny")[0]
    network = Bf16Network(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in network.parameters())
    convs = {name: m for name, m in network.named_modules() if isinstance(m, nn.Conv2d)}
    spatial = [c for c in convs.values() if c.kernel_size != (1, 1)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs.values())
    assert spatial and not any(c.weight.is_contiguous() for c in spatial)  # NHWC, not NCHW
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        conv.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, args[0]))
        for name, conv in convs.items()
    ]
    images = torch.randint(0, 256, (2, 3, 128, 160), dtype=torch.uint8)
    with torch.inference_mode():
        output = network(images)
        reference = model(images)
    for hook in hooks:
        hook.remove()
    assert set(seen) == set(convs) and all(x.dtype == torch.bfloat16 for x in seen.values())
    backbone = {name: x for name, x in seen.items() if name.startswith("model.backbone.")}
    stem = backbone["model.backbone.body.conv1"]
    assert stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
    assert len(backbone) > 20 and all(x.is_contiguous(memory_format=torch.channels_last) for x in backbone.values())
    assert all(t.dtype == torch.float32 for t in [*output.cate_logits, *output.kernels, output.mask_features])
    scale = reference.mask_features.abs().max()
    assert (output.mask_features - reference.mask_features).abs().max() < 0.1 * scale  # bf16's rounding, no more
