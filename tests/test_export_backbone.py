"""`freesolo export-backbone` and training.backbone_io: the backbone leaves every kind of checkpoint under
torchvision's or detectron2's names with its exact values, and comes back in through `freesolo train --init`."""

from __future__ import annotations

import argparse
import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from training.backbone_io import backbone_state_dict, detectron2_name, dilate_last_stage, load_backbone
from training.checkpoint import save_checkpoint
from training.config import load_preset
from training.engine.trainer import load_initial_weights
from training.errors import UserError
from training.export_backbone import register
from training.models import SOLOv2

FC_KEYS = ["fc.weight", "fc.bias"]


def export(argv: list[str]) -> int:
    """Parse and run like `freesolo export-backbone ...` (the subcommand's own parser, independent of the wiring)."""
    parser = argparse.ArgumentParser(prog="freesolo")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export-backbone", *argv])
    return args.handler(args)


def export_file(checkpoint: Path, fmt: str, out: Path) -> Path:
    assert export(["--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
    return out


def resnet_file(depth: int, path: Path, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random torchvision ResNet's full state dict (fc included), saved as users would."""
    torch.manual_seed(seed)
    state = getattr(torchvision.models, f"resnet{depth}")().state_dict()
    torch.save(state, path)
    return path, state


def solo_checkpoint(path: Path, frozen_bn: bool = False) -> tuple[Path, SOLOv2]:
    config = load_preset("tiny")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, frozen_bn=frozen_bn))
    torch.manual_seed(0)
    model = SOLOv2(config.model)
    save_checkpoint(path, {"config": config.to_dict(), "model": model.state_dict(), "metadata": {}})
    return path, model


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def non_fc(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if not key.startswith("fc.")}


@pytest.mark.parametrize("frozen_bn", [False, True], ids=["bn", "frozen-bn"])
def test_solov2_backbone_loads_into_torchvision_resnet(tmp_path: Path, frozen_bn: bool) -> None:
    checkpoint, solo = solo_checkpoint(tmp_path / "model.pt", frozen_bn)
    out = export_file(checkpoint, "torchvision", tmp_path / "r18.pth")
    resnet = torchvision.models.resnet18()
    result = resnet.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == sorted(FC_KEYS) and result.unexpected_keys == []
    body = solo.backbone.body.state_dict()
    for key, value in non_fc(resnet.state_dict()).items():
        if key in body:  # frozen BN has no batch counters
            assert torch.equal(value, body[key]), key


def test_densecl_export_takes_the_query_encoder(tmp_path: Path) -> None:
    torch.manual_seed(1)
    query = non_fc(torchvision.models.resnet18().state_dict())
    torch.manual_seed(2)
    key_encoder = non_fc(torchvision.models.resnet18().state_dict())
    model = {f"encoder_q.backbone.{k}": v for k, v in query.items()}
    model |= {f"encoder_k.backbone.{k}": v for k, v in key_encoder.items()}
    model["queue"] = torch.randn(128, 16)
    path = tmp_path / "densecl.pt"
    payload = {"config": load_preset("tiny").to_dict(), "model": model, "metadata": {"kind": "densecl", "depth": 18}}
    save_checkpoint(path, payload)
    exported = torch.load(export_file(path, "torchvision", tmp_path / "out.pth"), weights_only=True)
    assert_same_tensors(exported, query)
    assert not torch.equal(exported["conv1.weight"], key_encoder["conv1.weight"])


@pytest.mark.parametrize("depth", [34, 50, 101])
def test_plain_state_dict_round_trips_with_inferred_depth(tmp_path: Path, depth: int) -> None:
    path, state = resnet_file(depth, tmp_path / f"r{depth}.pth")
    weights, inferred = backbone_state_dict(path)
    assert inferred == depth
    assert_same_tensors(weights, non_fc(state))
    exported = torch.load(export_file(path, "torchvision", tmp_path / "out.pth"), weights_only=True)
    assert_same_tensors(exported, non_fc(state))


@pytest.mark.parametrize(
    ("depth", "names"),
    [
        (
            18,
            [
                "stem.conv1.norm.running_var",
                "res2.0.conv2.weight",
                "res3.0.shortcut.weight",
                "res3.0.shortcut.norm.bias",
            ],
        ),
        (
            50,
            [
                "stem.conv1.weight",
                "res2.0.conv3.norm.weight",
                "res2.0.shortcut.norm.running_mean",
                "res5.2.conv3.weight",
            ],
        ),
    ],
)
def test_detectron2_pickle(tmp_path: Path, depth: int, names: list[str]) -> None:
    path, state = resnet_file(depth, tmp_path / "r.pth")
    out = export_file(path, "detectron2", tmp_path / "r.pkl")
    raw = out.read_bytes()
    assert b"numpy._core" not in raw  # numpy < 1.26 could not load it
    payload = pickle.loads(raw, encoding="latin1")  # how detectron2 reads .pkl files
    assert payload["matching_heuristics"] is True and payload["__author__"] == "FreeSOLO-Deploy"
    weights = payload["model"]
    assert set(names) <= weights.keys()
    assert not any("num_batches_tracked" in name or name.startswith("fc") for name in weights)
    assert len(weights) == len([k for k in state if not k.startswith("fc.") and "num_batches_tracked" not in k])
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 and v.flags.writeable for v in weights.values())
    for key, value in state.items():
        if not key.startswith("fc.") and "num_batches_tracked" not in key:
            assert np.array_equal(weights[detectron2_name(key)], value.numpy()), key


def test_exported_backbone_initialises_solov2_training(tmp_path: Path) -> None:
    path, state = resnet_file(18, tmp_path / "r18.pth")
    out = export_file(path, "torchvision", tmp_path / "out.pth")
    model = SOLOv2(load_preset("tiny").model)
    summary = load_initial_weights(model, out)
    assert summary.startswith(f"initialised {len(non_fc(state))}/")
    body = model.backbone.body.state_dict()
    assert all(torch.equal(body[key], value) for key, value in non_fc(state).items())


def test_load_backbone_holds_the_weights_in_eval_mode(tmp_path: Path) -> None:
    path, state = resnet_file(18, tmp_path / "r18.pth")
    model, depth = load_backbone(path, dilate_res5=True)
    assert depth == 18 and not model.training
    assert_same_tensors(non_fc(model.state_dict()), non_fc(state))
    features = torch.nn.Sequential(*list(model.children())[:-2])  # up to layer4
    with torch.no_grad():
        assert features(torch.zeros(1, 3, 64, 64)).shape == (1, 512, 4, 4)  # C5 at stride 16


def test_dilation_matches_torchvision_for_bottlenecks() -> None:
    with torch.device("meta"):
        ours = dilate_last_stage(torchvision.models.resnet50())
        reference = torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True])
    convs = [(m.stride, m.dilation, m.padding) for m in ours.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [(m.stride, m.dilation, m.padding) for m in reference.modules() if isinstance(m, torch.nn.Conv2d)]


def test_help_describes_both_formats(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        export(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in ("strict=False", "MODEL.WEIGHTS", "INPUT.FORMAT RGB", "STRIDE_IN_1X1 False", "--init"):
        assert text in out


def test_summary_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = resnet_file(18, tmp_path / "r18.pth")
    export_file(path, "detectron2", tmp_path / "r18.pkl")
    assert capsys.readouterr().out.strip() == (
        f"exported detectron2 ResNet-18 backbone (100 tensors) from {path} -> {tmp_path / 'r18.pkl'}"
    )


def error_cases(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (checkpoint, text the UserError must contain)."""
    config = load_preset("tiny").to_dict()
    no_backbone = tmp / "heads.pt"
    save_checkpoint(no_backbone, {"config": config, "model": {"head.weight": torch.zeros(2)}, "metadata": {}})
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    _, state = resnet_file(18, tmp / "r18.pth")
    incomplete = tmp / "incomplete.pth"
    torch.save({k: v for k, v in state.items() if k != "layer3.1.bn2.weight"}, incomplete)
    mismatch = tmp / "mismatch.pt"
    body = {f"backbone.body.{k}": v for k, v in non_fc(state).items()}
    save_checkpoint(mismatch, {"config": {**config, "model": {"depth": 50}}, "model": body, "metadata": {}})
    return {
        "missing": (tmp / "absent.pt", "not found"),
        "unreadable": (garbage, "cannot read"),
        "no backbone": (no_backbone, "no ResNet backbone"),
        "incomplete": (incomplete, "missing layer3.1.bn2.weight"),
        "depth mismatch": (mismatch, "config says ResNet-50"),
    }


@pytest.mark.parametrize("case", ["missing", "unreadable", "no backbone", "incomplete", "depth mismatch"])
def test_errors_name_the_file(tmp_path: Path, case: str) -> None:
    checkpoint, expected = error_cases(tmp_path)[case]
    with pytest.raises(UserError, match=expected) as error_info:
        export_file(checkpoint, "torchvision", tmp_path / "out.pth")
    assert str(checkpoint) in str(error_info.value)
    assert not (tmp_path / "out.pth").exists()
