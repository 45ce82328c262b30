"""Matrix NMS as one operator: the torch custom op and the ONNX function body (run alone in ONNX Runtime) both
equal the reference ``training.ops.matrix_nms``."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from training.ops import matrix_nms
from triton_plugins.matrix_nms import DEFAULT_SIGMA, INPUT_NAMES, OUTPUT_NAMES, onnx_function
from triton_plugins.matrix_nms.torch_op import matrix_nms_node


def overlapping_case(
    rng: np.random.Generator, batch: int, n: int, size: tuple[int, int] = (20, 24), num_labels: int = 3
) -> dict[str, np.ndarray]:
    """Rectangles clustered in a few places (so many pairs overlap and scores decay), a fifth exact duplicates,
    some empty masks; labels int32, scores sorted descending. Keys are the node's input names."""
    height, width = size
    masks = np.zeros((batch, n, height, width), np.float32)
    for b in range(batch):
        centres = rng.integers(0, [height, width], (4, 2))
        for k in range(n):
            if k > 0 and rng.random() < 0.2:
                masks[b, k] = masks[b, rng.integers(k)]
            elif rng.random() < 0.95:
                cy, cx = centres[rng.integers(4)] + rng.integers(-3, 4, 2)
                hy, hx = rng.integers(1, 7, 2)
                masks[b, k, max(cy - hy, 0) : cy + hy, max(cx - hx, 0) : cx + hx] = 1.0
    scores = np.sort(rng.uniform(0.05, 1.0, (batch, n)).astype(np.float32), axis=1)[:, ::-1].copy()
    return {
        "masks": masks,
        "labels": rng.integers(0, num_labels, (batch, n)).astype(np.int32),
        "scores": scores,
        "areas": masks.sum(axis=(2, 3)),
    }


def reference(case: dict[str, np.ndarray], kernel: str, sigma: float) -> np.ndarray:
    tensors = {k: torch.from_numpy(v) for k, v in case.items()}
    return matrix_nms(
        tensors["masks"], tensors["labels"], tensors["scores"], kernel=kernel, sigma=sigma, mask_area=tensors["areas"]
    ).numpy()


@pytest.mark.parametrize(("kernel", "sigma"), [("gaussian", 2.0), ("gaussian", 0.5), ("linear", 2.0)])
@pytest.mark.parametrize("n", [1, 37, 500])
def test_onnx_function_alone_in_onnxruntime_equals_the_reference(kernel: str, sigma: float, n: int) -> None:
    model = onnx_function.standalone_model(kernel=kernel, sigma=sigma)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    case = overlapping_case(np.random.default_rng(n), batch=2, n=n)
    (decayed,) = session.run(None, case)
    expected = reference(case, kernel, sigma)
    np.testing.assert_allclose(decayed, expected, rtol=0, atol=1e-5)
    if n > 1:  # the case must exercise suppression, or equality would prove little
        assert (expected < case["scores"] - 1e-3).mean() > 0.3


def test_onnx_function_default_sigma_is_two() -> None:
    model = onnx_function.standalone_model(kernel="gaussian")
    node = model.graph.node[0]
    del node.attribute[[a.name for a in node.attribute].index("sigma")]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    case = overlapping_case(np.random.default_rng(0), batch=1, n=20)
    np.testing.assert_allclose(session.run(None, case)[0], reference(case, "gaussian", 2.0), atol=1e-5)


def test_function_proto_declares_the_contract() -> None:
    function = onnx_function.function_proto()
    assert (function.domain, function.name) == ("freesolo", "MatrixNMS")
    assert tuple(function.input) == INPUT_NAMES == ("masks", "labels", "scores", "areas")
    assert tuple(function.output) == OUTPUT_NAMES
    assert list(function.attribute) == ["kernel"]
    assert [(a.name, a.f) for a in function.attribute_proto] == [("sigma", DEFAULT_SIGMA)]


def test_torch_op_and_adapter_equal_the_reference() -> None:
    case = overlapping_case(np.random.default_rng(1), batch=2, n=30)
    masks, labels, scores, areas = (torch.from_numpy(case[k]) for k in ("masks", "labels", "scores", "areas"))
    for kernel in ("gaussian", "linear"):
        expected = torch.from_numpy(reference(case, kernel, 2.0))
        assert torch.equal(torch.ops.freesolo.matrix_nms(masks, labels, scores, areas, kernel, 2.0), expected)
        # postprocess's call: int64 labels, areas by keyword
        assert torch.equal(
            matrix_nms_node(masks, labels.long(), scores, kernel=kernel, sigma=DEFAULT_SIGMA, mask_area=areas), expected
        )
    assert torch.equal(matrix_nms_node(masks, labels.long(), scores), torch.from_numpy(reference(case, "gaussian", 2)))


def test_torch_op_registration_passes_opcheck() -> None:
    case = overlapping_case(np.random.default_rng(2), batch=1, n=8)
    args = tuple(torch.from_numpy(case[k]) for k in ("masks", "labels", "scores", "areas"))
    torch.library.opcheck(torch.ops.freesolo.matrix_nms.default, (*args, "linear", 2.0))


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_onnx_function_with_no_masks_returns_no_scores(kernel: str) -> None:
    """N = 0 (nothing left after the score threshold) is an ordinary case: the body must not reshape with a -1 that
    a zero-sized dimension makes ambiguous."""
    session = ort.InferenceSession(
        onnx_function.standalone_model(kernel=kernel).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    for batch, size in ((1, (32, 32)), (2, (20, 24))):
        case = overlapping_case(np.random.default_rng(3), batch=batch, n=0, size=size)
        (decayed,) = session.run(None, case)
        assert decayed.shape == (batch, 0) and decayed.dtype == np.float32
