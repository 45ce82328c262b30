"""`freesolo import-weights` against mmdetection's own SOLOv2 (mmdet 3.3, the dev extra): random-weight R50 and
SOLOv2-light R18 models built by mmdetection are saved as mmdetection checkpoints, imported, and must compute what
mmdetection computes: the raw head outputs on the same input, and `freesolo predict` against mmdetection's
`predict` on real photographs at their own sizes, batch 1 and 3. The imported light model then exports (dynamic and
fixed-size: a graph with the ``image_sizes`` input and probability masks), passes `freesolo parity`, and serves
through a real tritonserver what `freesolo predict` predicts.

mmcv-lite lacks the compiled ``mmcv._ext``, which ``import mmdet.models`` pulls in through ``mmcv.ops``; none of
the modules SOLOv2 uses calls it, so a stand-in whose every function raises is enough (and proves they do not)."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
import torch
from google.protobuf import text_format
from PIL import Image
from pycocotools import mask as mask_utils
from test_served_equals_predicted import assert_equal_detections, infer, needs_server, predict
from tritonclient.grpc import model_config_pb2

from export.graph_contract import Variant
from export.onnx_inputs import OnnxModel
from serving.launcher import ServerState
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.cli import main

pytest.importorskip("mmdet", reason="mmdetection is a dev extra: pip install -e '.[dev]'")

TEST_SIZE, MAX_SIZE = 100, 160  # shrunk test resize (upstream's 800/1333 would take minutes on CPU)
PHOTOS = {"chelsea": skimage.data.chelsea, "rocket": skimage.data.rocket, "coffee": skimage.data.coffee}


class _UnavailableExtension(types.ModuleType):
    """Stand-in for ``mmcv._ext``: any compiled op raises if called; dunder lookups fail as for a missing name."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError(f"mmcv._ext.{name} called: compiled mmcv ops are not available")

        return unavailable


@pytest.fixture(scope="module")
def mmdet_registry() -> None:
    try:
        import mmcv._ext  # noqa: F401  (a full mmcv install has it)
    except ImportError:
        sys.modules["mmcv._ext"] = _UnavailableExtension("mmcv._ext")
    import mmdet.models  # noqa: F401
    from mmdet.utils import register_all_modules

    register_all_modules()


def mmdet_solov2_config(depth: int, light: bool) -> dict[str, Any]:
    """mmdetection's solov2_r50_fpn / solov2-light_r18_fpn model config (values from its configs), without the
    ImageNet download (init_cfg None)."""
    widths = [64, 128, 256, 512] if depth < 50 else [256, 512, 1024, 2048]
    scale_ranges = (
        ((1, 56), (28, 112), (56, 224), (112, 448), (224, 896))
        if light
        else ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
    )
    gn = dict(type="GN", num_groups=32, requires_grad=True)
    return dict(
        type="SOLOv2",
        data_preprocessor=dict(
            type="DetDataPreprocessor",
            mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375],
            bgr_to_rgb=True,
            pad_mask=True,
            pad_size_divisor=32,
        ),
        backbone=dict(
            type="ResNet",
            depth=depth,
            num_stages=4,
            out_indices=(0, 1, 2, 3),
            frozen_stages=1,
            init_cfg=None,
            style="pytorch",
        ),
        neck=dict(type="FPN", in_channels=widths, out_channels=256, start_level=0, num_outs=5),
        mask_head=dict(
            type="SOLOV2Head",
            num_classes=80,
            in_channels=256,
            feat_channels=256 if light else 512,
            stacked_convs=2 if light else 4,
            strides=[8, 8, 16, 32, 32],
            scale_ranges=scale_ranges,
            pos_scale=0.2,
            num_grids=[40, 36, 24, 16, 12],
            cls_down_index=0,
            mask_feature_head=dict(
                feat_channels=128,
                start_level=0,
                end_level=3,
                out_channels=128 if light else 256,
                mask_stride=4,
                norm_cfg=gn,
            ),
            norm_cfg=gn,
            loss_mask=dict(type="DiceLoss", use_sigmoid=True, loss_weight=3.0),
            loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        ),
        test_cfg=dict(
            nms_pre=500, score_thr=0.1, mask_thr=0.5, filter_thr=0.05, kernel="gaussian", sigma=2.0, max_per_img=100
        ),
    )


def build_mmdet_model(depth: int, light: bool, category_bias: float, seed: int) -> torch.nn.Module:
    """mmdetection's SOLOv2 with random weights that make detections: random normalisation statistics and affine
    parameters everywhere (so the import must place each of them right), category weights scaled so a few cells
    stand out above the 0.1 threshold (fewer than nms_pre), and kernels scaled for crisp masks."""
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict

    torch.manual_seed(seed)
    model = MODELS.build(ConfigDict(mmdet_solov2_config(depth, light)))
    model.init_weights()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_mean") or (name.endswith(".bias") and "bn" in name):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif name.endswith("running_var") or (name.endswith(".weight") and tensor.dim() == 1):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.75)
            elif name.endswith(".bias") and tensor.dim() == 1 and "conv_cls" not in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
        head = model.mask_head
        head.conv_cls.weight.mul_(4.0)
        head.conv_cls.bias.fill_(category_bias)
        head.conv_kernel.weight.mul_(20.0)
    return model.eval()


def save_mmdet_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """mmdetection's checkpoint layout: ``meta`` (here with the dataset's class names) and ``state_dict``."""
    from mmdet.datasets.coco import CocoDataset

    meta = {"mmdet_version": "3.3.0", "dataset_meta": {"classes": list(CocoDataset.METAINFO["classes"])}}
    torch.save({"meta": meta, "state_dict": model.state_dict()}, path)


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-12))


# depth, light, category bias: with the category weights x4, a bias that leaves a few hundred (cell, class)
# candidates above 0.1 on the photographs (fewer than nms_pre = 500, where the two post-processings cap differently).
VARIANTS = {"r50": (50, False, -8.0), "light-r18": (18, True, -6.3)}


def import_variant(name: str, folder: Path) -> tuple[torch.nn.Module, Path]:
    """(mmdetection model, imported checkpoint) of one variant, imported at the shrunk test size."""
    depth, light, category_bias = VARIANTS[name]
    model = build_mmdet_model(depth, light, category_bias, seed=depth)
    source = folder / "mmdet.pth"
    save_mmdet_checkpoint(model, source)
    out = folder / "imported.pt"
    sizes = ["--test-size", str(TEST_SIZE), "--max-size", str(MAX_SIZE)]
    assert main(["import-weights", str(source), "--out", str(out), *sizes]) == 0
    return model, out


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def imported(request: pytest.FixtureRequest, mmdet_registry: None, tmp_path_factory: pytest.TempPathFactory):
    return import_variant(request.param, tmp_path_factory.mktemp(request.param))


def test_head_outputs_equal_mmdetection(imported) -> None:
    mmdet_model, checkpoint = imported
    ours, config, metadata = model_from_checkpoint(checkpoint)
    assert metadata["class_names"][0] == "person" and len(metadata["class_names"]) == 80
    assert metadata["category_ids"][-1] == 90  # the checkpoint's COCO names get COCO's category ids
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 96, 160), dtype=torch.uint8, generator=generator)
    mean = torch.tensor(config.model.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(config.model.pixel_std).view(1, 3, 1, 1)
    with torch.no_grad():
        kernels, cate_logits, mask_features = mmdet_model.mask_head(mmdet_model.extract_feat((images - mean) / std))
        output = ours(images)
    for level in range(5):
        assert relative_error(output.cate_logits[level], cate_logits[level]) < 1e-4
        assert relative_error(output.kernels[level], kernels[level]) < 1e-4
    assert relative_error(output.mask_features, mask_features) < 1e-4


def mmdet_predictions(model: torch.nn.Module, photos: list[np.ndarray], batch_size: int) -> list[dict[str, Any]]:
    """mmdetection's own test pipeline (keep-ratio Resize with OpenCV, its data preprocessor, ``predict`` with
    rescale): per photo, the masks at the original size with their labels and scores."""
    from mmcv.transforms import Compose
    from mmengine.dataset import pseudo_collate

    pipeline = Compose(
        [
            dict(type="mmdet.LoadImageFromNDArray"),
            dict(type="mmdet.Resize", scale=(MAX_SIZE, TEST_SIZE), keep_ratio=True),
            dict(type="mmdet.PackDetInputs", meta_keys=("img_id", "ori_shape", "img_shape", "scale_factor")),
        ]
    )
    found = []
    for start in range(0, len(photos), batch_size):
        # LoadImageFromFile gives BGR, which the preprocessor's bgr_to_rgb flips back.
        samples = [pipeline({"img": photo[..., ::-1].copy(), "img_id": i}) for i, photo in enumerate(photos)]
        with torch.no_grad():
            outputs = model.test_step(pseudo_collate(samples[start : start + batch_size]))
        for output in outputs:
            instances = output.pred_instances
            found.append({key: getattr(instances, key).numpy() for key in ("masks", "labels", "scores")})
    return found


def our_predictions(checkpoint: Path, files: list[Path], batch_size: int, out: Path) -> list[dict[str, Any]]:
    """`freesolo predict` on the image files, read back per image like mmdetection's."""
    arguments = ["--checkpoint", str(checkpoint), "--out", str(out), "--batch-size", str(batch_size), "--no-progress"]
    assert main(["predict", *arguments, *map(str, files)]) == 0
    results = json.loads(out.read_text())
    label_of = {c: label for label, c in enumerate(load_checkpoint(checkpoint)["metadata"]["category_ids"])}
    found = []
    for index in range(len(files)):
        mine = [r for r in results if r["image_id"] == index]
        found.append(
            {
                "masks": np.array([mask_utils.decode(r["segmentation"]) > 0 for r in mine]),
                "labels": np.array([label_of[r["category_id"]] for r in mine]),
                "scores": np.array([r["score"] for r in mine]),
            }
        )
    return found


def match_detections(theirs: dict[str, Any], ours: dict[str, Any]) -> list[tuple[float, float]]:
    """One-to-one: each of mmdetection's detections (best score first) takes the unused one of ours with the same
    label and the highest mask IoU; returns (IoU, score difference) per detection, or fails on a missing one."""
    used: set[int] = set()
    pairs = []
    for k in np.argsort(-theirs["scores"]):
        label = theirs["labels"][k]
        candidates = [j for j in range(len(ours["scores"])) if j not in used and ours["labels"][j] == label]
        assert candidates, f"mmdetection's detection {k} (label {theirs['labels'][k]}) has no counterpart"
        ious = [
            (ours["masks"][j] & theirs["masks"][k]).sum() / max((ours["masks"][j] | theirs["masks"][k]).sum(), 1)
            for j in candidates
        ]
        best = candidates[int(np.argmax(ious))]
        used.add(best)
        pairs.append((float(max(ious)), abs(float(ours["scores"][best]) - float(theirs["scores"][k]))))
    return pairs


@pytest.mark.parametrize("batch_size", [1, 3])
def test_predict_matches_mmdetection_on_photographs(imported, batch_size: int, tmp_path: Path) -> None:
    mmdet_model, checkpoint = imported
    photos = [load() for load in PHOTOS.values()]
    files = []
    for name, photo in zip(PHOTOS, photos, strict=True):
        files.append(tmp_path / f"{name}.png")
        Image.fromarray(photo).save(files[-1])
    theirs = mmdet_predictions(mmdet_model, photos, batch_size)
    ours = our_predictions(checkpoint, files, batch_size, tmp_path / "preds.json")
    total = 0
    for image_theirs, image_ours in zip(theirs, ours, strict=True):
        assert len(image_ours["scores"]) == len(image_theirs["scores"])
        for iou, score_difference in match_detections(image_theirs, image_ours):
            assert iou >= 0.98 and score_difference <= 1e-3
        total += len(image_theirs["scores"])
    assert total >= 20  # the comparison is not vacuous


FIXED_CANVAS = (96, 160)  # the fixed-size export: every test image is fitted into it with padding left over


@dataclass(frozen=True)
class LightExport:
    """The imported light model, its dynamic and fixed-size ONNX exports and the photographs as PNG files."""

    checkpoint: Path
    onnx: dict[str, Path]  # "dynamic", "fixed"
    files: list[Path]


@pytest.fixture(scope="module")
def light_export(mmdet_registry: None, tmp_path_factory: pytest.TempPathFactory) -> LightExport:
    folder = tmp_path_factory.mktemp("light-export")
    _, checkpoint = import_variant("light-r18", folder)
    shapes = {"dynamic": ["--dynamic"], "fixed": ["--height", str(FIXED_CANVAS[0]), "--width", str(FIXED_CANVAS[1])]}
    onnx_paths = {}
    for kind, shape in shapes.items():
        onnx_paths[kind] = folder / f"imported-{kind}.onnx"
        export = ["export", "onnx", "--checkpoint", str(checkpoint), "--out", str(onnx_paths[kind]), "--no-simplify"]
        assert main([*export, *shape]) == 0
    files = []
    for name, load in PHOTOS.items():
        files.append(folder / f"{name}.png")
        Image.fromarray(load()).save(files[-1])
    return LightExport(checkpoint, onnx_paths, files)


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_imported_model_exports_and_passes_parity(
    light_export: LightExport, kind: str, capsys: pytest.CaptureFixture
) -> None:
    """The imported light model as one ONNX graph that pads and resizes masks as upstream does (image sizes in,
    probability masks out), against PyTorch on the photographs, two per batch."""
    checkpoint, onnx_path, files = light_export.checkpoint, light_export.onnx[kind], light_export.files
    model = OnnxModel(onnx_path)
    assert model.variant == Variant("probability", "normalized")
    assert [value.name for value in model.session.get_inputs()] == ["images", "image_sizes"]
    capsys.readouterr()
    arguments = ["--checkpoint", str(checkpoint), "--onnx", str(onnx_path), "--batch-size", "2", *map(str, files)]
    code = main(["parity", *arguments])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.strip().splitlines()[-1].startswith("parity: PASS, 3 image/runtime comparisons")
    compared = [line.split()[3] for line in out.splitlines() if line.split()[:1] and line.split()[0].endswith(".png")]
    assert len(compared) == 3 and all(int(pair.split("/")[0]) > 0 for pair in compared)  # detections compared


def test_served_preprocessing_gets_the_imported_filter(light_export: LightExport, tmp_path: Path) -> None:
    """`serve prepare` carries the model's resize filter into the Triton preprocess step's config."""
    onnx_path = light_export.onnx["dynamic"]
    assert main(["serve", "prepare", "--onnx", str(onnx_path), "--repo", str(tmp_path / "repo")]) == 0
    config = text_format.Parse(
        (tmp_path / "repo" / "preprocess" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.parameters["resize_filter"].string_value == "opencv"


@needs_server
@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_imported_model_serves_what_predict_predicts(
    light_export: LightExport,
    kind: str,
    start_triton: Callable[..., ServerState],
    synth_data: Path,
    tmp_path: Path,
) -> None:
    """Through a real tritonserver (image sizes routed from preprocess to the model, probability masks to
    postprocess), a non-square photograph and a synthetic scene get `freesolo predict`'s detections: every one
    matched, mask IoU >= 0.98, score within 1e-3, same label. Both images leave padding on their canvas, where the
    two ways of padding differ."""
    files = [light_export.files[list(PHOTOS).index("coffee")], sorted((synth_data / "val").glob("*.png"))[0]]
    server = start_triton(light_export.onnx[kind])
    try:
        served = infer(server.grpc_url, files, tmp_path / "served.json")
    finally:
        main(["serve", "stop", "--repo", str(Path(server.log).parent)])
    canvas = ["--height", str(FIXED_CANVAS[0]), "--width", str(FIXED_CANVAS[1])] if kind == "fixed" else []
    predicted = predict(light_export.checkpoint, files, tmp_path / "predicted.json", *canvas)
    assert_equal_detections(predicted, served, files)
