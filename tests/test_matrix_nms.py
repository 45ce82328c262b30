"""Matrix NMS: the known cases of docs/algorithms.md ("Matrix NMS") and equality with a per-pair loop written
straight from the formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.ops import matrix_nms
from training.ops.matrix_nms import EPS


def naive_matrix_nms(
    masks: np.ndarray, labels: np.ndarray, scores: np.ndarray, kernel: str, sigma: float
) -> np.ndarray:
    """decay_j = min over i < j (same label) of f(IoU_ij) / f(comp_i), comp_i = max over k < i (same label) IoU_ki;
    deliberately one pair at a time, in float64, sharing nothing with the implementation under test."""
    n = len(scores)
    flat = masks.reshape(n, -1).astype(bool)

    def iou(a: int, b: int) -> float:
        union = np.logical_or(flat[a], flat[b]).sum()
        return float(np.logical_and(flat[a], flat[b]).sum() / union) if union else 0.0

    def f(value: float) -> float:
        return math.exp(-sigma * value * value) if kernel == "gaussian" else 1.0 - value

    compensation = [max([iou(k, i) for k in range(i) if labels[k] == labels[i]], default=0.0) for i in range(n)]
    decayed = []
    for j in range(n):
        decay = 1.0
        for i in range(j):
            if labels[i] != labels[j]:
                continue
            denominator = f(compensation[i]) if kernel == "gaussian" else max(f(compensation[i]), EPS)
            decay = min(decay, f(iou(i, j)) / denominator)
        decayed.append(scores[j] * decay)
    return np.array(decayed)


def random_case(rng: np.random.Generator, n: int, num_labels: int, size: int = 24) -> tuple[np.ndarray, ...]:
    """Random rectangles and discs, a fifth of them exact duplicates of earlier masks, sorted random scores."""
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for k in range(n):
        if k > 0 and rng.random() < 0.2:
            masks[k] = masks[rng.integers(k)]
        elif rng.random() < 0.5:
            y0, x0 = rng.integers(0, size - 4, 2)
            masks[k, y0 : y0 + rng.integers(2, 12), x0 : x0 + rng.integers(2, 12)] = True
        else:
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, 8)
            masks[k] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    labels = rng.integers(0, num_labels, n)
    scores = np.sort(rng.uniform(0.05, 1.0, n))[::-1].copy()
    return masks, labels, scores


def run(masks: np.ndarray, labels: np.ndarray, scores: np.ndarray, **kwargs) -> np.ndarray:
    return matrix_nms(
        torch.from_numpy(masks), torch.from_numpy(labels), torch.from_numpy(scores).float(), **kwargs
    ).numpy()


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize(("n", "num_labels", "seed"), [(7, 1, 0), (60, 3, 1), (150, 5, 2), (300, 4, 3)])
def test_equals_naive_loop(kernel: str, n: int, num_labels: int, seed: int) -> None:
    masks, labels, scores = random_case(np.random.default_rng(seed), n, num_labels)
    expected = naive_matrix_nms(masks, labels, scores, kernel, 2.0)
    np.testing.assert_allclose(run(masks, labels, scores, kernel=kernel, sigma=2.0), expected, atol=1e-5, rtol=0)


def test_float_masks_and_precomputed_area_match_bool_masks() -> None:
    masks, labels, scores = random_case(np.random.default_rng(4), 40, 2)
    area = torch.from_numpy(masks.reshape(40, -1).sum(1)).float()
    as_float = matrix_nms(
        torch.from_numpy(masks).float(), torch.from_numpy(labels), torch.from_numpy(scores).float(), mask_area=area
    )
    np.testing.assert_allclose(as_float.numpy(), run(masks, labels, scores), atol=1e-6)


def two_identical(scores: list[float], copies: int = 2, labels: list[int] | None = None) -> tuple[np.ndarray, ...]:
    masks = np.zeros((copies, 8, 8), dtype=bool)
    masks[:, 2:6, 2:6] = True
    return masks, np.array(labels or [0] * copies), np.array(scores, dtype=np.float64)


def test_known_case_gaussian_two_identical() -> None:
    out = run(*two_identical([0.9, 0.8]), kernel="gaussian", sigma=2.0)
    np.testing.assert_allclose(out, [0.9, 0.8 * math.exp(-2)], atol=1e-6)
    assert out[1] == pytest.approx(0.1083, abs=1e-4)


def test_known_case_linear_two_identical() -> None:
    np.testing.assert_allclose(run(*two_identical([0.9, 0.8]), kernel="linear"), [0.9, 0.0], atol=1e-6)


def test_known_case_thousand_copies_keep_one() -> None:
    decayed = run(*two_identical([1.0] * 1000, copies=1000), kernel="gaussian", sigma=2.0)
    kept = decayed[decayed >= 0.5]
    assert len(kept) == 1 and kept[0] == pytest.approx(1.0)


def test_linear_three_identical_masks_no_nan() -> None:
    out = run(*two_identical([0.9, 0.8, 0.7], copies=3), kernel="linear")
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, [0.9, 0.0, 0.0], atol=1e-6)


def test_different_labels_do_not_suppress() -> None:
    out = run(*two_identical([0.9, 0.8], labels=[0, 1]))
    np.testing.assert_allclose(out, [0.9, 0.8], atol=1e-7)


def test_empty_and_single() -> None:
    empty = matrix_nms(torch.zeros(0, 5, 5, dtype=torch.bool), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert empty.shape == (0,)
    single = matrix_nms(torch.ones(1, 5, 5, dtype=torch.bool), torch.zeros(1, dtype=torch.long), torch.tensor([0.7]))
    assert single.tolist() == pytest.approx([0.7])


def test_scores_never_increase_and_top_keeps_score() -> None:
    masks, labels, scores = random_case(np.random.default_rng(5), 120, 2)
    for kernel in ("gaussian", "linear"):
        out = run(masks, labels, scores, kernel=kernel)
        assert (out <= scores.astype(np.float32) + 1e-7).all()
        assert out[0] == pytest.approx(scores[0], abs=1e-6)


def test_leading_batch_dims_are_independent() -> None:
    rng = np.random.default_rng(6)
    cases = [random_case(rng, 30, 3) for _ in range(3)]
    batched = matrix_nms(
        torch.from_numpy(np.stack([c[0] for c in cases])),
        torch.from_numpy(np.stack([c[1] for c in cases])),
        torch.from_numpy(np.stack([c[2] for c in cases])).float(),
    )
    for index, case in enumerate(cases):
        np.testing.assert_allclose(batched[index].numpy(), run(*case), atol=1e-6)


def test_unknown_kernel_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown Matrix NMS kernel"):
        run(*two_identical([0.9, 0.8]), kernel="greedy")
