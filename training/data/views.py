"""Two independently augmented views of each unlabeled image, for DenseCL pre-training (docs/algorithms.md, "DenseCL").

Every random choice is drawn from a ``torch.Generator`` seeded with the sample's seed, so a view depends only on
``(index, seed)``: not on workers, not on the order of loading, not on resuming.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

from training.data.images import list_images, read_rgb
from training.data.transforms import to_tensor_image
from training.errors import UserError

ASPECT_RANGE = (3 / 4, 4 / 3)
JITTER_STRENGTH = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
JITTER_P, GRAYSCALE_P, BLUR_P, FLIP_P = 0.8, 0.2, 0.5, 0.5
BLUR_SIGMA = (0.1, 2.0)
CROP_ATTEMPTS = 10


def uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def chance(probability: float, generator: torch.Generator) -> bool:
    return float(torch.rand((), generator=generator)) < probability


def crop_box(
    height: int, width: int, scale: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) covering a random share ``scale`` of the image at an aspect ratio in 3/4..4/3; after
    ``CROP_ATTEMPTS`` misses, the largest central crop within that ratio range."""
    area = height * width
    log_low, log_high = math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])
    for _ in range(CROP_ATTEMPTS):
        target = area * uniform(scale[0], scale[1], generator)
        aspect = math.exp(uniform(log_low, log_high, generator))
        crop_w, crop_h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(height - crop_h + 1, (), generator=generator))
            left = int(torch.randint(width - crop_w + 1, (), generator=generator))
            return top, left, crop_h, crop_w
    aspect = min(max(width / height, ASPECT_RANGE[0]), ASPECT_RANGE[1])
    crop_w, crop_h = min(width, round(height * aspect)), min(height, round(width / aspect))
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def color_jitter(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue with random factors, applied in a random order."""
    brightness, contrast, saturation, hue = JITTER_STRENGTH
    operations = [
        (TF.adjust_brightness, uniform(1 - brightness, 1 + brightness, generator)),
        (TF.adjust_contrast, uniform(1 - contrast, 1 + contrast, generator)),
        (TF.adjust_saturation, uniform(1 - saturation, 1 + saturation, generator)),
        (TF.adjust_hue, uniform(-hue, hue, generator)),
    ]
    for position in torch.randperm(len(operations), generator=generator).tolist():
        operation, factor = operations[position]
        image = operation(image, factor)
    return image


def photometric(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MoCo v2's colour part: jitter (p 0.8), grayscale (p 0.2), Gaussian blur (p 0.5) of a [3, H, W] uint8 image.
    Geometry is untouched, so masks and boxes of the image stay valid (the strong view of weak training)."""
    if chance(JITTER_P, generator):
        image = color_jitter(image, generator)
    if chance(GRAYSCALE_P, generator):
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if chance(BLUR_P, generator):
        kernel = 2 * round(0.05 * min(image.shape[-2:])) + 1  # about 10% of the side, odd (23 px at 224, MoCo v2)
        sigma = uniform(*BLUR_SIGMA, generator)
        image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
    return image


def augment(
    image: torch.Tensor, crop_size: int, crop_scale: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """One MoCo-v2/DenseCL view of a [3, H, W] uint8 image: [3, crop_size, crop_size] uint8."""
    top, left, crop_h, crop_w = crop_box(image.shape[-2], image.shape[-1], crop_scale, generator)
    view = photometric(
        TF.resized_crop(image, top, left, crop_h, crop_w, [crop_size, crop_size], antialias=True), generator
    )
    if chance(FLIP_P, generator):
        view = TF.horizontal_flip(view)
    return view.contiguous()


class TwoViews(Dataset):
    """Unlabeled images; item ``(index, seed)`` is the pair (view_q, view_k) of two independent augmentations."""

    def __init__(self, files: list[Path], crop_size: int, crop_scale: tuple[float, float]) -> None:
        if not files:
            raise UserError("no images given")
        low, high = crop_scale
        if not 0 < low <= high <= 1:
            raise UserError(f"crop scale must satisfy 0 < low <= high <= 1, got {list(crop_scale)}")
        self.files = [Path(f) for f in files]
        self.crop_size = crop_size
        self.crop_scale = (low, high)

    @classmethod
    def from_folder(cls, folder: Path, crop_size: int, crop_scale: tuple[float, float]) -> TwoViews:
        return cls(list_images(Path(folder)), crop_size, crop_scale)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item
        image = to_tensor_image(read_rgb(self.files[index]))
        generator = torch.Generator().manual_seed(seed)
        view_q = augment(image, self.crop_size, self.crop_scale, generator)
        view_k = augment(image, self.crop_size, self.crop_scale, generator)
        return view_q, view_k


def stack_view_pairs(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the query views and the key views into two uint8 [B, 3, S, S] batches."""
    views_q, views_k = zip(*items, strict=True)
    return torch.stack(views_q), torch.stack(views_k)
