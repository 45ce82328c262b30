"""How well can a backbone's res5 features group objects at all? Free Mask with an oracle query.

For every ground-truth object of the evaluation set, the query is the mean res5 feature inside the object (the best
single query Free Mask could pick); its cosine score map, min-max normalised and thresholded at tau, is compared with
the object (IoU). Free Mask's own queries are single cells or pooled cells, so its masks cannot be better than this
on average. Comparing backbones (DenseCL, random initialisation, a supervised SOLO backbone) tells whether the
features or the mask extraction limit the coarse masks.

    python -m studies.freemask_oracle --images DIR --ann GT.json --backbone NAME=CKPT [--backbone ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from training.backbone_io import load_backbone
from training.config import load_preset
from training.data.images import read_rgb
from training.data.transforms import to_tensor_image
from training.evaluate import load_ground_truth
from training.freemask_run import batch_features

TAUS = (0.5, 0.8)


def oracle_ious(backbone: torch.nn.Module, images: Path, ann: Path, taus: tuple[float, ...]) -> dict[float, list]:
    """IoU of the oracle-query mask with its object, for every object and threshold."""
    config = load_preset("tiny")  # its Free Mask input, but res5 alone: the backbone is what is measured
    config = dataclasses.replace(config, freemask=dataclasses.replace(config.freemask, low_level_weight=0.0))
    ground_truth = load_ground_truth(ann)
    ious: dict[float, list[float]] = {tau: [] for tau in taus}
    for image_info in ground_truth.dataset["images"]:
        image = to_tensor_image(read_rgb(images / image_info["file_name"]))
        with torch.inference_mode():
            features = batch_features(backbone, [image], config)[0]
        if config.freemask.center_features:
            features = features - features.mean(dim=(1, 2), keepdim=True)
        _, height, width = features.shape
        keys = F.normalize(features.flatten(1), dim=0)
        for annotation in ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=image_info["id"])):
            mask = torch.from_numpy(ground_truth.annToMask(annotation)).float()
            weights = F.interpolate(mask[None, None], size=(height, width), mode="area").flatten()
            if weights.sum() < 0.5:  # smaller than half a feature cell
                continue
            query = (features.flatten(1) * weights).sum(1) / weights.sum()
            scores = F.normalize(query, dim=0) @ keys
            scores = (scores - scores.min()) / (scores.max() - scores.min()).clamp(min=1e-6)
            soft = F.interpolate(scores.view(1, 1, height, width), size=mask.shape, mode="bilinear")[0, 0]
            for tau in taus:
                found, truth = soft >= tau, mask.bool()
                ious[tau].append(float((found & truth).sum() / (found | truth).sum()))
    return ious


def random_backbone(folder: Path) -> Path:
    torch.manual_seed(0)
    path = folder / "resnet18_random_init.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="evaluation images")
    parser.add_argument("--ann", type=Path, required=True, help="their ground truth")
    parser.add_argument(
        "--backbone", action="append", default=[], metavar="NAME=CKPT", help="a backbone to test (repeatable)"
    )
    parser.add_argument("--json", type=Path, help="write the table here too")
    args = parser.parse_args(argv)
    backbones = dict(item.split("=", 1) for item in args.backbone)
    work = (args.json or Path("runs/oracle.json")).parent
    work.mkdir(parents=True, exist_ok=True)
    backbones.setdefault("random initialisation", str(random_backbone(work)))
    dilate = load_preset("tiny").freemask.dilate_res5
    rows = {}
    print("| backbone | " + " | ".join(f"mean IoU (tau {t}) | IoU >= 0.5 (tau {t})" for t in TAUS) + " |")
    print("|---" * (1 + 2 * len(TAUS)) + "|")
    for name, checkpoint in backbones.items():
        backbone, _ = load_backbone(Path(checkpoint), dilate)
        ious = oracle_ious(backbone.eval(), args.images, args.ann, TAUS)
        rows[name] = {
            str(t): {"mean_iou": float(np.mean(v)), "share_iou_0.5": float(np.mean(np.array(v) >= 0.5))}
            for t, v in ious.items()
        }
        cells = [f"{rows[name][str(t)]['mean_iou']:.3f} | {rows[name][str(t)]['share_iou_0.5']:.2f}" for t in TAUS]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
