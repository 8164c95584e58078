"""The traced graph's weights: attached from the model without copies, and nothing attached by guesswork; the
exporter's whole-graph shape inference skipped without changing the graph."""

import contextlib

import numpy as np
import onnx_ir as ir
import pytest
import torch

from calibration.architectures import spec_for_model_type
from calibration.stats import quantizable_linears
from exporters import ExportError, onnx_export
from exporters.onnx_export import attach_parameters, export_model
from exporters.naming import SCOPE
from pipeline.runtime import OnnxDecoder
from tests.conftest import random_windows, tiny_model


def linear_names(model) -> list[str]:
    """The linears the export stage names (quantizable_linears), as it passes them to export_model."""
    return list(quantizable_linears(model, spec_for_model_type(model.config.model_type)))


def test_weights_view_the_model_and_reproduce_its_logits(tmp_path):
    model = tiny_model(model_type="qwen2")  # q/k/v biases: parameters that are not folded transposes
    names = linear_names(model)
    graph = export_model(model, torch.float32, 21, names)
    initializers = graph.graph.initializers
    for name in names:
        module = model.get_submodule(name)
        weight_t = initializers[f"{name}.weight_t"].const_value.numpy()
        # A view of the module's storage: exporting holds no second copy of the weights.
        assert np.shares_memory(weight_t, module.weight.detach().numpy())
        np.testing.assert_array_equal(weight_t, module.weight.detach().numpy().T)
    assert np.shares_memory(initializers[f"{SCOPE}.model.layers.0.self_attn.q_proj.bias"].const_value.numpy(),
                            model.model.layers[0].self_attn.q_proj.bias.detach().numpy())
    path = tmp_path / "model.onnx"
    ir.save(graph, path)
    ids = random_windows(2, 16)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(OnnxDecoder(path).prefill_logits(ids), expected, atol=1e-4, rtol=1e-4)


def test_a_constant_with_no_counterpart_in_the_model_is_refused():
    folded = ir.Value(name="onnx::Add_7", shape=ir.Shape([4]), type=ir.TensorType(ir.DataType.FLOAT))
    data = ir.Value(name="x", shape=ir.Shape([4]), type=ir.TensorType(ir.DataType.FLOAT))
    add = ir.node("Add", [data, folded], name="/lm/model/Add")
    graph = ir.Graph([data, folded], add.outputs, nodes=[add])
    with pytest.raises(ExportError, match=r"onnx::Add_7 \(read by /lm/model/Add\)"):
        attach_parameters(ir.Model(graph, ir_version=10), torch.nn.Module(), data_inputs=1)


def test_skipping_the_whole_graph_shape_inference_exports_the_same_graph(monkeypatch):
    """The pass is skipped (never called), and torch's export with it gives the same graph, byte for byte."""
    calls = []
    original = torch._C._jit_pass_onnx_graph_shape_type_inference

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(torch._C, "_jit_pass_onnx_graph_shape_type_inference", counted)
    model = tiny_model()
    names = linear_names(model)
    skipped = ir.to_proto(export_model(model, torch.float16, 21, names)).SerializeToString()
    assert calls == [] and torch._C._jit_pass_onnx_graph_shape_type_inference is counted
    monkeypatch.setattr(onnx_export, "without_graph_shape_inference", contextlib.nullcontext)
    with_pass = ir.to_proto(export_model(model, torch.float16, 21, names)).SerializeToString()
    assert len(calls) == 2
    assert skipped == with_pass
