"""Inference on exported ONNX models: tiling, model cards and the segmentation engine."""
