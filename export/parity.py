"""Do two runtimes give the same detections? Graph-contract outputs of a batch compared image by image, as sets; and
COCO results (RLE masks at the original size, what ``freesolo predict`` and ``freesolo infer`` write) matched one to
one.

Detections are matched greedily by mask IoU (same label only), because two correct runtimes may order near-equal
scores differently, or swap which of two near-equal candidates is the K-th. Probability masks (``freesolo.masks``
probability) are binarised first, both sides the same way: at ``mask_thr``, as the graph binarises its binary masks,
so their IoU is the IoU of the masks the binary contract would carry. Their continuous values need no tolerance of
their own: they are the sigmoid of a 1x1 convolution of the raw heads, which ``compare_heads`` compares element by
element. numpy (and pycocotools for RLE) only, so every runtime (PyTorch, ONNX Runtime, TensorRT, Triton) is
compared with the same code (``freesolo parity``, the served-equals-predicted tests and the real-size benchmark reuse
it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from training.geometry import MASK_STRIDE

Outputs = Mapping[str, np.ndarray]  # contract name -> batched array (num_dets, scores, labels, boxes, masks)
Results = list[dict[str, Any]]  # COCO results: score, category_id, segmentation (RLE), bbox, image_id


@dataclass(frozen=True)
class Tolerance:
    """What counts as the same detections: num_dets within ``num_dets``, at most ``unmatched`` detections of either
    side without a partner, matched masks at IoU >= ``mask_iou``, scores within ``score``, boxes within ``box``
    pixels (one stride-4 mask cell by default). Raw head tensors (before any threshold) agree when every element
    satisfies ``|a - b| <= head_atol + head_rtol * |a|`` (a the reference), as in ``numpy.allclose``."""

    num_dets: int = 1
    unmatched: int = 1
    mask_iou: float = 0.98
    score: float = 1e-3
    box: float = float(MASK_STRIDE)
    head_atol: float = 1e-3
    head_rtol: float = 1e-3


@dataclass
class ImageParity:
    """One image's comparison; ``problems`` is empty when the image passes."""

    num_dets: tuple[int, int]
    matched: int
    unmatched: tuple[int, int]
    min_iou: float
    max_score_diff: float
    max_box_diff: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [n, m] of binary masks a [n, h, w] and b [m, h, w]; empty unions give 0."""
    pixels = int(np.prod(a.shape[1:]))
    fa = a.reshape(len(a), pixels).astype(np.float64)
    fb = b.reshape(len(b), pixels).astype(np.float64)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1.0), 0.0)


def binary_masks(masks: np.ndarray, mask_thr: float) -> np.ndarray:
    """bool masks of the contract's ``masks``: binary uint8 as they are, float32 probabilities above ``mask_thr``."""
    return masks > (mask_thr if np.issubdtype(masks.dtype, np.floating) else 0)


def greedy_match(iou: np.ndarray, same_label: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (i, j), best IoU first, each detection used once, same label and IoU > 0 only. Low-IoU pairs are
    kept, so that a mask that moved is reported as a low IoU rather than as two unmatched detections."""
    candidates = np.argwhere(same_label & (iou > 0))
    order = np.argsort(-iou[candidates[:, 0], candidates[:, 1]], kind="stable")
    used_a, used_b, pairs = set(), set(), []
    for i, j in candidates[order]:
        if i not in used_a and j not in used_b:
            used_a.add(int(i))
            used_b.add(int(j))
            pairs.append((int(i), int(j)))
    return pairs


def compare_image(
    reference: Outputs, candidate: Outputs, index: int, tolerance: Tolerance, mask_thr: float = 0.5
) -> ImageParity:
    """Compare image ``index`` of two batches of contract outputs (probability masks binarised at ``mask_thr``)."""
    na, nb = int(reference["num_dets"][index]), int(candidate["num_dets"][index])
    masks_a = binary_masks(reference["masks"][index, :na], mask_thr)
    masks_b = binary_masks(candidate["masks"][index, :nb], mask_thr)
    labels_a, labels_b = reference["labels"][index, :na], candidate["labels"][index, :nb]
    iou = mask_iou(masks_a, masks_b)
    pairs = greedy_match(iou, labels_a[:, None] == labels_b[None, :])
    ious = [iou[i, j] for i, j in pairs]
    score_diffs = [abs(float(reference["scores"][index, i]) - float(candidate["scores"][index, j])) for i, j in pairs]
    box_diffs = [float(np.abs(reference["boxes"][index, i] - candidate["boxes"][index, j]).max()) for i, j in pairs]
    result = ImageParity(
        num_dets=(na, nb),
        matched=len(pairs),
        unmatched=(na - len(pairs), nb - len(pairs)),
        min_iou=min(ious, default=1.0),
        max_score_diff=max(score_diffs, default=0.0),
        max_box_diff=max(box_diffs, default=0.0),
    )
    checks = [
        (abs(na - nb) <= tolerance.num_dets, f"num_dets {na} vs {nb}"),
        (max(result.unmatched) <= tolerance.unmatched, f"unmatched detections {result.unmatched}"),
        (result.min_iou >= tolerance.mask_iou, f"matched mask IoU {result.min_iou:.4f}"),
        (result.max_score_diff <= tolerance.score, f"score difference {result.max_score_diff:.2e}"),
        (result.max_box_diff <= tolerance.box, f"box difference {result.max_box_diff:.1f} px"),
    ]
    result.problems = [message for passed, message in checks if not passed]
    return result


def compare_outputs(
    reference: Outputs, candidate: Outputs, tolerance: Tolerance | None = None, mask_thr: float = 0.5
) -> list[ImageParity]:
    """Every image of two batches of contract outputs (same batch size), compared as detection sets."""
    tolerance = tolerance or Tolerance()
    batch = len(reference["num_dets"])
    if len(candidate["num_dets"]) != batch:
        raise ValueError(f"batch sizes differ: {batch} vs {len(candidate['num_dets'])}")
    return [compare_image(reference, candidate, i, tolerance, mask_thr) for i in range(batch)]


def summary(results: list[ImageParity]) -> str:
    """One line per failing image (or one line saying all passed), for test messages and the CLI."""
    failing = [f"image {i}: {'; '.join(r.problems)}" for i, r in enumerate(results) if not r.ok]
    if not failing:
        dets = sum(r.matched for r in results)
        return f"{len(results)} images, {dets} matched detections: all within tolerance"
    return "\n".join(failing)


@dataclass
class HeadParity:
    """One image's raw head tensors compared: the largest absolute difference, in which tensor, and what failed."""

    max_abs_diff: float
    worst: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def compare_heads(reference: Outputs, candidate: Outputs, index: int, tolerance: Tolerance) -> HeadParity:
    """Image ``index`` of two batches of named raw tensors (same names and shapes), element by element.

    Continuous values before any threshold: a numeric drift shows here long before it flips a detection."""
    result = HeadParity(max_abs_diff=0.0, worst="")
    outside = []
    for name, ref in reference.items():
        if name not in candidate:
            result.problems.append(f"head {name} missing")
            continue
        a, b = np.asarray(ref[index], np.float64), np.asarray(candidate[name][index], np.float64)
        if a.shape != b.shape:
            result.problems.append(f"head {name} shape {a.shape} vs {b.shape}")
            continue
        if not np.isfinite(b).all():
            result.problems.append(f"head {name} has NaN or inf")
            continue
        diff = np.abs(a - b)
        worst = float(diff.max(initial=0.0))
        if (diff > tolerance.head_atol + tolerance.head_rtol * np.abs(a)).any():
            outside.append(name)
        if worst > result.max_abs_diff or not result.worst:
            result.max_abs_diff, result.worst = worst, name
    if outside:
        result.problems.append(
            f"heads outside tolerance: {len(outside)} of {len(reference)} tensors "
            f"(worst {result.worst}, max |diff| {result.max_abs_diff:.2e})"
        )
    return result


# Served against predicted: the same pixels in, so every detection must have its partner.
ONE_TO_ONE = Tolerance(num_dets=0, unmatched=0)


def results_by_image(results: Results, count: int) -> list[Results]:
    """A flat results list (``image_id`` = index into the images given) grouped per image."""
    grouped: list[Results] = [[] for _ in range(count)]
    for result in results:
        grouped[result["image_id"]].append(result)
    return grouped


def results_mismatches(reference: Results, candidate: Results, tolerance: Tolerance = ONE_TO_ONE) -> list[str]:
    """One image's COCO results matched one to one: same category, RLE mask IoU >= ``tolerance.mask_iou``, score
    within ``tolerance.score``; what does not match, in words (empty: they match). Pairs are taken by closest score
    (Matrix NMS leaves near-duplicates: equal masks, different scores)."""
    counts = f"{len(reference)} detections in the reference, {len(candidate)} in the candidate"
    if not reference or not candidate:
        return [counts] if abs(len(reference) - len(candidate)) > tolerance.num_dets else []
    masks_a = [r["segmentation"] for r in reference]
    masks_b = [c["segmentation"] for c in candidate]
    iou = np.asarray(mask_utils.iou(masks_a, masks_b, [0] * len(candidate)))
    pairs = sorted(
        (abs(a["score"] - b["score"]), i, j)
        for i, a in enumerate(reference)
        for j, b in enumerate(candidate)
        if a["category_id"] == b["category_id"]
        and iou[i, j] >= tolerance.mask_iou
        and abs(a["score"] - b["score"]) <= tolerance.score
    )
    left, right = set(range(len(reference))), set(range(len(candidate)))
    for _, i, j in pairs:
        if i in left and j in right:
            left.discard(i)
            right.discard(j)
    problems = [counts] if abs(len(reference) - len(candidate)) > tolerance.num_dets else []
    if problems or max(len(left), len(right)) > tolerance.unmatched:
        alone = [
            f"{side} {i} (score {dets[i]['score']:.5f})"
            for side, dets, indices in (("reference", reference, left), ("candidate", candidate, right))
            for i in sorted(indices)
        ]
        problems.append(f"without a partner: {', '.join(alone) or 'none'}")
    return problems
