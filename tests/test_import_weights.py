"""`freesolo import-weights` on the published layouts it has no upstream code for here (FreeSOLO's detectron2
checkpoint, WXinlong/SOLO's mmdetection 1.x one, DenseCL's torchvision-keyed backbone, detectron2 backbone pickles):
each test file is built from the published tensor names and shapes, written out literally here rather than derived
from the importer's own rules; every tensor must land in one place, and bad files end in one error line."""

from __future__ import annotations

import dataclasses
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torchvision
from PIL import Image

from training.backbone_io import backbone_state_dict
from training.checkpoint import model_from_checkpoint, save_checkpoint
from training.cli import main
from training.config import load_preset
from training.engine.trainer import load_initial_weights
from training.export_backbone import write_detectron2
from training.models import SOLOv2

RESNETS = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}


def resnet_state(depth: int) -> dict[str, torch.Tensor]:
    """A torchvision ResNet's backbone tensors (no fc), as DenseCL publishes them."""
    state = RESNETS[depth]().state_dict()
    return {key: value for key, value in state.items() if not key.startswith("fc.")}


def detectron2_resnet_name(key: str) -> str:
    """FreeSOLO's conversion script's renaming, written out: stem, res2..res5, convK.norm, shortcut[.norm]."""
    key = key if key.startswith("layer") else f"stem.{key}"
    for stage in range(1, 5):
        key = key.replace(f"layer{stage}", f"res{stage + 1}")
    for index in range(1, 4):
        key = key.replace(f"bn{index}", f"conv{index}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def unique_values(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor filled with its own value (its index), so where each one lands can be checked."""
    return {key: torch.full_like(value, float(index + 1)) for index, (key, value) in enumerate(state.items())}


def solov2_head_tensors(names: dict[str, Callable[..., str]], num_classes: int, embedding: bool) -> dict:
    """SOLOv2's R50-standard head (4 x 512 towers, 256-d kernels, mask branch 128 -> 256) under a layout's names."""
    state: dict[str, torch.Tensor] = {}
    for i in range(4):
        for tower, extra in (("kernel", 2), ("cate", 0)):
            state[names["tower_conv"](tower, i)] = torch.zeros(512, (256 + extra) if i == 0 else 512, 3, 3)
            state[names["tower_norm"](tower, i, "weight")] = torch.zeros(512)
            state[names["tower_norm"](tower, i, "bias")] = torch.zeros(512)
    for kind, width in (("cate", num_classes), ("kernel", 256), *((("embed", 128),) if embedding else ())):
        state[names["predictor"](kind, "weight")] = torch.zeros(width, 512, 3, 3)
        state[names["predictor"](kind, "bias")] = torch.zeros(width)
    for level in range(4):
        for j in range(max(level, 1)):
            channels = 256 + (2 if level == 3 and j == 0 else 0) if j == 0 else 128
            state[names["mask_conv"](level, j)] = torch.zeros(128, channels, 3, 3)
            state[names["mask_norm"](level, j, "weight")] = torch.zeros(128)
            state[names["mask_norm"](level, j, "bias")] = torch.zeros(128)
    state[names["project"]("conv")] = torch.zeros(256, 128, 1, 1)
    state[names["project"]("weight")] = torch.zeros(256)
    state[names["project"]("bias")] = torch.zeros(256)
    return state


def freesolo_state(depth: int) -> dict[str, torch.Tensor]:
    """NVlabs/FreeSOLO's SOLOv2 state dict: detectron2 ResNet with FrozenBN (no batch counters), FPN, ins_head
    towers as Sequential(conv, GN, ReLU), emb_pred, mask_head, and the ``_iter`` buffer."""
    backbone = resnet_state(depth)
    state = {
        f"backbone.bottom_up.{detectron2_resnet_name(key)}": value
        for key, value in backbone.items()
        if not key.endswith("num_batches_tracked")
    }
    for index, channels in enumerate([256, 512, 1024, 2048] if depth >= 50 else [64, 128, 256, 512]):
        state[f"backbone.fpn_lateral{index + 2}.weight"] = torch.zeros(256, channels, 1, 1)
        state[f"backbone.fpn_lateral{index + 2}.bias"] = torch.zeros(256)
        state[f"backbone.fpn_output{index + 2}.weight"] = torch.zeros(256, 256, 3, 3)
        state[f"backbone.fpn_output{index + 2}.bias"] = torch.zeros(256)
    names = {
        "tower_conv": lambda tower, i: f"ins_head.{tower}_tower.{3 * i}.weight",
        "tower_norm": lambda tower, i, part: f"ins_head.{tower}_tower.{3 * i + 1}.{part}",
        "predictor": lambda kind, part: f"ins_head.{ {'embed': 'emb'}.get(kind, kind) }_pred.{part}",
        "mask_conv": lambda level, j: f"mask_head.convs_all_levels.{level}.conv{j}.0.weight",
        "mask_norm": lambda level, j, part: f"mask_head.convs_all_levels.{level}.conv{j}.1.{part}",
        "project": lambda part: "mask_head.conv_pred.0.weight" if part == "conv" else f"mask_head.conv_pred.1.{part}",
    }
    state.update(solov2_head_tensors(names, num_classes=2, embedding=True))
    state["_iter"] = torch.zeros(1)
    return unique_values(state)


def solo_state(depth: int) -> dict[str, torch.Tensor]:
    """WXinlong/SOLO's SOLOv2 (mmdetection 1.x): backbone.*, neck.lateral_convs/fpn_convs ConvModules,
    bbox_head.{kernel,cate}_convs ConvModules (conv, gn), solo_cate (80 = num_classes 81 - 1), solo_kernel,
    mask_feat_head.convs_all_levels and conv_pred.0 (a ConvModule in a Sequential)."""
    state = {f"backbone.{key}": value for key, value in resnet_state(depth).items()}
    for index, channels in enumerate([256, 512, 1024, 2048] if depth >= 50 else [64, 128, 256, 512]):
        state[f"neck.lateral_convs.{index}.conv.weight"] = torch.zeros(256, channels, 1, 1)
        state[f"neck.lateral_convs.{index}.conv.bias"] = torch.zeros(256)
        state[f"neck.fpn_convs.{index}.conv.weight"] = torch.zeros(256, 256, 3, 3)
        state[f"neck.fpn_convs.{index}.conv.bias"] = torch.zeros(256)
    names = {
        "tower_conv": lambda tower, i: f"bbox_head.{tower}_convs.{i}.conv.weight",
        "tower_norm": lambda tower, i, part: f"bbox_head.{tower}_convs.{i}.gn.{part}",
        "predictor": lambda kind, part: f"bbox_head.solo_{kind}.{part}",
        "mask_conv": lambda level, j: f"mask_feat_head.convs_all_levels.{level}.conv{j}.conv.weight",
        "mask_norm": lambda level, j, part: f"mask_feat_head.convs_all_levels.{level}.conv{j}.gn.{part}",
        "project": lambda part: (
            "mask_feat_head.conv_pred.0.conv.weight" if part == "conv" else f"mask_feat_head.conv_pred.0.gn.{part}"
        ),
    }
    state.update(solov2_head_tensors(names, num_classes=80, embedding=False))
    return unique_values(state)


def import_weights(*args: str) -> int:
    return main(["import-weights", *args])


def assert_every_tensor_placed_once(source: dict[str, torch.Tensor], imported: dict[str, torch.Tensor]) -> None:
    """The imported tensors carry exactly the source's values (batch counters and iteration buffers aside)."""
    weights = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked") and k != "_iter"}
    assert sorted(float(v.flatten()[0]) for v in imported.values()) == sorted(
        float(v.flatten()[0]) for v in weights.values()
    )
    assert all(bool((v == v.flatten()[0]).all()) for v in imported.values())


def test_freesolo_checkpoint_loads_completely(tmp_path: Path) -> None:
    source = freesolo_state(50)
    torch.save({"model": source, "iteration": 30000}, tmp_path / "freesolo.pth")
    assert import_weights(str(tmp_path / "freesolo.pth"), "--out", str(tmp_path / "out.pt")) == 0
    model, config, metadata = model_from_checkpoint(tmp_path / "out.pt")
    assert (config.model.depth, config.model.num_classes, config.model.embedding_dim) == (50, 2, 128)
    assert (config.input.test_size, config.input.max_size) == (800, 1333)
    assert (config.input.resize_filter, config.input.resize_rounding) == ("pil", "half_up")  # detectron2's resize
    assert metadata["source"]["format"] == "freesolo" and metadata["class_names"] == ["0", "1"]
    state = model.state_dict()
    assert_every_tensor_placed_once(source, state)
    pairs = {
        "head.cate_tower.1.0.weight": "ins_head.cate_tower.3.weight",
        "head.kernel_tower.3.1.bias": "ins_head.kernel_tower.10.bias",
        "head.embed_pred.weight": "ins_head.emb_pred.weight",
        "mask_branch.levels.3.4.0.weight": "mask_head.convs_all_levels.3.conv2.0.weight",
        "mask_branch.project.1.weight": "mask_head.conv_pred.1.weight",
        "backbone.fpn.inner_blocks.0.0.weight": "backbone.fpn_lateral2.weight",
        "backbone.body.layer1.0.downsample.1.running_var": "backbone.bottom_up.res2.0.shortcut.norm.running_var",
        "backbone.body.bn1.weight": "backbone.bottom_up.stem.conv1.norm.weight",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(state[ours], source[theirs]), ours


def test_solo_checkpoint_loads_completely(tmp_path: Path) -> None:
    source = solo_state(18)
    meta = {"mmdet_version": "1.0.0", "CLASSES": [f"class{i}" for i in range(80)]}
    torch.save({"meta": meta, "state_dict": source}, tmp_path / "solo.pth")
    assert import_weights(str(tmp_path / "solo.pth"), "--out", str(tmp_path / "out.pt")) == 0
    model, config, metadata = model_from_checkpoint(tmp_path / "out.pt")
    assert (config.model.num_classes, config.model.embedding_dim, config.input.resize_filter) == (80, 0, "opencv")
    assert metadata["class_names"][79] == "class79" and metadata["source"]["format"] == "solo"
    state = model.state_dict()
    assert_every_tensor_placed_once(source, state)
    assert torch.equal(state["head.cate_pred.weight"], source["bbox_head.solo_cate.weight"])
    assert torch.equal(state["mask_branch.project.0.weight"], source["mask_feat_head.conv_pred.0.conv.weight"])
    assert torch.equal(state["backbone.fpn.layer_blocks.3.0.bias"], source["neck.fpn_convs.3.conv.bias"])


def test_imported_model_initialises_training(tmp_path: Path) -> None:
    torch.save({"state_dict": solo_state(18)}, tmp_path / "solo.pth")
    assert import_weights(str(tmp_path / "solo.pth"), "--out", str(tmp_path / "out.pt"), "--classes", "coco") == 0
    config = load_preset("r50")
    own = SOLOv2(dataclasses.replace(config.model, depth=18)).state_dict()
    summary = load_initial_weights(SOLOv2(dataclasses.replace(config.model, depth=18)), tmp_path / "out.pt")
    total = len(own)
    batch_counters = sum(1 for key in own if key.endswith("num_batches_tracked"))
    assert summary.startswith(f"initialised {total - batch_counters}/{total} tensors")


@pytest.mark.parametrize("layout", ["plain", "state_dict"])
def test_densecl_backbone_becomes_torchvision_weights(layout: str, tmp_path: Path) -> None:
    source = unique_values(resnet_state(50))
    torch.save(source if layout == "plain" else {"state_dict": source}, tmp_path / "densecl.pth")
    assert import_weights(str(tmp_path / "densecl.pth"), "--out", str(tmp_path / "r50.pth")) == 0
    state, depth = backbone_state_dict(tmp_path / "r50.pth")  # what freemask --backbone and train --init read
    assert depth == 50 and state.keys() == source.keys()
    assert all(torch.equal(state[key], source[key]) for key in source)


def test_detectron2_pickles_become_torchvision_weights(tmp_path: Path) -> None:
    """Two writers: FreeSOLO's conversion script (pickle.dump of numpy arrays, numpy's own reduce) and this
    project's export-backbone (arrays as numpy.ndarray(shape, dtype, buffer))."""
    source = unique_values(resnet_state(18))
    weights = {
        detectron2_resnet_name(key): value.numpy()
        for key, value in source.items()
        if not key.endswith("num_batches_tracked")
    }
    with open(tmp_path / "script.pkl", "wb") as file:
        pickle.dump({"model": weights, "__author__": "OpenSelfSup", "matching_heuristics": True}, file)
    write_detectron2(tmp_path / "exported.pkl", weights)
    for name in ("script", "exported"):
        out = tmp_path / f"{name}.pth"
        assert import_weights(str(tmp_path / f"{name}.pkl"), "--out", str(out)) == 0
        state, depth = backbone_state_dict(out)
        assert depth == 18
        assert all(torch.equal(state[key], source[key]) for key in state)
        assert len(state) == len(weights)


def test_crafted_pickle_is_refused_without_running(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "evil.pkl", "wb") as file:
        pickle.dump({"model": {"stem.conv1.weight": Payload()}}, file)
    assert import_weights(str(tmp_path / "evil.pkl"), "--out", str(tmp_path / "out.pth")) == 2
    error = capsys.readouterr().err.strip()
    assert not marker.exists() and not (tmp_path / "out.pth").exists()
    assert len(error.splitlines()) == 1 and "refusing to load 'io.open'" in error
    pickle.loads((tmp_path / "evil.pkl").read_bytes())  # the control: an ordinary unpickler runs the payload
    assert marker.exists()


def error_line(capsys: pytest.CaptureFixture, *args: str) -> str:
    assert import_weights(*args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("freesolo import-weights: error:"), captured.err
    return lines[0]


def test_bad_files_end_in_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = solo_state(18) | {}
    good = {"state_dict": source}
    cases: dict[str, tuple[object, str]] = {
        "partial": ({"state_dict": {k: v for k, v in source.items() if k != "bbox_head.solo_kernel.bias"}},
                    "missing bbox_head.solo_kernel.bias"),
        "unexpected": ({"state_dict": source | {"bbox_head.extra.weight": torch.zeros(1)}},
                       "unexpected bbox_head.extra.weight"),
        "reshaped": ({"state_dict": source | {"neck.fpn_convs.1.conv.bias": torch.zeros(7)}},
                     "wrong shape for neck.fpn_convs.1.conv.bias [7]"),
        "dcn": ({"state_dict": source | {"backbone.layer2.0.conv2.conv_offset.weight": torch.zeros(1)}},
                "deformable convolutions (DCN)"),
        "unknown": ({"weights": {"a": torch.zeros(1)}}, "not a recognised weights file"),
    }  # fmt: skip
    out = tmp_path / "out.pt"
    for name, (payload, message) in cases.items():
        torch.save(payload, tmp_path / f"{name}.pth")
        assert message in error_line(capsys, str(tmp_path / f"{name}.pth"), "--out", str(out)), name
    torch.save(good, tmp_path / "good.pth")
    assert "not a NVlabs/FreeSOLO" in error_line(capsys, str(tmp_path / "good.pth"), "--out", str(out), "--format",
                                                 "freesolo")  # fmt: skip
    arguments = [str(tmp_path / "good.pth"), "--out", str(out), "--format", "densecl"]
    assert "no ResNet backbone ('conv1.weight' missing)" in error_line(capsys, *arguments)
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    assert "cannot read weights file" in error_line(capsys, str(tmp_path / "truncated.pth"), "--out", str(out))
    (tmp_path / "truncated.pkl").write_bytes(pickle.dumps({"model": {"a": np.zeros(3)}})[:20])
    assert "cannot read weights file" in error_line(capsys, str(tmp_path / "truncated.pkl"), "--out", str(out))
    assert "10 class names for a model with 80" in error_line(
        capsys, str(tmp_path / "good.pth"), "--out", str(out), "--classes", str(write_names(tmp_path, 10))
    )
    assert not out.exists()


def write_names(folder: Path, count: int) -> Path:
    path = folder / "names.txt"
    path.write_text("".join(f"name{i}\n" for i in range(count)))
    return path


def test_an_unknown_head_width_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Grids and scale ranges are not in the weights: a head that matches no upstream family is not guessed."""
    source = solo_state(18)
    source = {k: (v[:, :256] if k == "bbox_head.cate_convs.1.conv.weight" else v) for k, v in source.items()}
    source["bbox_head.cate_convs.0.conv.weight"] = torch.zeros(384, 256, 3, 3)
    torch.save({"state_dict": source}, tmp_path / "odd.pth")
    assert "unknown SOLOv2 variant" in error_line(capsys, str(tmp_path / "odd.pth"), "--out", str(tmp_path / "o.pt"))


def test_imported_checkpoint_is_an_ordinary_one(tmp_path: Path) -> None:
    """An imported checkpoint is read by the same loader as a trained one, round-trips, and `predict` runs it."""
    torch.save({"state_dict": solo_state(18)}, tmp_path / "solo.pth")
    sizes = ["--test-size", "96", "--max-size", "128"]
    assert import_weights(str(tmp_path / "solo.pth"), "--out", str(tmp_path / "a.pt"), *sizes) == 0
    model, config, _ = model_from_checkpoint(tmp_path / "a.pt")
    assert (config.input.test_size, config.input.max_size) == (96, 128)
    save_checkpoint(tmp_path / "b.pt", {"config": config.to_dict(), "model": model.state_dict()})
    assert model_from_checkpoint(tmp_path / "b.pt")[1] == config
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "chelsea.png")
    out = tmp_path / "preds.json"
    predict = ["predict", "--checkpoint", str(tmp_path / "a.pt"), str(tmp_path / "chelsea.png"), "--out", str(out)]
    assert main(predict) == 0
    assert isinstance(json.loads(out.read_text()), list)


def test_imported_backbone_starts_pretraining(synth_data: Path, tmp_path: Path) -> None:
    """A DenseCL backbone as `pretrain --init`: both encoders start from it (learning rate 0, so the weights the
    run saves are the ones it started from)."""
    source = unique_values(resnet_state(18))
    torch.save({"state_dict": source}, tmp_path / "densecl_r18.pth")
    assert import_weights(str(tmp_path / "densecl_r18.pth"), "--out", str(tmp_path / "r18.pth")) == 0
    run = tmp_path / "run"
    arguments = ["--images", str(synth_data / "train"), "--out", str(run), "--init", str(tmp_path / "r18.pth")]
    assert main(["pretrain", *arguments, "--iters", "1", "--batch-size", "2", "--lr", "0", "--no-progress"]) == 0
    weights = torch.load(run / "model.pt", weights_only=True)["model"]
    for encoder in ("encoder_q", "encoder_k"):
        assert torch.equal(weights[f"{encoder}.backbone.layer3.1.conv2.weight"], source["layer3.1.conv2.weight"])
        assert torch.equal(weights[f"{encoder}.backbone.conv1.weight"], source["conv1.weight"])
