"""Interoperability: Keras weight import and ONNX / TorchScript export."""
