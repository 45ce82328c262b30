"""The deployable graph: ONNX export with Matrix NMS inside, TensorRT engine build, parity checks (planned)."""
