"""Free Mask: masks recovered from crafted features, the json round-trips through pycocotools with boxes that match
the masks, a crashed run resumes without duplicate or missing images, and torchrun shards the images."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import training.freemask_run as freemask_run
from training.cli import main
from training.config import FreeMaskConfig, load_preset
from training.freemask import (
    coarse_masks,
    lab_cell_statistics,
    mix_features,
    passes_filters,
    resample_embedding,
    unit_scaled,
)
from training.models.weak_losses import rgb_to_lab


def crafted_features() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-channel 16x16 features: region A (one direction), region B (another), background (a third)."""
    features = torch.zeros(8, 16, 16)
    features[2] = 1.0  # background direction
    region_a = torch.zeros(16, 16, dtype=torch.bool)
    region_a[2:7, 2:8] = True
    region_b = torch.zeros(16, 16, dtype=torch.bool)
    region_b[9:14, 8:14] = True
    features[:, region_a] = torch.tensor([1.0, 0, 0, 0, 0, 0, 0.2, 0])[:, None]
    features[:, region_b] = torch.tensor([0, 1.0, 0, 0, 0, 0, 0, 0.2])[:, None]
    return features, region_a, region_b


def test_crafted_regions_are_found_with_their_embeddings() -> None:
    features, region_a, region_b = crafted_features()
    config = FreeMaskConfig(drop_top_fraction=0.0, embedding_dim=16)
    found = coarse_masks(features, (64, 64), config)
    big_a = np.kron(region_a.numpy(), np.ones((4, 4), bool))
    big_b = np.kron(region_b.numpy(), np.ones((4, 4), bool))
    ious = [[(m.mask & t).sum() / (m.mask | t).sum() for t in (big_a, big_b)] for m in found]
    assert max(row[0] for row in ious) > 0.9 and max(row[1] for row in ious) > 0.9
    assert all(m.mask.shape == (64, 64) and m.score >= config.score_thr for m in found)
    best_a = found[int(np.argmax([row[0] for row in ious]))]
    expected = resample_embedding(features[:, 4, 4], 16).numpy()
    np.testing.assert_allclose(best_a.embedding, expected, atol=1e-5)
    assert np.linalg.norm(best_a.embedding) == pytest.approx(1.0, abs=1e-5)


def test_filters_drop_wide_and_top_masks() -> None:
    config = FreeMaskConfig(max_box_fraction=0.95, drop_top_fraction=0.2)
    wide = np.zeros((50, 100), bool)
    wide[20:30, 1:99] = True
    top = np.zeros((50, 100), bool)
    top[0:8, 40:60] = True
    fine = np.zeros((50, 100), bool)
    fine[20:40, 40:60] = True
    tall = np.zeros((50, 100), bool)
    tall[0:49, 40:50] = True
    assert not passes_filters(wide, config) and not passes_filters(top, config) and passes_filters(fine, config)
    assert not passes_filters(tall, FreeMaskConfig(max_box_fraction=0.95, drop_top_fraction=0.0))
    assert not passes_filters(np.zeros((5, 5), bool), config)
    small = FreeMaskConfig(drop_top_fraction=0.0, min_area_fraction=0.1)  # fine covers 400 of 5000 pixels: 8%
    assert not passes_filters(fine, small) and passes_filters(fine, dataclasses.replace(small, min_area_fraction=0.05))


def test_centred_masks_ignore_a_component_every_location_shares() -> None:
    features, _, _ = crafted_features()
    shifted = features + torch.linspace(0.5, 3.0, 8)[:, None, None]
    config = FreeMaskConfig(drop_top_fraction=0.0, center_features=True)
    found, found_shifted = coarse_masks(features, (64, 64), config), coarse_masks(shifted, (64, 64), config)
    assert len(found) == len(found_shifted) >= 2
    for mask, mask_shifted in zip(found, found_shifted, strict=True):
        assert np.array_equal(mask.mask, mask_shifted.mask) and mask.score == pytest.approx(mask_shifted.score)


def test_mirrored_border_keeps_the_feature_grid(random_backbone: Path) -> None:
    config = load_preset("tiny")
    backbone, _ = freemask_run.load_backbone(random_backbone, config.freemask.dilate_res5)
    images = [
        torch.randint(0, 256, (3, 128, 96), dtype=torch.uint8),
        torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8),
    ]
    plain = dataclasses.replace(config, freemask=dataclasses.replace(config.freemask, border_cells=0))
    mirrored = dataclasses.replace(config, freemask=dataclasses.replace(config.freemask, border_cells=2))
    with torch.inference_mode():
        shapes = [[tuple(f.shape) for f in freemask_run.batch_features(backbone, images, c)] for c in (plain, mirrored)]
    # short side 256 px, stride 16; res5 (512 channels) and the 6 Lab statistics of the preset's feature mix
    assert shapes[0] == shapes[1] == [(518, 21, 16), (518, 16, 16)]


@pytest.fixture(scope="module")
def random_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def freemask_args(images: Path, backbone: Path, out: Path) -> list[str]:
    return [
        "freemask",
        "--images",
        str(images),
        "--backbone",
        str(backbone),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "freemask.batch_size=2",
        "--set",
        "freemask.score_thr=0.3",
    ]


def test_json_round_trips_through_pycocotools(synth_data: Path, random_backbone: Path, tmp_path: Path) -> None:
    out = tmp_path / "coarse.json"
    assert main(freemask_args(synth_data / "val", random_backbone, out)) == 0
    document = json.loads(out.read_text())
    assert len(document["images"]) == 4 and document["annotations"], "a 0.3 threshold keeps some masks"
    coco = COCO(str(out))
    # loadRes takes its bbox branch when results carry boxes and rewrites area = w * h in the dicts it is given:
    # hand it a copy, and compare its masks.
    results = coco.loadRes(copy.deepcopy(document["annotations"]))
    for ann, loaded in zip(document["annotations"], results.dataset["annotations"], strict=True):
        mask = coco.annToMask(ann)
        assert mask.sum() == ann["area"] and np.array_equal(results.annToMask(loaded), mask)
        np.testing.assert_allclose(ann["bbox"], mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask))))
        assert len(ann["embedding"]) == load_preset("tiny").freemask.embedding_dim and 0 < ann["score"] <= 1
    assert not freemask_run.parts_dir(out).exists()


def test_crashed_run_resumes_without_duplicates(
    synth_data: Path, random_backbone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "coarse.json"
    real = freemask_run.coarse_masks
    calls = {"n": 0}

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(freemask_run, "coarse_masks", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated kill"):
        main(freemask_args(synth_data / "val", random_backbone, out))
    parts = freemask_run.read_done(freemask_run.parts_dir(out))
    assert len(parts) == 2 and not out.exists()  # the first batch of two was flushed
    with (freemask_run.parts_dir(out) / "rank0.jsonl").open("a") as part:
        part.write('{"file_name": "cut short')  # a line left half-written by the kill
    monkeypatch.setattr(freemask_run, "coarse_masks", real)
    calls["n"] = 0
    assert main(freemask_args(synth_data / "val", random_backbone, out)) == 0
    names = [image["file_name"] for image in json.loads(out.read_text())["images"]]
    assert sorted(names) == sorted(p.name for p in (synth_data / "val").glob("*.png")) and len(set(names)) == 4


def test_torchrun_shards_images(
    synth_data: Path, random_backbone: Path, tmp_path: Path, freesolo_under_torchrun: Callable
) -> None:
    out = tmp_path / "coarse.json"
    freesolo_under_torchrun(*freemask_args(synth_data / "val", random_backbone, out))
    names = [image["file_name"] for image in json.loads(out.read_text())["images"]]
    assert len(names) == 4 and len(set(names)) == 4


def test_lab_statistics_are_each_cells_colour_mean_and_spread() -> None:
    red, blue = torch.tensor([220, 30, 30], dtype=torch.uint8), torch.tensor([20, 40, 200], dtype=torch.uint8)
    image = red.view(3, 1, 1).repeat(1, 32, 32)
    image[:, :, 24:] = blue.view(3, 1, 1)  # cell (0, 1) of a 2 x 2 grid of 16 px cells: half red, half blue
    stats = lab_cell_statistics(image[None], 16)[0]
    lab_red, lab_blue = (rgb_to_lab(c.float().view(1, 3, 1, 1)).view(3) for c in (red, blue))
    torch.testing.assert_close(stats[:3, 0, 0], lab_red, atol=1e-3, rtol=0)
    torch.testing.assert_close(stats[3:, 0, 0], torch.zeros(3), atol=2e-2, rtol=0)
    torch.testing.assert_close(stats[:3, 0, 1], (lab_red + lab_blue) / 2, atol=1e-3, rtol=0)
    torch.testing.assert_close(stats[3:, 0, 1], (lab_red - lab_blue).abs() / 2, atol=1e-2, rtol=1e-4)


def test_mixed_features_weigh_learned_and_low_level_similarities() -> None:
    torch.manual_seed(0)
    learned, low_level, weight = torch.randn(12, 5, 4), 50 * torch.randn(6, 5, 4), 0.3
    mixed = mix_features(learned, low_level, weight).flatten(1)
    a, b = unit_scaled(learned).flatten(1), unit_scaled(low_level).flatten(1)
    torch.testing.assert_close(mixed.t() @ mixed, (1 - weight) * a.t() @ a + weight * b.t() @ b)
    assert torch.linalg.vector_norm(a, dim=0).mean() == pytest.approx(1.0) and a.mean(dim=1).abs().max() < 1e-5
    assert torch.equal(mix_features(None, low_level, 1.0), unit_scaled(low_level))


def colour_only(config_name: str = "tiny", **changes: object):
    config = load_preset(config_name)
    return dataclasses.replace(config, freemask=dataclasses.replace(config.freemask, low_level_weight=1.0, **changes))


def test_colour_statistics_find_a_square_without_a_backbone() -> None:
    config = colour_only(mask_thr=0.8)
    image = torch.full((3, 128, 128), 90, dtype=torch.uint8)
    image[:, 40:80, 32:72] = torch.tensor([200, 60, 40], dtype=torch.uint8).view(3, 1, 1)
    features = freemask_run.batch_features(None, [image], config)[0]
    assert features.shape == (6, 16, 16)  # 128 px upscaled to 256, stride 16: 8 px cells of the original
    square = np.zeros((128, 128), bool)
    square[40:80, 32:72] = True
    found = coarse_masks(features, (128, 128), config.freemask)
    assert max((m.mask & square).sum() / (m.mask | square).sum() for m in found) > 0.8


def test_freemask_without_backbone_needs_colour_statistics_alone(
    synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "coarse.json"
    args = ["freemask", "--images", str(synth_data / "val"), "--out", str(out), "--no-progress"]
    assert main(args) == 2 and "needs --backbone" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--set", "freemask.low_level_weight=1"]) == 0
    document = json.loads(out.read_text())
    assert document["annotations"] and document["info"]["backbone"] is None
