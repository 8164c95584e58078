"""Optional INT8 KV cache: past and present hold INT8 codes, attention reads them through DequantizeLinear.

Per layer and per key/value, one symmetric per-tensor scale (absmax / 127 of that tensor on calibration windows,
as for activations; the cache has no per-channel axis TensorRT could use on a non-constant tensor):

    new K (after RoPE) or V -> QuantizeLinear -> Concat(past INT8, new INT8) -> present INT8 (graph output)
                                                                             -> DequantizeLinear -> attention

The cache is 1 byte per value (half of FP16). The Concat moves codes only, so a decode step re-quantizes nothing.
These Q/DQ carry no zero point (Q says output_dtype INT8; symmetric, TensorRT accepts an omitted zero point):
with an explicit INT8 zero point, ONNX Runtime 1.31's QDQ propagation pushes the DQ through the Unsqueeze of
repeat_kv and builds a Q whose output_dtype and zero-point types disagree, failing session creation
(microsoft/onnxruntime#25526).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from exporters import ExportError
from exporters.decoder_io import DecoderShape, observe_absmax
from exporters.naming import SCOPE
from exporters.qdq import add_initializer

QMAX = 127


def kv_scales(absmax: dict[str, float]) -> dict[str, float]:
    """present name -> scale; an all-zero tensor (a dead head) gets scale 1 so codes stay 0 and the scale finite."""
    return {name: (value / QMAX if value > 0 else 1.0) for name, value in absmax.items()}


def kv_concat(graph: ir.Graph, present: ir.Value) -> ir.Node:
    """The Concat(past, new) that produces a present output (the exporter's cache update, decoder_io contract)."""
    concat = present.producer()
    past = {v.name: v for v in graph.inputs}.get(present.name.replace("present.", "past_key_values.", 1))
    if concat is None or concat.op_type != "Concat" or past is None or concat.inputs[0] is not past:
        raise ExportError(f"{present.name} is not Concat(past, new) of the decoder graph; INT8 KV cache needs the "
                          "graph smoothtrt exports")
    return concat


def quantize_kv_cache(model: ir.Model, scales: dict[str, float], scale_dtype: type) -> None:
    """Rewrite `model` in place: past/present become INT8 and attention reads them dequantized."""
    graph = model.graph
    for present in [v for v in graph.outputs if v.name.startswith("present.")]:
        concat = kv_concat(graph, present)
        past, new = concat.inputs[0], concat.inputs[1]
        attention_uses = list(present.uses())
        label = f"/{SCOPE}/kv_cache/{present.name}"
        scale = add_initializer(graph, f"{present.name}.scale", np.array(scales[present.name], dtype=scale_dtype))
        q = ir.node("QuantizeLinear", [new, scale], {"output_dtype": ir.DataType.INT8.value}, name=f"{label}/QuantizeLinear")
        q.outputs[0].name = f"{present.name}.new_quantized"
        graph.insert_before(concat, q)
        concat.replace_input_with(1, q.outputs[0])
        dq = ir.node("DequantizeLinear", [present, scale], name=f"{label}/DequantizeLinear")
        dq.outputs[0].name = f"{present.name}.dequantized"
        graph.insert_after(concat, dq)
        for use in attention_uses:
            use.node.replace_input_with(use.idx, dq.outputs[0])
        past.dtype = present.dtype = ir.DataType.INT8


def is_kv_cache_concat(node: ir.Node) -> bool:
    """A Concat writing an INT8 present output: the one place a Q may feed something else than a DQ."""
    return (node.op_type == "Concat" and any(v.name.startswith("present.") for v in node.outputs)
            and node.outputs[0].dtype == ir.DataType.INT8)


def observe_kv_absmax(session, windows: np.ndarray) -> dict[str, float]:
    """Absmax of every present output of an ONNX Runtime decoder session over calibration windows (prefill, no
    past). Observed on the Q/DQ graph itself: SmoothQuant folds o_proj's factors into V's rows, and quantized
    q/k/v projections shift K and V, so the float model's cache has other ranges."""
    return observe_absmax(session, DecoderShape.from_session(session).present_names, windows)
