"""The Matrix NMS plugin: GPU kernel, ONNX node/function, TensorRT registration (planned)."""
