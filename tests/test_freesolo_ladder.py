"""The FreeSOLO ladder at test size: checks that tell which stage of the unsupervised pipeline broke.

(a) the weak trainer, given ground-truth masks as its coarse labels, learns nearly what the supervised recipe learns
    in as many steps (it is not the weak trainer that fails when the pipeline does);
(c) on the same images, Free Mask from hand-made colour statistics (the baseline a learned backbone has to reach)
    finds objects where Free Mask from an untrained backbone does not.
The full-size ladder, with (b) (the weak trainer on a fixed noisy coarse set ends above that set's AP), is measured in
docs/freesolo_results.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from training.cli import main
from training.data.synth import write_synthetic_dataset
from training.evaluate import coco_metrics, load_ground_truth
from training.report import coarse_on_ground_truth, model_results, stage_row

STEPS = "60"


@pytest.fixture(scope="module")
def ladder_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ladder")
    write_synthetic_dataset(root, num_train=8, num_val=24, size=128, seed=5, progress=False)
    return root


def train_args(images: Path, ann: Path, out: Path, mode: str) -> list[str]:
    args = ["train", "--mode", mode, "--images", str(images), "--ann", str(ann), "--out", str(out)]
    return [*args, "--iters", STEPS, "--batch-size", "4", "--no-progress"]


def fit_ap50(checkpoint: Path, images: Path, ann: Path) -> float:
    """Class-agnostic mask AP50 of a model on the images it trained on: what it learned from its labels."""
    results = model_results(checkpoint, images, ann, progress=False)
    return coco_metrics(load_ground_truth(ann), results, class_agnostic=True)["segm"]["AP50"]


def test_ladder_a_weak_trainer_on_ground_truth_learns_like_the_supervised_recipe(
    ladder_data: Path, tmp_path: Path
) -> None:
    images, truth = ladder_data / "train", ladder_data / "train.json"
    coarse = tmp_path / "truth_as_coarse.json"
    document = json.loads(truth.read_text())
    document["annotations"] = [{**ann, "score": 1.0} for ann in document["annotations"]]
    coarse.write_text(json.dumps(document))
    weak_args = train_args(images, coarse, tmp_path / "weak", "weak")
    assert main(weak_args) == 0
    supervised_args = train_args(images, truth, tmp_path / "supervised", "supervised")
    assert main([*supervised_args, "--class-agnostic"]) == 0
    weak = fit_ap50(tmp_path / "weak" / "model.pt", images, truth)
    supervised = fit_ap50(tmp_path / "supervised" / "model.pt", images, truth)
    assert supervised > 0.3 and weak > 0.6 * supervised, (weak, supervised)


def coarse_ap(coarse: Path, ann: Path) -> dict[str, float]:
    ground_truth = load_ground_truth(ann)
    return stage_row("coarse", ground_truth, coarse_on_ground_truth(json.loads(coarse.read_text()), ground_truth))


def test_ladder_c_colour_baseline_beside_an_untrained_backbone(ladder_data: Path, tmp_path: Path) -> None:
    root = ladder_data
    random_backbone = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), random_backbone)
    rows = {}
    for name, weight in (("colour", "1"), ("untrained", "0")):
        out = tmp_path / f"{name}.json"
        args = ["freemask", "--images", str(root / "val"), "--backbone", str(random_backbone), "--out", str(out)]
        assert main([*args, "--no-progress", "--set", f"freemask.low_level_weight={weight}"]) == 0
        rows[name] = coarse_ap(out, root / "val.json")
    assert rows["colour"]["AP50"] > 0.1 and rows["colour"]["AP50"] > 3 * rows["untrained"]["AP50"], rows
