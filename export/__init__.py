"""ONNX export, TensorRT engine builds and weight preparation (installed as ``flashportrait.export``)."""
