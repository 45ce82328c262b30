"""Running a trained SOLOv2 on batches: raw outputs -> graph-contract detections -> COCO results."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from training.checkpoint import model_from_checkpoint
from training.config import Config
from training.data.batching import Batch, Sample, collate
from training.data.coco import ResizePolicy
from training.geometry import padded_shape, same_canvas_batches
from training.models import SOLOv2
from training.models.postprocess import Detections, cell_embeddings, postprocess
from training.progress import progress as progress_bar
from training.results import image_results


class Predictor:
    """A model in eval mode with its config and label -> category-id map."""

    def __init__(
        self,
        model: SOLOv2,
        config: Config,
        category_ids: list[int],
        class_names: list[str],
        canvas: tuple[int, int] | None = None,
    ) -> None:
        self.model = model.eval()
        self.config = config
        self.category_ids = category_ids
        self.class_names = class_names
        self.canvas = canvas  # predict as a fixed-size export of this H x W does (None: each image its own canvas)

    @classmethod
    def from_checkpoint(cls, path: Path, canvas: tuple[int, int] | None = None) -> Predictor:
        model, config, metadata = model_from_checkpoint(path)
        category_ids = metadata.get("category_ids") or list(range(1, config.model.num_classes + 1))
        class_names = metadata.get("class_names") or [str(c) for c in category_ids]
        return cls(model, config, category_ids, class_names, canvas)

    @property
    def names_by_category(self) -> dict[int, str]:
        return dict(zip(self.category_ids, self.class_names, strict=True))

    @property
    def test_policy(self) -> ResizePolicy:
        sizes = self.config.input
        return ResizePolicy(
            (sizes.test_size,),
            sizes.max_size,
            resize_filter=sizes.resize_filter,
            resize_rounding=sizes.resize_rounding,
            canvas=self.canvas,
        )

    @torch.inference_mode()
    def detections(
        self, images: torch.Tensor, with_embeddings: bool = False, sizes: torch.Tensor | None = None
    ) -> tuple[Detections, torch.Tensor | None]:
        """uint8 [B, 3, H, W] (any H x W; masks at the padded size / 4) -> fixed-K detections, and, when asked and
        the model has an embedding head, each detection's embedding [B, K, D] (self-training's targets). ``sizes``
        [B, 2], each image's size before padding, lets a ``pad_normalized`` model pad as upstream does."""
        output = self.model(images, sizes)
        dets = postprocess(output, self.config.inference, self.config.model.strides)
        embeddings = cell_embeddings(output, dets.cells) if with_embeddings and output.embeddings else None
        return dets, embeddings

    def batch_results(self, batch: Batch, with_embeddings: bool = False) -> list[list[dict[str, Any]]]:
        """COCO results of every image of a batch, at the original image sizes."""
        sizes = torch.tensor([[g.resized_height, g.resized_width] for g in batch.geometries])
        return self.contract_results(batch, *self.detections(batch.images, with_embeddings, sizes))

    def contract_results(
        self, batch: Batch, dets: Detections, embeddings: torch.Tensor | None = None
    ) -> list[list[dict[str, Any]]]:
        """COCO results of every image of a batch from its detections (kept apart from the network so that one
        forward pass can be post-processed several ways, as the NMS benchmark does)."""
        return [
            image_results(
                int(dets.num_dets[i]),
                dets.scores[i].numpy(),
                dets.labels[i].numpy(),
                (dets.soft_masks if self.config.inference.resize_soft_masks else dets.masks)[i].numpy(),
                batch.geometries[i],
                batch.image_ids[i],
                self.category_ids,
                None if embeddings is None else embeddings[i].numpy(),
            )
            for i in range(len(batch.image_ids))
        ]

    def loader(self, dataset: Dataset, batch_size: int) -> Iterator[Batch]:
        """Batches of a dataset in order, each of images that share one canvas: padding an image further for the
        sake of another would change its detections (``training.geometry``)."""
        divisor = self.config.input.size_divisor

        def canvas(sample: Sample) -> tuple[int, int]:
            return self.canvas or padded_shape([tuple(sample.image.shape[-2:])], divisor)

        samples = (dataset[index] for index in range(len(dataset)))  # type: ignore[arg-type]
        for group in same_canvas_batches(samples, canvas, batch_size):
            yield collate(group, divisor, self.canvas)

    def iterate(
        self,
        dataset: Dataset,
        batch_size: int,
        progress: bool = True,
        desc: str = "predict",
        with_embeddings: bool = False,
    ) -> Iterator[tuple[Batch, list[list[dict[str, Any]]]]]:
        """Batches of a dataset with their results, with a progress bar."""
        with progress_bar(len(dataset), desc, "image", progress) as bar:
            for batch in self.loader(dataset, batch_size):
                yield batch, self.batch_results(batch, with_embeddings)
                bar.update(len(batch.image_ids))

    def dataset_results(
        self, dataset: Dataset, batch_size: int = 8, progress: bool = True, desc: str = "eval"
    ) -> list[dict[str, Any]]:
        """Every COCO result of a dataset, in one flat list (what pycocotools' ``loadRes`` takes)."""
        return [
            r for _, results in self.iterate(dataset, batch_size, progress, desc) for image in results for r in image
        ]
