"""Operators with one reference implementation that every runtime is tested against, and the sequential mask NMS
baselines Matrix NMS is measured against."""

from training.ops.mask_nms import greedy_mask_nms, soft_mask_nms
from training.ops.matrix_nms import matrix_nms

__all__ = ["greedy_mask_nms", "matrix_nms", "soft_mask_nms"]
