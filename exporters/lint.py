"""Checks before any TensorRT build: onnx.checker with shape inference, and TensorRT's explicit-quantization rules.

Rules (TensorRT developer guide, "Explicit quantization"; shared/docs/TENSORRT.md):
- zero-point:    Q/DQ are symmetric: an INT8 zero point, all zeros (a missing Q zero point means UINT8).
- scale:         scales are constant, strictly positive and finite.
- per-tensor:    activation (non-constant) Q/DQ scales are scalars; per-channel is for constant weights only.
- axis:          a per-channel weight DQ's axis is the GEMM's output-channel axis and has dim[axis] scales.
- pairing:       every QuantizeLinear feeds only DequantizeLinear; every activation DQ is fed by a Q.
- gemm-inputs:   a MatMul/Gemm with a DQ on one input has a DQ on both, or TensorRT runs it in float.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from exporters import ExportError
from exporters.naming import module_of_node
from exporters.qdq import weight_axis

GEMMS = ("MatMul", "Gemm")


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
        if node.op_type == "QuantizeLinear":
            return [LintIssue("zero-point", node.name, "no zero point: output would be UINT8; give an INT8 zero point of 0")]
        return []
    zp = _const(zp_value)
    if zp is None:
        return [LintIssue("zero-point", node.name, "zero point is not a constant")]
    if zp.dtype != np.int8:
        return [LintIssue("zero-point", node.name, f"zero point is {zp.dtype}, TensorRT needs INT8")]
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
    if scale.size == 1:
        return []
    axis_attr = node.attributes.get("axis")
    axis = axis_attr.as_int() if axis_attr is not None else 1
    weight_shape = tuple(node.inputs[0].const_value.shape)
    issues = []
    if scale.shape[0] != weight_shape[axis]:
        issues.append(LintIssue("axis", node.name,
                                f"{scale.shape[0]} scales for dim[{axis}]={weight_shape[axis]} of weight {weight_shape}"))
    for use in node.outputs[0].uses():
        consumer = use.node
        if consumer.op_type in GEMMS and use.idx == 1 and axis != weight_axis(consumer):
            issues.append(LintIssue("axis", node.name, f"axis={axis} but {consumer.op_type} {consumer.name} needs "
                                    f"axis={weight_axis(consumer)} (one scale per output channel)"))
    return issues


def _check_pairing(node: ir.Node) -> list[LintIssue]:
    if node.op_type == "QuantizeLinear":
        bad = [u.node for u in node.outputs[0].uses() if u.node.op_type != "DequantizeLinear"]
        return [LintIssue("pairing", node.name, f"QuantizeLinear feeds {c.op_type} {c.name}, not a DequantizeLinear")
                for c in bad]
    source = node.inputs[0]
    if source.const_value is None and (source.producer() is None or source.producer().op_type != "QuantizeLinear"):
        return [LintIssue("pairing", node.name, "DequantizeLinear of an activation must be fed by a QuantizeLinear")]
    return []


def _check_gemm_inputs(node: ir.Node) -> list[LintIssue]:
    fed = [v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"
           for v in node.inputs[:2]]
    if any(fed) and not all(fed):
        missing = "activation (input 0)" if not fed[0] else "weight (input 1)"
        return [LintIssue("gemm-inputs", node.name, f"quantized {node.op_type} has no DequantizeLinear on its {missing}")]
    return []


def lint_qdq(model: ir.Model) -> list[LintIssue]:
    issues: list[LintIssue] = []
    for node in model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
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
