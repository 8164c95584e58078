"""Optional INT8 attention batched matmuls (the SmoothQuant paper's O3 setting): Q/DQ with per-tensor static
scales on both inputs of Q K^T and of P V.

    query (after RoPE) -> Q/DQ -\\                                  probabilities -> Q/DQ -\\
                                 MatMul -> scale, mask, Softmax ->                          MatMul -> o_proj
    key^T (from cache) -> Q/DQ -/                                  value (from cache) -> Q/DQ -/

TensorRT runs a MatMul with DequantizeLinear on both inputs in INT8 (its explicit-quantization rules, as for the
linears), and fuses this pattern into its INT8 attention kernels. The attention matmuls are found by structure,
not by name: a MatMul both of whose inputs depend on the graph inputs (a linear's or the vocab projection's weight
is constant, or derived from constants only, like the Transpose of a tied embedding).
Scales are absmax / 127 of each operand observed on calibration windows in the Q/DQ graph itself, as for the INT8
KV cache (kv_quant.py): smoothing and the quantized projections shift the ranges the float model would show.
"""

from __future__ import annotations

import onnx_ir as ir

from exporters.probes import with_outputs
from exporters.qdq import insert_qdq_pair

QMAX = 127


def _dynamic_values(graph: ir.Graph) -> set[str]:
    """Names of the values that depend on a graph input (nodes are in topological order)."""
    dynamic = {v.name for v in graph.inputs}
    for node in graph:
        if any(v is not None and v.name in dynamic for v in node.inputs):
            dynamic.update(o.name for o in node.outputs)
    return dynamic


def attention_operands(model: ir.Model) -> list[tuple[ir.Node, int]]:
    """(MatMul, input index) of both inputs of every activation-by-activation MatMul, in graph order."""
    dynamic = _dynamic_values(model.graph)
    return [(node, i) for node in model.graph if node.op_type == "MatMul"
            and all(v is not None and v.name in dynamic for v in node.inputs[:2]) for i in (0, 1)]


def probe_graph(model: ir.Model) -> tuple[ir.Model, list[str]]:
    """A copy of the graph that also outputs every attention operand, and their names, to observe their ranges."""
    names = list(dict.fromkeys(node.inputs[i].name for node, i in attention_operands(model)))
    return with_outputs(ir.from_proto(ir.to_proto(model)), names), names


def quantize_attention(model: ir.Model, absmax: dict[str, float], scale_dtype: type) -> int:
    """Insert a Q/DQ pair in front of each attention MatMul input, in place; returns how many pairs."""
    graph = model.graph
    operands = attention_operands(model)
    for node, index in operands:
        value = node.inputs[index]
        scale = absmax[value.name] / QMAX if absmax[value.name] > 0 else 1.0
        insert_qdq_pair(graph, node, index, scale, scale_dtype, f"{node.name}/input{index}", node.name,
                        f"_input{index}")
    return len(operands)
