"""Intermediate tensors worth comparing between the reference and the Q/DQ graph, found by module name, and the
graph surgery that exposes them as outputs.

Only chosen tensors are marked (each decoder block's output, each quantized GEMM's output and its input before
the Q node): marking every tensor makes ONNX Runtime and TensorRT keep values they would otherwise fuse away,
so the marked graph would no longer be the graph under test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from exporters import ExportError
from exporters.naming import matmul_node_name, module_of_node, scope_of


def layer_of(module: str) -> str:
    """'model.layers.3.mlp.down_proj' -> 'model.layers.3': the module up to its last numeric component."""
    parts = module.split(".")
    index = max((i for i, p in enumerate(parts) if p.isdigit()), default=None)
    if index is None:
        raise ExportError(f"module {module} is not inside a numbered decoder block")
    return ".".join(parts[: index + 1])


@dataclass(frozen=True)
class Probes:
    """Tensor names, in execution order; input_scales only where the graph quantizes that GEMM's activation."""

    gemm_outputs: dict[str, str]  # module -> its MatMul's output
    gemm_inputs: dict[str, str]  # module -> its float activation: what its QuantizeLinear reads, else its input
    input_scales: dict[str, float]  # module -> its QuantizeLinear's scale (quantized activations only)
    block_outputs: dict[str, str]  # 'model.layers.i' -> the block's last residual Add

    def names(self) -> list[str]:
        return list(dict.fromkeys([*self.gemm_outputs.values(), *self.gemm_inputs.values(),
                                   *self.block_outputs.values()]))

    def subset(self, modules: list[str]) -> "Probes":
        """The probes of these modules and of the decoder blocks holding them, in execution order."""
        keep, layers = set(modules), {layer_of(m) for m in modules}
        return Probes({m: n for m, n in self.gemm_outputs.items() if m in keep},
                      {m: n for m, n in self.gemm_inputs.items() if m in keep},
                      {m: s for m, s in self.input_scales.items() if m in keep},
                      {b: n for b, n in self.block_outputs.items() if b in layers})


def find_probes(model: ir.Model, modules: list[str]) -> Probes:
    nodes = {node.name: node for node in model.graph}
    order = {node.name: i for i, node in enumerate(model.graph)}
    missing = [m for m in modules if matmul_node_name(m) not in nodes]
    if missing:
        raise ExportError(f"no MatMul node '{matmul_node_name(missing[0])}' for module {missing[0]} in the graph")
    modules = sorted(modules, key=lambda m: order[matmul_node_name(m)])
    outputs = {m: nodes[matmul_node_name(m)].outputs[0].name for m in modules}
    quantizers = {m: nodes[f"{scope_of(m)}/QuantizeLinear_input"] for m in modules
                  if f"{scope_of(m)}/QuantizeLinear_input" in nodes}
    inputs = {m: (quantizers[m] if m in quantizers else nodes[matmul_node_name(m)]).inputs[0].name for m in modules}
    scales = {m: float(q.inputs[1].const_value.numpy()) for m, q in quantizers.items()}
    return Probes(outputs, inputs, scales, block_outputs(model, {layer_of(m) for m in modules}))


def block_outputs(model: ir.Model, layers: set[str]) -> dict[str, str]:
    """'model.layers.i' -> the tensor the decoder block hands to the next one, in execution order."""
    blocks = {}  # keys in execution order (a dict keeps first insertion order when a value is replaced)
    for node in model.graph:  # the last node emitted in a block's own scope is its residual Add
        if module_of_node(node.name) in layers:
            blocks[module_of_node(node.name)] = node.outputs[0].name
    missing = sorted(layers - blocks.keys())
    if missing:
        raise ExportError(f"no node of decoder block {missing[0]} in the graph")
    return blocks


def with_outputs(model: ir.Model, names: list[str]) -> ir.Model:
    """Add the named intermediate tensors to the graph outputs, in place."""
    values = {v.name: v for node in model.graph for v in node.outputs if v is not None}
    present = {v.name for v in model.graph.outputs}
    for name in names:
        if name not in values:
            raise ExportError(f"no tensor named {name} in the graph")
        if name not in present:
            model.graph.outputs.append(values[name])
    return model


def probe_subgraph(model: ir.Model, names: list[str], start: tuple[str, np.dtype] | None = None) -> ir.Model:
    """In place: the graph cut down to what computes the named tensors, which become its only outputs; with
    start = (name, dtype), that tensor of the graph is read as a new input of that name instead of computed.
    The layer-wise diff runs a few decoder blocks at a time this way, each pass fed the previous pass's block
    output: SmolLM2's three passes then compute each block once instead of the whole graph three times, and each
    session loads only its blocks' weights. The original inputs stay declared, used or not, so one feed runs every
    cut (ONNX Runtime refuses a feed naming an input the graph lacks)."""
    values = {v.name: v for node in model.graph for v in node.outputs if v is not None}
    missing = [n for n in names + ([start[0]] if start else []) if n not in values]
    if missing:
        raise ExportError(f"no tensor named {missing[0]} in the graph")
    outputs = [values[n] for n in dict.fromkeys(names)]
    if start is not None:
        name, dtype = start
        computed = values[name]
        fed = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(np.dtype(dtype))), shape=computed.shape)
        computed.name = f"{name}/computed"  # unused once its readers read the input: removed below
        ir.convenience.replace_all_uses_with(computed, fed)
        model.graph.inputs.append(fed)
        outputs = [fed if v is computed else v for v in outputs]
    model.graph.outputs.clear()
    model.graph.outputs.extend(outputs)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return model


def gemm_weight(model: ir.Model, module: str) -> np.ndarray:
    """The module's weight as its MatMul multiplies it, [in, out] float32: the initializer, or the integer codes
    through their DequantizeLinear (per output channel, or blocked along the input axis)."""
    weight = {node.name: node for node in model.graph}[matmul_node_name(module)].inputs[1]
    cast = weight.producer()
    if cast is not None and cast.op_type == "Cast" and cast.inputs[0].const_value is not None:
        weight = cast.inputs[0]  # a float weight stored FP16 (qdq.store_float_weights_fp16)
    if weight.const_value is not None:
        return weight.const_value.numpy().astype(np.float32)
    dq = weight.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0].const_value is None:
        raise ExportError(f"module {module}: its MatMul weight is neither an initializer nor a dequantized one")
    codes = dq.inputs[0].const_value.numpy().astype(np.float32)
    scale = dq.inputs[1].const_value.numpy().astype(np.float32)
    zero = dq.inputs[2].const_value.numpy().astype(np.float32) if len(dq.inputs) > 2 and dq.inputs[2] else 0.0
    axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
    if "block_size" in dq.attributes:  # blocks along `axis`: repeat each scale over its block
        block = dq.attributes["block_size"].as_int()
        scale = np.repeat(scale, block, axis=axis)
        zero = np.repeat(zero, block, axis=axis) if np.ndim(zero) else zero
    elif scale.ndim == 1:  # per channel along `axis`
        shape = [1, 1]
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = np.reshape(zero, shape) if np.ndim(zero) else zero
    return (codes - zero) * scale
