"""SOLOv2: ResNet + FPN backbone, instance (kernel/category) head, unified mask-feature branch."""

from training.models.solov2 import SOLOv2, SOLOv2Output

__all__ = ["SOLOv2", "SOLOv2Output"]
