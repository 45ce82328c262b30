"""Self-supervised SOLO: copy-paste and views, the weak loss and its switches, `train --mode weak`, `selftrain`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from training.checkpoint import load_checkpoint
from training.cli import main
from training.config import apply_overrides, load_preset
from training.data.batching import Sample, collate
from training.data.coco import CocoInstances, ResizePolicy
from training.models import SOLOv2
from training.results import ImageGeometry
from training.selftrain import round_config, uncovered
from training.solo_training import weak_model_config
from training.weak import WeakStrongViews, collate_weak_strong, copy_paste, random_erase, weak_loss


def square_sample(top: int, left: int, side: int, colour: int, embedding: float) -> Sample:
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, top : top + side, left : left + side] = 1
    image[:, masks[0].bool()] = colour
    return Sample(
        image, masks, torch.zeros(1, dtype=torch.long), 1, ImageGeometry(64, 64, 64, 64), torch.full((1, 4), embedding)
    )


def always_paste() -> torch.Generator:
    """A generator whose first draw is below 0.5, so the donor's instance is pasted."""
    for seed in range(100):
        if torch.rand((), generator=torch.Generator().manual_seed(seed)) < 0.5:
            return torch.Generator().manual_seed(seed)
    raise AssertionError


def test_copy_paste_pastes_pixels_masks_and_embeddings() -> None:
    target = square_sample(10, 10, 20, colour=50, embedding=1.0)
    donor = square_sample(20, 20, 20, colour=200, embedding=2.0)
    pasted = copy_paste(target, donor, always_paste())
    assert pasted.masks.shape[0] == 2 and pasted.labels.tolist() == [0, 0]
    assert torch.equal(pasted.masks[1], donor.masks[0])
    assert (pasted.image[:, donor.masks[0].bool()] == 200).all()
    assert pasted.masks[0].sum() == 400 - 100  # the overlap (rows/cols 20..29) now belongs to the donor square
    assert pasted.embeddings[:, 0].tolist() == [1.0, 2.0]


def test_copy_paste_drops_instances_it_hides() -> None:
    target = square_sample(22, 22, 10, colour=50, embedding=1.0)
    donor = square_sample(20, 20, 20, colour=200, embedding=2.0)
    pasted = copy_paste(target, donor, always_paste())
    assert pasted.masks.shape[0] == 1 and pasted.embeddings[:, 0].tolist() == [2.0]


def test_random_erase_is_deterministic() -> None:
    image = torch.full((3, 32, 32), 7, dtype=torch.uint8)
    first = random_erase(image, torch.Generator().manual_seed(3))
    assert torch.equal(first, random_erase(image, torch.Generator().manual_seed(3)))


def coarse_from_ground_truth(ann: Path, out: Path) -> Path:
    """A coarse-mask json: the GT masks as one class, with random unit embeddings (stands in for Free Mask)."""
    data = json.loads(ann.read_text())
    generator = torch.Generator().manual_seed(0)
    for annotation in data["annotations"]:
        annotation["category_id"] = 1
        annotation["score"] = 1.0
        annotation["embedding"] = torch.nn.functional.normalize(torch.randn(128, generator=generator), dim=0).tolist()
    data["categories"] = [{"id": 1, "name": "object"}]
    out.write_text(json.dumps(data))
    return out


@pytest.fixture(scope="module")
def coarse(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return coarse_from_ground_truth(synth_data / "train.json", tmp_path_factory.mktemp("coarse") / "coarse.json")


def test_views_are_deterministic_and_differ(synth_data: Path, coarse: Path) -> None:
    dataset = CocoInstances(synth_data / "train", coarse, ResizePolicy((128,), 224, hflip=True), class_agnostic=True)
    views = WeakStrongViews(dataset, load_preset("tiny").weak)
    weak, strong = views[(0, 5)]
    weak_again, strong_again = views[(0, 5)]
    assert torch.equal(strong.image, strong_again.image) and torch.equal(weak.image, weak_again.image)
    assert torch.equal(weak.image, dataset[(0, 5)].image) and not torch.equal(weak.image, strong.image)
    batch = collate_weak_strong([views[(0, 5)], views[(1, 6)]], 32)
    assert batch.images.shape[0] == 4 and all(e is not None for e in batch.embeddings)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["weak.mask_loss=weak", "weak.embedding_weight=4"],
            {"loss_max", "loss_avg", "loss_pairwise", "loss_cate", "loss_embed"},
        ),
        (["weak.mask_loss=dice", "weak.embedding_weight=4"], {"loss_mask", "loss_cate", "loss_embed"}),
        (["weak.mask_loss=weak", "weak.embedding_weight=0"], {"loss_max", "loss_avg", "loss_pairwise", "loss_cate"}),
    ],
)
def test_weak_loss_terms(synth_data: Path, coarse: Path, overrides: list[str], expected: set[str]) -> None:
    config = weak_model_config(apply_overrides(load_preset("tiny"), [*overrides, "weak.pairwise_warmup=0"]))
    dataset = CocoInstances(synth_data / "train", coarse, ResizePolicy((128,), 224), class_agnostic=True)
    batch = collate([dataset[0], dataset[1]])
    torch.manual_seed(0)
    model = SOLOv2(config.model)
    losses = weak_loss(config)(model, batch, iteration=5)
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v >= 0 for v in losses.values())
    assert all(v > 0 for k, v in losses.items() if k != "loss_cate")
    sum(losses.values()).backward()
    assert model.head.kernel_pred.weight.grad.abs().sum() > 0
    assert (model.head.embed_pred is None) == ("weak.embedding_weight=0" in overrides)


def test_pairwise_term_warms_up(synth_data: Path, coarse: Path) -> None:
    config = weak_model_config(
        apply_overrides(load_preset("tiny"), ["weak.mask_loss=weak", "weak.pairwise_warmup=100"])
    )
    dataset = CocoInstances(synth_data / "train", coarse, ResizePolicy((128,), 224), class_agnostic=True)
    batch = collate([dataset[0]])
    model = SOLOv2(config.model)
    loss_fn = weak_loss(config)
    assert loss_fn(model, batch, iteration=0)["loss_pairwise"] == 0
    assert loss_fn(model, batch, iteration=50)["loss_pairwise"] > 0


def test_train_weak_then_selftrain(synth_data: Path, coarse: Path, tmp_path: Path) -> None:
    run = tmp_path / "weak"
    common = ["--no-progress", "--batch-size", "2", "--set", "weak.solver.log_period=1", "--set", "weak.mask_loss=weak"]
    common += ["--set", "weak.embedding_weight=4"]  # the paper's beta (the tiny preset turns the term off)
    assert (
        main(
            [
                "train",
                "--mode",
                "weak",
                "--images",
                str(synth_data / "train"),
                "--ann",
                str(coarse),
                "--out",
                str(run),
                "--iters",
                "2",
                *common,
            ]
        )
        == 0
    )
    payload = load_checkpoint(run / "model.pt")
    assert payload["config"]["model"]["num_classes"] == 1 and payload["config"]["model"]["embedding_dim"] == 128
    assert payload["config"]["solver"]["iters"] == 2 and payload["metadata"]["mode"] == "weak"
    assert {"loss_max", "loss_avg", "loss_pairwise", "loss_embed"} <= set(
        json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    )

    out = tmp_path / "selftrain"
    assert (
        main(
            [
                "selftrain",
                "--checkpoint",
                str(run / "model.pt"),
                "--images",
                str(synth_data / "train"),
                "--out",
                str(out),
                "--iters",
                "1",
                "--set",
                "weak.selftrain_score_thr=0",
                "--no-progress",
            ]
        )
        == 0
    )
    pseudo = json.loads((out / "round1" / "pseudo.json").read_text())
    assert len(pseudo["images"]) == 8
    assert all(len(a["embedding"]) == 128 and a["score"] >= 0 for a in pseudo["annotations"])
    per_image = [sum(a["image_id"] == image["id"] for a in pseudo["annotations"]) for image in pseudo["images"]]
    assert max(per_image) <= 20
    assert (out / "model.pt").is_file() and (out / "round1" / "model.pt").is_file()
    # a round trains --iters steps (weak.selftrain_iters; the tiny preset's 800 when not given); 0: the teacher's own
    assert load_checkpoint(out / "round1" / "model.pt")["config"]["solver"]["iters"] == 1
    assert round_config(run / "model.pt", []).weak.solver.iters == 800
    assert round_config(run / "model.pt", ["weak.selftrain_iters=0"]).weak.solver.iters == 2
    assert round_config(run / "model.pt", ["weak.selftrain_iters=5"]).weak.solver.iters == 5

    # with --coarse and no confident prediction (threshold above 1), the round keeps exactly the coarse masks
    kept = tmp_path / "selftrain-keep"
    keep = ["selftrain", "--checkpoint", str(run / "model.pt"), "--images", str(synth_data / "train")]
    keep += ["--out", str(kept), "--coarse", str(coarse), "--iters", "1", "--set", "weak.selftrain_score_thr=1.01"]
    assert main([*keep, "--no-progress"]) == 0
    labels = json.loads((kept / "round1" / "pseudo.json").read_text())
    assert labels["info"]["kept_from"] == str(coarse)
    assert masks_by_file(labels) == masks_by_file(json.loads(coarse.read_text()))


def masks_by_file(document: dict) -> dict[str, list[str]]:
    """Each image's RLE mask strings, sorted: two jsons hold the same masks when these are equal."""
    names = {image["id"]: image["file_name"] for image in document["images"]}
    grouped: dict[str, list[str]] = {name: [] for name in names.values()}
    for ann in document["annotations"]:
        grouped[names[ann["image_id"]]].append(ann["segmentation"]["counts"])
    return {name: sorted(counts) for name, counts in grouped.items()}


def rle_square(top: int, left: int, side: int) -> dict:
    canvas = np.zeros((64, 64), dtype=np.uint8, order="F")
    canvas[top : top + side, left : left + side] = 1
    rle = mask_utils.encode(canvas)
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def test_uncovered_keeps_the_coarse_masks_no_pseudo_label_covers() -> None:
    coarse = [
        {"id": 7, "image_id": 3, "segmentation": rle_square(0, 0, 10), "score": 0.5},  # covered: IoU 0.68
        {"id": 8, "image_id": 3, "segmentation": rle_square(20, 20, 10), "score": 0.4},  # overlapped, IoU 0.33
        {"id": 9, "image_id": 3, "segmentation": rle_square(40, 40, 10), "score": 0.3},  # untouched
    ]
    pseudo = [{"segmentation": rle_square(1, 1, 10)}, {"segmentation": rle_square(25, 20, 10)}]
    kept = uncovered(coarse, pseudo)
    assert [ann["score"] for ann in kept] == [0.4, 0.3]
    assert all("id" not in ann and "image_id" not in ann for ann in kept)  # merge() numbers them afresh
    assert [ann["score"] for ann in uncovered(coarse, [])] == [0.5, 0.4, 0.3]
    assert uncovered([], pseudo) == []


def test_weak_training_under_torchrun(
    synth_data: Path, coarse: Path, tmp_path: Path, freesolo_under_torchrun: Callable
) -> None:
    """Two gloo processes: the embedding head and the weak losses give DDP a gradient for every parameter."""
    run = tmp_path / "weak-ddp"
    data = f"--images {synth_data / 'train'} --ann {coarse}"
    freesolo_under_torchrun(*f"train --mode weak {data} --out {run} --iters 2 --batch-size 4 --no-progress".split())
    assert load_checkpoint(run / "model.pt")["metadata"]["mode"] == "weak"
