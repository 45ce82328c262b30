"""Running Free Mask over a folder: batched, sharded by rank under torchrun, resumable, one COCO json at the end.

Each rank appends one json line per finished image to ``OUT.parts/rank<r>.jsonl``; a restarted run skips the images
already there (a line cut short by a kill is dropped and redone). When every rank is done, rank 0 merges the parts
into OUT (atomically) and removes them.

OUT has the format of ``training.coarse_json``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.backbone_io import load_backbone
from training.coarse_json import annotation, image_record, merge
from training.config import Config
from training.data.batching import pad_to
from training.data.images import read_rgb
from training.data.transforms import resize_image, to_tensor_image
from training.engine.distributed import DistributedContext
from training.errors import UserError
from training.fileio import atomic_write_text
from training.freemask import backbone_stride, c5_features, coarse_masks, lab_cell_statistics, mix_features
from training.geometry import padded_shape, resized_shape
from training.progress import progress as progress_bar


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def read_done(folder: Path) -> dict[str, dict[str, Any]]:
    """Finished images of every rank, by file name; a line cut short by a kill is ignored (and redone)."""
    done: dict[str, dict[str, Any]] = {}
    for part in sorted(folder.glob("rank*.jsonl")):
        for line in part.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record["file_name"]] = record
    return done


def drop_partial_line(part: Path) -> None:
    """Cut a part file back to its last complete line, so appending after a kill starts on a fresh line."""
    if not part.is_file():
        return
    data = part.read_bytes()
    if data and not data.endswith(b"\n"):
        part.write_bytes(data[: data.rfind(b"\n") + 1])


def network_input(image: torch.Tensor, config: Config) -> torch.Tensor:
    """Resize to the Free Mask input size, rounded to a multiple of the backbone stride."""
    stride = backbone_stride(config.freemask.dilate_res5)
    height, width = resized_shape(*image.shape[-2:], config.freemask.input_size, config.freemask.max_size)
    size = (max(stride, round(height / stride) * stride), max(stride, round(width / stride) * stride))
    return resize_image(image, size)


def low_level_input(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The image at the network input's size by nearest-neighbour resizing: per-cell colour statistics then see the
    original pixels (an integer upscale repeats them exactly) instead of the bilinear resize's smoothed ones."""
    return F.interpolate(image[None].float(), size=size, mode="nearest-exact")[0].to(image.dtype)


def border_padded(image: torch.Tensor, pad: int) -> torch.Tensor:
    """The image mirrored ``pad`` pixels outwards on every side (replicated when it is too small to mirror)."""
    if pad == 0:
        return image
    mode = "reflect" if min(image.shape[-2:]) > pad else "replicate"
    return torch.nn.functional.pad(image[None].float(), (pad, pad, pad, pad), mode=mode)[0].to(image.dtype)


def batch_features(backbone: torch.nn.Module | None, images: list[torch.Tensor], config: Config) -> list[torch.Tensor]:
    """The cell features Free Mask compares, for several images in one forward pass: res5 features, or with
    ``freemask.low_level_weight`` > 0 res5 mixed with per-cell Lab statistics (``mix_features``; at weight 1 the
    backbone is not run and may be None). Each image is mirrored by ``freemask.border_cells`` cells, padded to a common
    size, then each cropped back to its own region."""
    stride = backbone_stride(config.freemask.dilate_res5)
    border = config.freemask.border_cells
    weight = config.freemask.low_level_weight
    resized = [network_input(image, config) for image in images]
    inputs = [border_padded(r, border * stride) for r in resized]
    size = padded_shape([tuple(t.shape[-2:]) for t in inputs], stride)
    stacked = torch.stack([pad_to(t, size) for t in inputs])
    features = None
    if weight < 1:
        if backbone is None:
            raise UserError("Free Mask needs a backbone unless freemask.low_level_weight is 1")
        mean, std = torch.tensor(config.model.pixel_mean), torch.tensor(config.model.pixel_std)
        features = c5_features(backbone, stacked, mean, std)
    low_level = None
    if weight > 0:
        plain = [
            border_padded(low_level_input(image, tuple(r.shape[-2:])), border * stride)
            for image, r in zip(images, resized, strict=True)
        ]
        low_level = lab_cell_statistics(torch.stack([pad_to(t, size) for t in plain]), stride)
    cropped = []
    for i, t in enumerate(inputs):
        region = (
            slice(None),
            slice(border, t.shape[-2] // stride - border),
            slice(border, t.shape[-1] // stride - border),
        )
        learned = None if features is None else features[i][region]
        cropped.append(learned if low_level is None else mix_features(learned, low_level[i][region], weight))
    return cropped


def run_freemask(
    files: list[Path],
    root: Path,
    backbone_path: Path | None,
    out: Path,
    config: Config,
    progress: bool = True,
) -> int:
    """Free Mask on ``files`` (names relative to ``root`` go into the json); returns the number of masks."""
    context = DistributedContext.from_env()
    backbone = None
    if config.freemask.low_level_weight < 1:
        if backbone_path is None:
            raise UserError("Free Mask needs --backbone unless freemask.low_level_weight is 1")
        backbone, _ = load_backbone(backbone_path, config.freemask.dilate_res5)
    names = [str(f.relative_to(root)) for f in files]
    folder = parts_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    done = read_done(folder)
    mine = [i for i in range(len(files)) if i % context.world_size == context.rank and names[i] not in done]
    batch_size = config.freemask.batch_size
    part_file = folder / f"rank{context.rank}.jsonl"
    drop_partial_line(part_file)
    with part_file.open("a") as part, torch.inference_mode():
        bar = progress_bar(len(mine), "freemask", "img", progress and context.is_main)
        for start in range(0, len(mine), batch_size):
            indices = mine[start : start + batch_size]
            images = [to_tensor_image(read_rgb(files[index])) for index in indices]
            for index, image, features in zip(indices, images, batch_features(backbone, images, config), strict=True):
                found = coarse_masks(features, tuple(image.shape[-2:]), config.freemask)
                annotations = [annotation(c.mask, c.score, c.embedding) for c in found]
                part.write(json.dumps(image_record(names[index], *image.shape[-2:], annotations)) + "\n")
            part.flush()
            bar.update(len(indices))
        bar.close()
    context.barrier()
    count = 0
    if context.is_main:
        done = read_done(folder)
        missing = [name for name in names if name not in done]
        if missing:
            raise UserError(f"{folder} lacks {len(missing)} images (e.g. {missing[0]}); run again to resume")
        info = {
            "generator": "freesolo freemask",
            "backbone": None if backbone is None else str(backbone_path),
            "config": dataclasses.asdict(config.freemask),
        }
        document = merge([done[name] for name in names], info)
        atomic_write_text(out, json.dumps(document) + "\n")
        shutil.rmtree(folder)
        count = len(document["annotations"])
    context.barrier()
    context.close()
    return count
