"""ONNX export of the (smoothed) model and Q/DQ graph surgery for TensorRT explicit quantization."""


class ExportError(ValueError):
    """The model or graph cannot be exported as asked; the message names the node/module and the fix."""
