"""Q/DQ insertion by graph surgery (onnx-ir): the placement TensorRT fuses into quantized GEMMs.

W8A8: an INT8 weight initializer -> DequantizeLinear (per output channel) on the weight input, and QuantizeLinear
-> DequantizeLinear (per tensor) on the activation input, one pair per GEMM. Linears reading the same activation
(q/k/v, gate/up) get identical pairs with one shared scale. That is the layout quantization-aware-training exports
give TensorRT, and the one ONNX Runtime fuses into integer GEMMs (MatMulIntegerToFloat): with one Q shared by
q/k/v, its fusions skipped them (whether the DQ was shared or not), and SmolLM2's q/k/v and gate/up ran as float
MatMuls on weights dequantized at every call (a decode step 4.6x slower than FP32). GEMM outputs are not
quantized (TensorRT guide: extra Q/DQ outside the GEMM inputs break fusions).

Weight-only (W4A16, W3A16): an INT4 initializer -> blocked DequantizeLinear (opset 21 `block_size`, blocks along K)
on the weight input; the activation stays float, with no Q node (TensorRT INT4 is weight-only). 3-bit codes are
stored in INT4 containers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
import onnx_ir as ir

from exporters import ExportError
from exporters.naming import matmul_node_name, module_of_node, scope_of

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LinearQuantization:
    module: str
    weight: np.ndarray  # integer codes [out_features, in_features] in an int8 array, PyTorch layout
    weight_scale: np.ndarray  # float32 [out_features] (per channel) or [out_features, groups] (blocked along K)
    input_scale: float | None  # None: weight-only, the activation stays float
    bits: int = 8

    @property
    def storage_dtype(self):
        return np.int8 if self.bits == 8 else ml_dtypes.int4

    @property
    def block_size(self) -> int | None:
        if self.weight_scale.ndim == 1:
            return None
        return self.weight.shape[1] // self.weight_scale.shape[1]


def grouped_linear(module: str, codes: np.ndarray, scales: np.ndarray, group_size: int, input_scale: float | None,
                   bits: int) -> LinearQuantization:
    """From GPTQ-layout scales [N, ceil(K / group_size)] to what DequantizeLinear expresses.

    One group spanning K: per-channel scales [N]. Otherwise blocks of gcd(K, group_size) columns, each carrying
    its group's scale: ONNX and TensorRT need equal blocks that divide K, while a GPTQ group may be cut short at
    the end of K (SmolLM2: K = 576 with groups of 128 -> blocks of 64, scales repeated in pairs)."""
    in_features = codes.shape[1]
    if group_size >= in_features:
        return LinearQuantization(module, codes, scales[:, 0], input_scale, bits)
    block = math.gcd(in_features, group_size)
    block_group = (np.arange(in_features // block) * block) // group_size
    return LinearQuantization(module, codes, np.ascontiguousarray(scales[:, block_group]), input_scale, bits)


def weight_axis(node: ir.Node) -> int:
    """Per-channel axis of a GEMM's weight (input 1): one scale per output column.

    MatMul(X, W) with W [K, N] -> axis 1; Gemm with transB=1 (W [N, K]) -> axis 0 (TensorRT Q/DQ rules).
    """
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        return 0 if trans_b is not None and trans_b.as_int() == 1 else 1
    return 1


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.tensor(array).dtype
    graph.register_initializer(value)
    return value


def _stored_layout(node: ir.Node, array: np.ndarray) -> np.ndarray:
    """A [out, ...] array in the layout of the node's weight input: as is for Gemm transB=1, transposed for MatMul."""
    return array if weight_axis(node) == 0 else np.ascontiguousarray(array.T)


def dq_attributes(node: ir.Node, lq: LinearQuantization) -> dict:
    """Per channel: axis = output-channel axis. Blocked: axis = the K axis (the other one), block_size = group."""
    if lq.block_size is None:
        return {"axis": weight_axis(node)}
    return {"axis": 1 - weight_axis(node), "block_size": lq.block_size}


def insert_qdq(model: ir.Model, linears: list[LinearQuantization], scale_dtype: type) -> None:
    """Rewrite `model` in place. scale_dtype: np.float32 for the ORT graph, np.float16 for TensorRT's FP16 graph
    (strongly typed: DequantizeLinear's output dtype is its scale's dtype)."""
    graph = model.graph
    nodes = {node.name: node for node in graph}
    for lq in linears:
        node = nodes.get(matmul_node_name(lq.module))
        if node is None or node.op_type not in ("MatMul", "Gemm"):
            raise ExportError(f"module {lq.module}: no MatMul/Gemm node '{matmul_node_name(lq.module)}' in the graph")
        _quantize_weight(graph, node, lq, scale_dtype)
        if lq.input_scale is not None:
            _quantize_activation(graph, node, lq, linears, scale_dtype)
    _drop_unused_initializers(graph)


def _drop_unused_initializers(graph: ir.Graph) -> None:
    for name in [n for n, v in graph.initializers.items() if not v.uses() and v not in graph.outputs]:
        graph.initializers.pop(name)


def float_activations(model: ir.Model, modules: list[str]) -> None:
    """Remove the activation Q/DQ pair in front of each module's GEMM, in place; its weight stays INT8.
    What keeping those activations float buys, measured on the exported graph without re-exporting it."""
    graph = model.graph
    nodes = {node.name: node for node in graph}
    for module in modules:
        q, dq = (nodes.get(f"{scope_of(module)}/{op}_input") for op in ("QuantizeLinear", "DequantizeLinear"))
        if q is None or dq is None:
            raise ExportError(f"module {module}: no activation Q/DQ in front of {matmul_node_name(module)}")
        nodes[matmul_node_name(module)].replace_input_with(0, q.inputs[0])
        graph.remove([dq, q], safe=True)
    _drop_unused_initializers(graph)


def _quantize_weight(graph: ir.Graph, node: ir.Node, lq: LinearQuantization, scale_dtype: type) -> None:
    old = node.inputs[1]
    stored = _stored_layout(node, lq.weight)
    if old is None or old.const_value is None or tuple(old.const_value.shape) != stored.shape:
        found = None if old is None or old.const_value is None else tuple(old.const_value.shape)
        raise ExportError(f"module {lq.module}: weight input of {node.name} is {found}, expected constant {stored.shape}")
    scope = scope_of(lq.module)
    scales = _stored_layout(node, lq.weight_scale) if lq.weight_scale.ndim == 2 else lq.weight_scale
    q_weight = add_initializer(graph, f"{lq.module}.weight_quantized", stored.astype(lq.storage_dtype))
    scale = add_initializer(graph, f"{lq.module}.weight_scale", scales.astype(scale_dtype))
    zero = add_initializer(graph, f"{lq.module}.weight_zero_point", np.zeros(scales.shape, lq.storage_dtype))
    dq = ir.node("DequantizeLinear", [q_weight, scale, zero], dq_attributes(node, lq),
                 name=f"{scope}/DequantizeLinear_weight")
    dq.outputs[0].name = f"{lq.module}.weight_dequantized"
    graph.insert_before(node, dq)
    node.replace_input_with(1, dq.outputs[0])


def _quantize_activation(graph: ir.Graph, node: ir.Node, lq: LinearQuantization, linears: list[LinearQuantization],
                         scale_dtype: type) -> None:
    activation = node.inputs[0]
    # GEMMs reading one activation quantize it with one scale: the widest of theirs, so none of them clips more.
    sharing = {u.node.name for u in activation.uses()}
    scale_value = max(x.input_scale for x in linears if matmul_node_name(x.module) in sharing)
    insert_qdq_pair(graph, node, 0, scale_value, scale_dtype, f"{lq.module}.input", scope_of(lq.module), "_input")


def insert_qdq_pair(graph: ir.Graph, node: ir.Node, index: int, scale_value: float, scale_dtype: type,
                    tensor_name: str, node_scope: str, node_suffix: str) -> None:
    """QuantizeLinear -> DequantizeLinear (INT8, per-tensor scale, zero point 0) in front of input `index` of
    `node`. Initializers and values are named tensor_name + _scale/_zero_point/_quantized/_dequantized, the nodes
    node_scope/QuantizeLinear + node_suffix and node_scope/DequantizeLinear + node_suffix."""
    scale = add_initializer(graph, f"{tensor_name}_scale", np.array(scale_value, dtype=scale_dtype))
    zero = add_initializer(graph, f"{tensor_name}_zero_point", np.array(0, dtype=np.int8))
    q = ir.node("QuantizeLinear", [node.inputs[index], scale, zero], name=f"{node_scope}/QuantizeLinear{node_suffix}")
    q.outputs[0].name = f"{tensor_name}_quantized"
    dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], name=f"{node_scope}/DequantizeLinear{node_suffix}")
    dq.outputs[0].name = f"{tensor_name}_dequantized"
    graph.insert_before(node, [q, dq])
    node.replace_input_with(index, dq.outputs[0])


def store_float_weights_fp16(model: ir.Model) -> int:
    """Store every FP32 weight matrix the graph keeps float (the embedding and a tied or float lm_head, skipped
    linears) as FP16 behind a Cast to FP32, in place; returns the bytes saved. Computation stays FP32: ONNX Runtime
    folds the Cast at session creation. On SmolLM2 the tied embedding is half of the W8A8 graph's bytes.
    The values must already be FP16-exact (round_kept_float_weights on the model exported), so nothing changes."""
    graph = model.graph
    saved = 0
    for name, value in list(graph.initializers.items()):
        array = value.const_value.numpy() if value.const_value is not None else None
        if array is None or array.dtype != np.float32 or array.ndim < 2 or \
                any(u.node.op_type in ("QuantizeLinear", "DequantizeLinear") for u in value.uses()):
            continue
        half = array.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), array):
            raise ExportError(f"float weight {name} is not FP16-exact: round the model's kept-float weights first "
                              "(exporters.qdq.round_kept_float_weights)")
        stored = add_initializer(graph, f"{name}_fp16", half)
        cast = ir.node("Cast", [stored], {"to": ir.DataType.FLOAT.value}, name=f"/{name}/Cast_fp16_storage")
        cast.outputs[0].name = f"{name}_fp32"
        graph.insert_before(next(iter(graph)), cast)
        for use in list(value.uses()):
            use.node.replace_input_with(use.idx, cast.outputs[0])
        graph.initializers.pop(name)
        saved += array.nbytes - half.nbytes
    return saved


def round_kept_float_weights(model: torch.nn.Module, quantized: set[str]) -> None:
    """Round in place every weight matrix outside the quantized linears to FP16 precision: the values the Q/DQ
    graph stores (store_float_weights_fp16), so a simulation of the model computes what the graph computes."""
    import torch  # the one PyTorch step of this graph module, whose other users (bisect, verify) never load torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and name.rpartition(".")[0] not in quantized:
                for rows in param.split(4096):  # in place, a few MB at a time: SmolLM2's embedding is 113 MB
                    rows.copy_(rows.half())


def module_node_map(model: ir.Model) -> dict[str, list[str]]:
    """PyTorch module name -> its ONNX node names, plus the Q/DQ nodes feeding its GEMM inputs."""
    mapping: dict[str, list[str]] = defaultdict(list)
    for node in model.graph:
        module = module_of_node(node.name)
        if module:
            mapping[module].append(node.name)
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        module = module_of_node(node.name)
        for value in node.inputs:
            dq = value.producer() if value is not None else None
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            feeders = [dq] + [p for p in [dq.inputs[0].producer()] if p is not None and p.op_type == "QuantizeLinear"]
            for feeder in feeders:
                if feeder.name not in mapping[module]:
                    mapping[module].append(feeder.name)
    return {k: v for k, v in sorted(mapping.items())}
