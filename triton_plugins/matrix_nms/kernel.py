"""Matrix NMS as OpenAI Triton kernels: the GPU form of ``training.ops.matrix_nms`` for the node contract.

Three kernels, the same split as the CUDA plugin (``cuda/matrix_nms_kernel.cu``):

1. ``_decay_iou_kernel``: intersections ``I = X @ X^T`` by tiles with ``tl.dot`` (X = masks flattened to [N, P]),
   IoU from the given areas, kept for same-label pairs i < j only (the "decay IoU" matrix, zero elsewhere).
   Tiles that lie wholly below the diagonal are skipped.
2. ``_compensation_kernel``: compensation_i = max over k < i of decay IoU[k, i].
3. ``_decay_kernel``: decay_j = min over same-label i < j of the kernel ratio, times score_j.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before this module is imported: triton
reads it when the kernels are defined), which is how it is tested on machines without a GPU; ``compile_for_gpu``
checks that the kernels also lower to a GPU binary there.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from training.ops.matrix_nms import DEFAULT_KERNEL, DEFAULT_SIGMA

EPS = 1e-6  # training.ops.matrix_nms.EPS
KERNELS = ("gaussian", "linear")

# Tile sizes (constexpr in the kernels). tl.dot needs every side >= 16.
BLOCK_M = 64  # rows (higher-scored masks i) per intersection tile
BLOCK_N = 64  # columns (lower-scored masks j) per intersection tile
BLOCK_K = 64  # pixels per tl.dot step (masks are long: P = H/4 * W/4 is often > 10^4)
BLOCK_MASKS = 64  # masks per program in the compensation / decay kernels
BLOCK_ROWS = 64  # rows read per step in the compensation / decay kernels
NUM_WARPS = 4
# Two pipeline stages keep the intersection kernel at 64 KB of shared memory (three would take 96 KB, more than
# the ~99 KB sm_86 / sm_89 parts leave once Triton adds its own).
NUM_STAGES = 2


@triton.jit
def _decay_iou_kernel(
    masks_ptr,
    labels_ptr,
    areas_ptr,
    decay_iou_ptr,
    n,
    pixels,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of the decay-IoU matrix of one image (program ids: column tile, row tile, image)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    # A tile holds a pair i < j only if its first row is above its last column; others stay zero.
    if pid_m * BLOCK_M < (pid_n + 1) * BLOCK_N - 1:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        col_ok = cols < n
        image = masks_ptr + b * n * pixels
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = image + rows.to(tl.int64)[:, None] * pixels + ks[None, :]  # [BLOCK_M, BLOCK_K] row masks
        bt_ptrs = image + cols.to(tl.int64)[None, :] * pixels + ks[:, None]  # [BLOCK_K, BLOCK_N] column masks
        intersection = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, pixels, BLOCK_K):
            k_ok = ks < pixels - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            bt = tl.load(bt_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            # Masks are 0/1, so TF32 inputs are exact and the fp32 accumulator counts pixels exactly (< 2^24).
            intersection = tl.dot(a, bt, intersection, input_precision="tf32")
            a_ptrs += BLOCK_K
            bt_ptrs += BLOCK_K
        area_i = tl.load(areas_ptr + b * n + rows, mask=row_ok, other=0.0)
        area_j = tl.load(areas_ptr + b * n + cols, mask=col_ok, other=0.0)
        label_i = tl.load(labels_ptr + b * n + rows, mask=row_ok, other=-1)
        label_j = tl.load(labels_ptr + b * n + cols, mask=col_ok, other=-2)
        union = area_i[:, None] + area_j[None, :] - intersection
        iou = tl.where(union > 0, intersection / tl.maximum(union, eps), 0.0)
        keep = (rows[:, None] < cols[None, :]) & (label_i[:, None] == label_j[None, :])
        in_bounds = row_ok[:, None] & col_ok[None, :]
        out = decay_iou_ptr + b * n * n + rows.to(tl.int64)[:, None] * n + cols[None, :]
        tl.store(out, tl.where(keep, iou, 0.0), mask=in_bounds)


@triton.jit
def _compensation_kernel(decay_iou_ptr, compensation_ptr, n, BLOCK_MASKS: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """compensation_i for BLOCK_MASKS masks of one image: the max of column i above the diagonal."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = pid * BLOCK_MASKS + tl.arange(0, BLOCK_MASKS)
    col_ok = cols < n
    matrix = decay_iou_ptr + b * n * n
    compensation = tl.zeros((BLOCK_MASKS,), dtype=tl.float32)
    row_end = tl.minimum(n, (pid + 1) * BLOCK_MASKS)  # rows at or below every column of the block add nothing
    for k0 in range(0, row_end, BLOCK_ROWS):
        k = k0 + tl.arange(0, BLOCK_ROWS)
        valid = (k[:, None] < cols[None, :]) & col_ok[None, :]
        values = tl.load(matrix + k.to(tl.int64)[:, None] * n + cols[None, :], mask=valid, other=0.0)
        compensation = tl.maximum(compensation, tl.max(values, axis=0))
    tl.store(compensation_ptr + b * n + cols, compensation, mask=col_ok)


@triton.jit
def _decay_kernel(
    decay_iou_ptr,
    compensation_ptr,
    labels_ptr,
    scores_ptr,
    out_ptr,
    n,
    sigma,
    eps,
    LINEAR: tl.constexpr,
    BLOCK_MASKS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """Decayed scores of BLOCK_MASKS masks of one image."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = pid * BLOCK_MASKS + tl.arange(0, BLOCK_MASKS)
    col_ok = cols < n
    matrix = decay_iou_ptr + b * n * n
    label_j = tl.load(labels_ptr + b * n + cols, mask=col_ok, other=-1)
    decay = tl.full((BLOCK_MASKS,), 1.0, dtype=tl.float32)
    row_end = tl.minimum(n, (pid + 1) * BLOCK_MASKS)
    for i0 in range(0, row_end, BLOCK_ROWS):
        i = i0 + tl.arange(0, BLOCK_ROWS)
        row_ok = i < n
        valid = (i[:, None] < cols[None, :]) & col_ok[None, :]
        iou = tl.load(matrix + i.to(tl.int64)[:, None] * n + cols[None, :], mask=valid, other=0.0)
        compensation = tl.load(compensation_ptr + b * n + i, mask=row_ok, other=0.0)[:, None]
        label_i = tl.load(labels_ptr + b * n + i, mask=row_ok, other=-1)
        if LINEAR:
            ratio = (1.0 - iou) / tl.maximum(1.0 - compensation, eps)
        else:
            ratio = tl.exp(-sigma * (iou * iou - compensation * compensation))
        # Other labels and i >= j give ratios >= 1 in the reference and row 0 gives <= 1: starting at 1 and
        # taking the minimum over same-label i < j is the reference's column minimum.
        ratio = tl.where(valid & (label_i[:, None] == label_j[None, :]), ratio, 1.0)
        decay = tl.minimum(decay, tl.min(ratio, axis=0))
    scores = tl.load(scores_ptr + b * n + cols, mask=col_ok, other=0.0)
    tl.store(out_ptr + b * n + cols, scores * decay, mask=col_ok)


_CONSTEXPRS = {
    "decay_iou": {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K},
    "compensation": {"BLOCK_MASKS": BLOCK_MASKS, "BLOCK_ROWS": BLOCK_ROWS},
    "decay": {"BLOCK_MASKS": BLOCK_MASKS, "BLOCK_ROWS": BLOCK_ROWS},
}
_LAUNCH = {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}
# Argument types of the kernels' runtime arguments, as matrix_nms_triton passes them (for compile_for_gpu).
_ARG_TYPES = {
    "masks_ptr": "*fp32",
    "labels_ptr": "*i32",
    "areas_ptr": "*fp32",
    "scores_ptr": "*fp32",
    "decay_iou_ptr": "*fp32",
    "compensation_ptr": "*fp32",
    "out_ptr": "*fp32",
    "n": "i32",
    "pixels": "i32",
    "sigma": "fp32",
    "eps": "fp32",
}


def _interpreting() -> bool:
    """True when triton runs kernels on the CPU (TRITON_INTERPRET=1, read by triton when kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def matrix_nms_triton(
    masks: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    areas: torch.Tensor,
    kernel: str = DEFAULT_KERNEL,
    sigma: float = DEFAULT_SIGMA,
) -> torch.Tensor:
    """Decayed scores [B, N] for the MatrixNMS node contract, equal to
    ``training.ops.matrix_nms(masks, labels, scores, kernel=kernel, sigma=sigma, mask_area=areas)``.

    Args:
        masks: [B, N, H, W] 0/1 masks (float32 or anything that converts to it), each image's masks sorted by
            score, descending.
        labels: [B, N] integer labels (int32 in the contract).
        scores: [B, N] float scores, sorted descending.
        areas: [B, N] pixel count of each mask.
        kernel: "gaussian" or "linear".
        sigma: gaussian strength (multiplies IoU^2).
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown Matrix NMS kernel '{kernel}' (use one of {KERNELS})")
    if masks.dim() != 4:
        raise ValueError(f"masks must be [B, N, H, W], got shape {tuple(masks.shape)}")
    batch, n, height, width = masks.shape
    for name, tensor in (("labels", labels), ("scores", scores), ("areas", areas)):
        if tuple(tensor.shape) != (batch, n):
            raise ValueError(f"{name} must be [B, N] = {(batch, n)}, got {tuple(tensor.shape)}")
        if tensor.device != masks.device:
            raise ValueError(f"{name} is on {tensor.device}, masks on {masks.device}")
    if masks.device.type != "cuda" and not _interpreting():
        raise RuntimeError("matrix_nms_triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    device = masks.device
    out = torch.empty((batch, n), dtype=torch.float32, device=device)
    if batch == 0 or n == 0:
        return out
    pixels = height * width
    flat = masks.reshape(batch, n, pixels).to(torch.float32).contiguous()
    labels32 = labels.to(torch.int32).contiguous()
    scores32 = scores.to(torch.float32).contiguous()
    areas32 = areas.to(torch.float32).contiguous()
    decay_iou = torch.zeros((batch, n, n), dtype=torch.float32, device=device)
    compensation = torch.empty((batch, n), dtype=torch.float32, device=device)

    tiles_n, tiles_m = triton.cdiv(n, BLOCK_N), triton.cdiv(n, BLOCK_M)
    _decay_iou_kernel[(tiles_n, tiles_m, batch)](
        flat, labels32, areas32, decay_iou, n, pixels, EPS, **_CONSTEXPRS["decay_iou"], **_LAUNCH
    )
    mask_grid = (triton.cdiv(n, BLOCK_MASKS), batch)
    _compensation_kernel[mask_grid](decay_iou, compensation, n, **_CONSTEXPRS["compensation"], **_LAUNCH)
    _decay_kernel[mask_grid](
        decay_iou,
        compensation,
        labels32,
        scores32,
        out,
        n,
        float(sigma),
        EPS,
        LINEAR=kernel == "linear",
        **_CONSTEXPRS["decay"],
        **_LAUNCH,
    )
    return out


def compile_for_gpu(capability: int = 90) -> dict[str, Any]:
    """Compiles every kernel variant to PTX and cubin for NVIDIA compute capability ``capability`` (90 = Hopper)
    without a GPU: a build check for machines that have none (the interpreter never lowers to the GPU).
    Returns triton's compiled kernels by name (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata.shared``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability, 32)
    options = {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}
    variants = {
        "decay_iou": (_decay_iou_kernel, _CONSTEXPRS["decay_iou"]),
        "compensation": (_compensation_kernel, _CONSTEXPRS["compensation"]),
        "decay_gaussian": (_decay_kernel, {**_CONSTEXPRS["decay"], "LINEAR": False}),
        "decay_linear": (_decay_kernel, {**_CONSTEXPRS["decay"], "LINEAR": True}),
    }
    compiled = {}
    for name, (fn, constexprs) in variants.items():
        signature = {arg: _ARG_TYPES.get(arg, "constexpr") for arg in fn.arg_names}
        compiled[name] = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=target, options=options)
    return compiled
