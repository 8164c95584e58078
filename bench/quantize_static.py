"""The tool users would pick instead: ONNX Runtime's quantize_static (QDQ, per-channel INT8 weights, its default
UINT8 asymmetric activations, MinMax calibration) on our reference ONNX with our calibration windows, restricted
to MatMul as an engineer would configure it for an LLM: with its default operator list it also quantizes the
residual Adds, RMSNorm's Pow/Sqrt/Mul, RoPE and Softmax, and SmolLM2 collapses (perplexity 103,592 vs 29.60,
measured 2026-11-23 with this script before the restriction)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from exporters.decoder_io import DecoderShape
from pipeline import verify
from pipeline.artifacts import SavedArrays, scratch_folder

QUANTIZED = "quantize_static.onnx"
# ONNX Runtime 1.31 cannot create a session for quantize_static's MatMul-only output with its default optimizers:
# QDQ propagation through the Reshape before attention builds a QuantizeLinear whose output_dtype and zero-point
# types disagree (microsoft/onnxruntime#25526). Measured with that one optimizer off.
DISABLED_OPTIMIZERS = ("QDQPropagationTransformer",)


class WindowReader(CalibrationDataReader):
    """Each calibration window as one prefill of the decoder graph (empty past)."""

    def __init__(self, shape: DecoderShape, windows: np.ndarray):
        self.shape, self.windows, self.position = shape, windows, 0

    def get_next(self):
        if self.position == len(self.windows):
            return None
        self.position += 1
        return self.shape.prefill_feed(self.windows[self.position - 1][None, :])


def flush_every(windows: int) -> int | None:
    """CalibMaxIntermediateOutputs bounds the calibrator's memory (all intermediate tensors of every window are kept
    otherwise: 7.4 GB for 2 SmolLM2 windows). ONNX Runtime 1.31 raises 'No data is collected' when the count of
    windows is a multiple of it (the last flush leaves nothing), so pick a value that does not divide it."""
    if windows <= 4:
        return None
    return next(k for k in range(3, windows) if windows % k)


def quantize_static_model(reference: Path, windows, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    output = folder / QUANTIZED
    shape = DecoderShape.from_onnx_file(reference)
    calibration = windows["calibration"]
    flush = flush_every(len(calibration))
    start = time.perf_counter()
    quantize_static(str(reference), str(output), WindowReader(shape, calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    op_types_to_quantize=["MatMul"],
                    extra_options={} if flush is None else {"CalibMaxIntermediateOutputs": flush})
    seconds = time.perf_counter() - start
    with scratch_folder(folder / "logits") as scratch:
        accuracy = verify.compare_graphs(reference, output, windows["evaluation"], "reference vs quantize_static",
                                         SavedArrays(scratch), DISABLED_OPTIMIZERS)
    return {"path": str(output), "seconds_to_quantize": seconds, "calibration_windows": len(calibration),
            "disabled_optimizers": list(DISABLED_OPTIMIZERS),
            "accuracy": {"perplexity_reference_fp32_onnx": accuracy["perplexity_reference"],
                         "perplexity_quantized_fp32_onnx": accuracy["perplexity_candidate"],
                         "perplexity_delta_percent": accuracy["perplexity_delta_percent"],
                         "next_token_top1_agreement": accuracy["top1_agreement"]}}
