"""Export a causal LM to one ONNX decoder graph with KV cache (exporters/decoder_io.py: prefill and decode).

Exporter choice: torch.onnx's TorchScript exporter (dynamo=False), pinned with torch 2.13.0. On transformers 5.23
it reproduces PyTorch logits to ~1e-7 including padded masks, names nodes by module scope (our module->node map
relies on it), and is deterministic. The dynamo exporter gave 0.1-0.3 logit errors on padded masks here.

The exporter traces the graph only (export_params=False); the weights are attached afterwards as initializers that
view the module's own tensors. Given the weights, the exporter holds them about four times at once (its folded
transposes, its C++ proto, the serialized bytes, and a re-parsed copy): 2.9 GB of peak for SmolLM2's 540 MB.
Without them what remained was the copy its whole-graph shape inference makes of the parameters; that pass is
skipped (without_graph_shape_inference).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import warnings
from collections.abc import Collection
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from transformers.cache_utils import Cache, DynamicLayer

from exporters import ExportError
from exporters.decoder_io import DecoderShape
from exporters.naming import SCOPE, matmul_node_name

log = logging.getLogger(__name__)


def additive_mask(attention_mask: torch.Tensor, sequence: int, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, sequence, total] additive mask: query i (at absolute slot total - sequence + i) sees key j when
    j <= its slot and attention_mask[b, j] is 1. Each query also sees its own slot, so a left-padding query row is
    never fully masked: a fully masked row would softmax to NaN in FP16, and NaN values times zero attention
    weights would then poison every real token that reads the padded slot's V."""
    total = attention_mask.shape[1]
    keys = torch.arange(total, device=attention_mask.device)
    queries = keys[total - sequence:]
    causal = keys[None, :] <= queries[:, None]
    own = keys[None, :] == queries[:, None]
    allowed = (causal[None, None] & attention_mask[:, None, None, :].bool()) | own[None, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def filled_cache(past: tuple[torch.Tensor, ...]) -> Cache:
    """A transformers Cache whose layers already hold the graph's past tensors.

    DynamicCache(ddp_cache_data=...) would first concatenate each past onto a 1-D empty tensor (its lazy
    initialisation), which traces into a rank-mismatched ONNX Concat; pre-initialised layers leave exactly one
    Concat(past, new) per key and value, which is the present output."""
    layers = []
    for key, value in zip(past[0::2], past[1::2]):
        layer = DynamicLayer()
        layer.keys, layer.values = key, value
        layer.dtype, layer.device, layer.is_initialized = key.dtype, key.device, True
        layers.append(layer)
    return Cache(layers=layers)


class DecoderWithCache(torch.nn.Module):
    """input_ids, attention_mask, position_ids, past k/v... -> logits, present k/v... (decoder_io's contract).

    The 4-D mask is built here from graph inputs: transformers' own mask builder reads the past length from the
    cache as a Python int, which the tracer would freeze into the graph."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        setattr(self, SCOPE, lm)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        lm = getattr(self, SCOPE)
        cache = filled_cache(past)
        mask = additive_mask(attention_mask, input_ids.shape[1], lm.dtype)
        logits = lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                    use_cache=True).logits
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (logits, *present)


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module):
    """Trace the eager attention path, then restore the model's own implementation.

    The TorchScript exporter lowers SDPA with a float32 -inf mask, which promotes an FP16 graph's attention and
    o_proj to FP32 and puts -inf into FP16 arithmetic; eager attention adds a mask in the model dtype built with
    finfo.min and casts the FP32 softmax back, so the FP16 graph stays FP16 end to end.
    """
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(original)


@contextlib.contextmanager
def without_graph_shape_inference():
    """Skip the TorchScript exporter's whole-graph shape and type inference, which it runs twice at the end of an
    export and whose failure it already ignores (pytorch/pytorch#132205). Its results never reach our graph: the
    exported file carries no intermediate value types either way, and the graph (nodes, names, attributes, inputs
    and outputs with their dynamic axes) is the same with and without it (tests/exporters/test_onnx_export.py; on
    SmolLM2 both FP32 and FP16). It cost 2.3 s of a 4.7 s SmolLM2 FP32 trace and held a copy of the parameters:
    the trace's peak RSS went from 1,642 to 1,096 MB without it. The per-node inference the exporter does while
    building nodes, which decides how ops are lowered, stays on.
    torch._C is private API; torch is pinned (2.13.0) and the test fails if a new version exports another graph."""
    original = torch._C._jit_pass_onnx_graph_shape_type_inference
    torch._C._jit_pass_onnx_graph_shape_type_inference = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = original


def drop_weights(model: torch.nn.Module, linear_names: Collection[str]) -> None:
    """Free the named linears' weights, which a Q/DQ graph takes from its integer codes instead: each becomes an
    empty parameter (export_model traces them with stand_in_weights). SmolLM2's Q/DQ export held 425 MB of FP32
    weights that never reach its graph.
    The tensors kept are copied: a checkpoint loaded from safetensors is memory-mapped, one map per file, and a
    kept tensor's view holds its whole file mapped, dropped weights' pages included (SmolLM2: 911 MB resident
    after dropping them without the copies, 470 MB with)."""
    for name in linear_names:
        module = model.get_submodule(name)
        module.weight = torch.nn.Parameter(module.weight.new_empty(0), requires_grad=False)
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()


@contextlib.contextmanager
def stand_in_weights(model: torch.nn.Module, linear_names: Collection[str]):
    """Give the named linears (their weights dropped) weights of their shape and the model's dtype that hold one
    value each, broadcast: tracing records shapes, not values, and the graph's weight initializers for them are
    replaced afterwards (exporters/qdq.py). Each a different value: the exporter merges initializers that are
    equal by value (its deduplication pass), which would join the stand-ins of linears of one shape."""
    modules = [model.get_submodule(name) for name in linear_names]
    dropped = [module.weight for module in modules]
    for value, module in enumerate(modules, start=1):
        stand_in = torch.full((), float(value), dtype=model.dtype).expand(module.out_features, module.in_features)
        module.weight = torch.nn.Parameter(stand_in, requires_grad=False)
    try:
        yield
    finally:
        for module, weight in zip(modules, dropped):
            module.weight = weight


def export_model(model: torch.nn.Module, dtype: torch.dtype, opset: int, linear_names: list[str],
                 weightless: Collection[str] = ()) -> ir.Model:
    """Trace `model` (a copy cast to dtype unless it has that dtype) and return the decoder graph with readable
    weight names. The graph's initializers view the traced model's tensors; those of the `weightless` linears
    (drop_weights) are stand-ins to replace."""
    traced = model if model.dtype == dtype else copy.deepcopy(model).to(dtype)
    with eager_attention(traced), stand_in_weights(traced, weightless):
        graph_model = _trace(DecoderWithCache(traced).eval(), DecoderShape.from_config(model.config), dtype, opset)
    name_linear_weights(graph_model, linear_names)
    share_tied_embedding(graph_model)
    return graph_model


def _trace(wrapper: torch.nn.Module, shape: DecoderShape, dtype: torch.dtype, opset: int) -> ir.Model:
    # Sample sizes all distinct and > 1 (batch 2, 3 past, 4 new) so the tracer cannot confuse or specialise them.
    batch, past, new = 2, 3, 4
    ids = torch.ones(batch, new, dtype=torch.int64)
    sample = (ids, torch.ones(batch, past + new, dtype=torch.int64), torch.arange(past, past + new).repeat(batch, 1),
              *[torch.zeros(shape.kv_shape(batch, past), dtype=dtype) for _ in shape.past_names])
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), without_graph_shape_inference():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes are expected here
        path = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(
                wrapper, sample, str(path), input_names=shape.input_names, output_names=shape.output_names,
                dynamic_axes=shape.dynamic_axes(), opset_version=opset, dynamo=False, do_constant_folding=True,
                export_params=False,
            )
        except OSError as e:  # a full disk (or file-size limit) where the tracer writes: say where
            raise OSError(e.errno, e.strerror, str(path)) from None
        except Exception as e:  # the exporter raises many types; report one line with the cause
            raise ExportError(f"torch.onnx export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        graph_model = ir.load(path)
    attach_parameters(graph_model, wrapper, len(shape.input_names))
    return graph_model


def attach_parameters(model: ir.Model, wrapper: torch.nn.Module, data_inputs: int) -> None:
    """Turn the graph inputs after the first `data_inputs` (the parameters, as export_params=False leaves them)
    into initializers that view `wrapper`'s tensors, without copying them.

    Such an input is a parameter or buffer under its state-dict name, or a constant the exporter folded from parameters.
    The folded ones are the linears' transposed weights: aten::linear exports as MatMul(x, W^T) and constant
    folding turns Transpose(W) into one input, read only by that linear's MatMul. Anything else has no
    counterpart in the module and is an error rather than a guess."""
    params = dict(wrapper.state_dict(keep_vars=True))
    linears = {matmul_node_name(name.removeprefix(f"{SCOPE}.")): module for name, module in wrapper.named_modules()
               if isinstance(module, torch.nn.Linear)}
    for value in list(model.graph.inputs[data_inputs:]):
        tensor = params.get(value.name)
        if tensor is None:
            tensor = _folded_linear_weight(value, linears)
        array = tensor.detach().numpy()
        if tuple(array.shape) != tuple(value.shape):
            raise ExportError(f"exported weight {value.name} has shape {list(value.shape)}, its tensor "
                              f"{list(array.shape)}")
        model.graph.inputs.remove(value)
        value.const_value = ir.tensor(array, name=value.name)
        model.graph.register_initializer(value)


def _folded_linear_weight(value: ir.Value, linears: dict[str, torch.nn.Linear]) -> torch.Tensor:
    uses = value.uses()
    if len(uses) == 1 and uses[0].node.op_type == "MatMul" and uses[0].idx == 1 and uses[0].node.name in linears:
        return linears[uses[0].node.name].weight.T
    readers = sorted({use.node.name for use in uses})
    raise ExportError(f"exported constant {value.name} (read by {', '.join(readers[:3])}) is neither a parameter, a "
                      "buffer nor a linear's transposed weight, so it cannot be attached to the traced graph")


def name_linear_weights(model: ir.Model, linear_names: list[str]) -> None:
    """Rename each linear's transposed weight initializer from 'onnx::MatMul_123' to '<module>.weight_t'."""
    nodes = {node.name: node for node in model.graph}
    for name in linear_names:
        node = nodes.get(matmul_node_name(name))
        if node is None:
            raise ExportError(f"no MatMul node '{matmul_node_name(name)}' for module {name} in the exported graph")
        weight = node.inputs[1]
        if weight is not None and weight.const_value is not None and len(weight.uses()) == 1:
            weight.name = f"{name}.weight_t"


def share_tied_embedding(model: ir.Model) -> None:
    """With tied embeddings the exporter stores the vocab matrix twice: [V, H] for the embedding Gather and a
    transposed [H, V] copy for the lm_head MatMul (113 MB each for SmolLM2 in FP32). Feed the MatMul a Transpose
    of the Gather's initializer instead; ONNX Runtime and TensorRT fold the constant Transpose at load time."""
    nodes = {node.name: node for node in model.graph}
    gather = nodes.get(f"/{SCOPE}/model/embed_tokens/Gather")
    matmul = nodes.get(matmul_node_name("lm_head"))
    if gather is None or matmul is None or gather.inputs[0].const_value is None:
        return
    table, head = gather.inputs[0], matmul.inputs[1]
    if head is None or head.const_value is None or len(head.uses()) != 1:
        return
    if not np.array_equal(head.const_value.numpy(), table.const_value.numpy().T):
        return  # untied: both matrices are real weights
    transpose = ir.node("Transpose", [table], {"perm": [1, 0]}, name=f"/{SCOPE}/lm_head/Transpose_tied_embedding")
    transpose.outputs[0].name = "lm_head.weight_t"
    model.graph.insert_before(matmul, transpose)
    matmul.replace_input_with(1, transpose.outputs[0])
    model.graph.initializers.pop(head.name)
