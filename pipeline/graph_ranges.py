"""Static ranges observed on the exported FP32 Q/DQ graph itself, for the quantization added after the linears'
(INT8 KV cache, INT8 attention matmuls): smoothing and the quantized projections shift the tensors they act on, so
the float PyTorch model would show other ranges."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from exporters.attention_qdq import probe_graph
from exporters.decoder_io import observe_absmax
from exporters.kv_quant import kv_scales, observe_kv_absmax


def _session(graph: ir.Model):
    import onnxruntime as ort

    return ort.InferenceSession(ir.to_proto(graph).SerializeToString(), providers=["CPUExecutionProvider"])


def kv_cache_scales(graph: ir.Model, windows: np.ndarray) -> dict[str, float]:
    """present name -> per-tensor INT8 scale of the KV cache."""
    return kv_scales(observe_kv_absmax(_session(graph), windows))


def attention_ranges(graph: ir.Model, windows: np.ndarray) -> dict[str, float]:
    """Attention matmul operand name -> absmax."""
    probe, names = probe_graph(graph)
    return observe_absmax(_session(probe), names, windows)
