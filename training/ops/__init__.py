"""Operators with one reference implementation that every runtime is tested against."""

from training.ops.matrix_nms import matrix_nms

__all__ = ["matrix_nms"]
