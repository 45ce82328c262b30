"""FreeSOLO-Deploy training package: data, SOLOv2, Matrix NMS, losses, training loop, evaluation."""
