"""Custom operators of the deployable graph: Matrix NMS as OpenAI Triton kernels, CUDA kernels in a TensorRT plugin,
and the ``freesolo::MatrixNMS`` ONNX node with its function body. "Triton" is OpenAI Triton (the kernel language),
not Triton Inference Server, which ``serving`` runs (README.md of this folder)."""
