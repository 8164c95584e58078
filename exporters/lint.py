"""Checks before any TensorRT build: onnx.checker with shape inference, and TensorRT's explicit-quantization rules.

Rules (TensorRT developer guide, "Explicit quantization"; shared/docs/TENSORRT.md):
- zero-point:    Q/DQ are symmetric: an INT8 zero point, all zeros (a missing Q zero point means UINT8 unless
                 the Q says output_dtype INT8, as the KV cache's do).
- scale:         scales are constant, strictly positive and finite.
- per-tensor:    activation (non-constant) Q/DQ scales are scalars; per-channel is for constant weights only.
- axis:          a per-channel weight DQ's axis is the GEMM's output-channel axis and has dim[axis] scales.
- pairing:       every QuantizeLinear feeds only DequantizeLinear; every activation DQ is fed by a Q. The one
                 exception is the INT8 KV cache (exporters/kv_quant.py): Q -> Concat(past) -> present -> DQ.
- gemm-inputs:   a MatMul/Gemm with an INT8 weight DQ has a DQ on its activation too, or TensorRT runs it in
                 float; one with an INT4 weight DQ has none (INT4 GEMMs are weight-only, W4A16).
- int4:          INT4 only as a constant weight into DequantizeLinear (no QuantizeLinear to INT4), opset >= 21,
                 an even last dimension (two values per byte).
- block:         a blocked DQ's scale has the weight's rank and exactly one blocked dimension, the GEMM's K
                 axis, which block_size divides; the other dimension matches the weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from exporters import ExportError
from exporters.kv_quant import is_kv_cache_concat
from exporters.naming import module_of_node
from exporters.qdq import weight_axis

GEMMS = ("MatMul", "Gemm")
INT4 = np.dtype(ml_dtypes.int4)
QUANTIZED_TYPES = (np.dtype(np.int8), INT4)


@dataclass(frozen=True)
class LintIssue:
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        module = module_of_node(self.node) or "(no module)"
        return f"[{self.rule}] node {self.node} (module {module}): {self.message}"


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _check_zero_point(node: ir.Node) -> list[LintIssue]:
    zp_value = node.inputs[2] if len(node.inputs) > 2 else None
    if zp_value is None:
        output_dtype = node.attributes.get("output_dtype")
        if node.op_type == "QuantizeLinear" and (output_dtype is None or output_dtype.as_int() != ir.DataType.INT8.value):
            return [LintIssue("zero-point", node.name, "no zero point and no output_dtype INT8: output would be UINT8; "
                                                       "give an INT8 zero point of 0")]
        return []
    zp = _const(zp_value)
    if zp is None:
        return [LintIssue("zero-point", node.name, "zero point is not a constant")]
    if zp.dtype not in QUANTIZED_TYPES:
        return [LintIssue("zero-point", node.name, f"zero point is {zp.dtype}, TensorRT needs INT8 (or INT4 weights)")]
    if np.any(zp != 0):
        return [LintIssue("zero-point", node.name, "non-zero zero point: TensorRT supports symmetric quantization only")]
    return []


def _check_scale(node: ir.Node) -> tuple[np.ndarray | None, list[LintIssue]]:
    scale = _const(node.inputs[1])
    if scale is None:
        return None, [LintIssue("scale", node.name, "scale is not a constant initializer")]
    s = scale.astype(np.float32)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        return scale, [LintIssue("scale", node.name, f"scale must be positive and finite (min {s.min():.3g})")]
    return scale, []


def _check_granularity(node: ir.Node, scale: np.ndarray) -> list[LintIssue]:
    is_weight = node.op_type == "DequantizeLinear" and node.inputs[0].const_value is not None
    if not is_weight:
        if scale.size != 1:
            return [LintIssue("per-tensor", node.name,
                              f"activation scale has {scale.size} values: TensorRT runs per-tensor activations only")]
        return []
    block = node.attributes.get("block_size")
    if block is not None and block.as_int() > 0:
        return _check_blocks(node, scale, block.as_int())
    if scale.size == 1:
        return []
    axis_attr = node.attributes.get("axis")
    axis = axis_attr.as_int() if axis_attr is not None else 1
    weight_shape = tuple(node.inputs[0].const_value.shape)
    issues = []
    if scale.shape[0] != weight_shape[axis]:
        issues.append(LintIssue("axis", node.name,
                                f"{scale.shape[0]} scales for dim[{axis}]={weight_shape[axis]} of weight {weight_shape}"))
    for consumer in _weight_consumers(node):
        if axis != weight_axis(consumer):
            issues.append(LintIssue("axis", node.name, f"axis={axis} but {consumer.op_type} {consumer.name} needs "
                                    f"axis={weight_axis(consumer)} (one scale per output channel)"))
    return issues


def _weight_consumers(dq: ir.Node) -> list[ir.Node]:
    return [u.node for u in dq.outputs[0].uses() if u.node.op_type in GEMMS and u.idx == 1]


def _check_blocks(node: ir.Node, scale: np.ndarray, block: int) -> list[LintIssue]:
    weight_shape = tuple(node.inputs[0].const_value.shape)
    axis_attr = node.attributes.get("axis")
    axis = (axis_attr.as_int() if axis_attr is not None else 1) % len(weight_shape)
    if scale.ndim != len(weight_shape):
        return [LintIssue("block", node.name, f"blocked scale has rank {scale.ndim}, the weight {weight_shape} "
                          f"rank {len(weight_shape)}")]
    expected = tuple(d // block if i == axis else d for i, d in enumerate(weight_shape))
    issues = []
    if weight_shape[axis] % block or scale.shape != expected:
        issues.append(LintIssue("block", node.name, f"scale {scale.shape} for weight {weight_shape} with "
                                f"block_size={block} on axis {axis}: expected {expected} with block_size dividing "
                                f"{weight_shape[axis]}"))
    for consumer in _weight_consumers(node):
        if axis != 1 - weight_axis(consumer):
            issues.append(LintIssue("block", node.name, f"blocks run along axis {axis}, but {consumer.op_type} "
                                    f"{consumer.name} reduces over axis {1 - weight_axis(consumer)}: block along K"))
    return issues


def _check_int4(node: ir.Node, opset: int) -> list[LintIssue]:
    source = node.inputs[0]
    quantized = node.outputs[0] if node.op_type == "QuantizeLinear" else source
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    dtypes = {quantized.dtype, zp.dtype if zp is not None else None}
    if ir.DataType.INT4 not in dtypes:
        return []
    if node.op_type == "QuantizeLinear" or source.const_value is None:
        return [LintIssue("int4", node.name, "INT4 on an activation: TensorRT runs INT4 weight-only; keep "
                          "activations float (W4A16) or use INT8")]
    issues = []
    if opset < 21:
        issues.append(LintIssue("int4", node.name, f"INT4 DequantizeLinear needs opset >= 21 (model has {opset})"))
    if source.const_value.shape[-1] % 2:
        issues.append(LintIssue("int4", node.name, f"INT4 weight {tuple(source.const_value.shape)} has an odd last "
                                "dimension: TensorRT packs two values per byte"))
    return issues


def _check_pairing(node: ir.Node) -> list[LintIssue]:
    if node.op_type == "QuantizeLinear":
        bad = [u.node for u in node.outputs[0].uses()
               if u.node.op_type != "DequantizeLinear" and not is_kv_cache_concat(u.node)]
        return [LintIssue("pairing", node.name, f"QuantizeLinear feeds {c.op_type} {c.name}, not a DequantizeLinear")
                for c in bad]
    source = node.inputs[0]
    producer = source.producer()
    if producer is not None and is_kv_cache_concat(producer):
        return []
    if source.const_value is None and (producer is None or producer.op_type != "QuantizeLinear"):
        return [LintIssue("pairing", node.name, "DequantizeLinear of an activation must be fed by a QuantizeLinear")]
    return []


def _check_gemm_inputs(node: ir.Node) -> list[LintIssue]:
    dqs = [v.producer() if v is not None and v.producer() is not None
           and v.producer().op_type == "DequantizeLinear" else None for v in node.inputs[:2]]
    if dqs[1] is not None and dqs[1].inputs[0].dtype == ir.DataType.INT4:
        if dqs[0] is not None:
            return [LintIssue("gemm-inputs", node.name, f"{node.op_type} with INT4 weights has a quantized activation: "
                              "TensorRT INT4 GEMMs are weight-only (W4A16); remove the activation Q/DQ")]
        return []
    if any(dqs) and not all(dqs):
        missing = "activation (input 0)" if dqs[0] is None else "weight (input 1)"
        return [LintIssue("gemm-inputs", node.name, f"quantized {node.op_type} has no DequantizeLinear on its {missing}")]
    return []


def lint_qdq(model: ir.Model) -> list[LintIssue]:
    issues: list[LintIssue] = []
    opset = model.opset_imports.get("", 0)
    for node in model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            issues += _check_int4(node, opset)
            issues += _check_zero_point(node)
            scale, scale_issues = _check_scale(node)
            issues += scale_issues
            if scale is not None:
                issues += _check_granularity(node, scale)
            issues += _check_pairing(node)
        elif node.op_type in GEMMS:
            issues += _check_gemm_inputs(node)
    return issues


def check_onnx_file(path: Path) -> None:
    """onnx.checker with full shape inference, on the path so models with external data are covered."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{path.name} fails onnx.checker: {str(e).splitlines()[0]}") from None


def lint_or_raise(model: ir.Model, label: str) -> None:
    issues = lint_qdq(model)
    if issues:
        listing = "; ".join(str(i) for i in issues[:5])
        more = f" (and {len(issues) - 5} more)" if len(issues) > 5 else ""
        raise ExportError(f"{label} breaks TensorRT Q/DQ rules: {listing}{more}")
