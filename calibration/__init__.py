"""Calibration data, activation statistics and the SmoothQuant / quantization maths (before any export)."""


class CalibrationError(ValueError):
    """Bad calibration input or model content; the message names the problem and the fix."""
