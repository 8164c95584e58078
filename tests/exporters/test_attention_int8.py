"""INT8 attention matmuls (O3): which MatMuls get Q/DQ (found by structure), the linter, static scales (a decode
step reproduces the prefill), and the accuracy cost against the same graph with float attention."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from exporters.attention_qdq import attention_operands, probe_graph, quantize_attention
from exporters.decoder_io import observe_absmax
from exporters.lint import lint_qdq
from exporters.naming import module_of_node
from pipeline.metrics import cosines
from pipeline.runtime import OnnxDecoder
from tests.conftest import export_both_graphs, random_windows, stepwise_logits
from tests.exporters.test_qdq import smoothed_and_planned


def session_of(model: ir.Model):
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """W8A8 graphs (FP32, FP16) with float attention, and the same with INT8 attention matmuls."""
    model, names, _, quantizations = smoothed_and_planned()
    folder = tmp_path_factory.mktemp("attention")
    float_graphs = export_both_graphs(model, names, quantizations, folder)
    fp32 = ir.load(float_graphs[torch.float32][1])
    probe, names = probe_graph(fp32)
    absmax = observe_absmax(session_of(probe), names, random_windows(4, 32, seed=3))
    int8 = {}
    for dtype, scale_dtype in ((torch.float32, np.float32), (torch.float16, np.float16)):
        graph = ir.load(float_graphs[dtype][1])
        pairs = quantize_attention(graph, absmax, scale_dtype)
        path = folder / f"{dtype}.attention-int8.onnx"
        ir.save(graph, path)
        int8[dtype] = (graph, path, pairs)
    return float_graphs, int8, absmax


def test_both_inputs_of_qk_and_pv_get_qdq_and_nothing_else_does(graphs):
    float_graphs, int8, absmax = graphs
    graph, _, pairs = int8[torch.float16]
    assert pairs == 2 * 2 * 2  # two layers, QK^T and PV, both inputs
    matmuls = [n for n in graph.graph if n.op_type == "MatMul"]
    quantized = [n for n in matmuls if module_of_node(n.name).endswith("self_attn")]
    assert len(quantized) == 4 and len(absmax) == 8 and all(v > 0 for v in absmax.values())
    for node in quantized:
        for value in node.inputs[:2]:
            dq = value.producer()
            assert dq.op_type == "DequantizeLinear" and dq.inputs[0].producer().op_type == "QuantizeLinear"
            assert dq.inputs[1].const_value.numpy().dtype == np.float16 and dq.inputs[1].const_value.numpy().ndim == 0
    # the softmax output is a probability: its range is at most 1
    softmax_outputs = [n.inputs[0].producer().inputs[0] for n in quantized if n.inputs[0].producer()]
    assert all(absmax.get(v.name, 1.0) <= 1.0 + 1e-6 for v in softmax_outputs)
    # nothing else got a Q: the linears keep their pairs, the vocab projection (a tied embedding) stays float
    before = ir.load(float_graphs[torch.float16][1])
    count = lambda g: sum(n.op_type == "QuantizeLinear" for n in g.graph)  # noqa: E731
    assert count(graph) == count(before) + 8
    assert [(n.name, i) for n, i in attention_operands(before)] == [(n.name, i) for n in quantized for i in (0, 1)]
    assert lint_qdq(int8[torch.float16][0]) == [] and lint_qdq(int8[torch.float32][0]) == []


def test_a_decode_step_reproduces_the_prefill_with_static_scales(graphs):
    engine = OnnxDecoder(graphs[1][torch.float32][1])
    window = random_windows(2, 10, seed=8)
    stepwise, _ = stepwise_logits(engine, window, prefill=4)
    assert np.abs(stepwise - engine.prefill_logits(window)).max() < 1e-4


def test_int8_attention_changes_the_logits_a_little(graphs):
    float_graphs, int8, _ = graphs
    window = random_windows(2, 32, seed=11)
    with_float = OnnxDecoder(float_graphs[torch.float32][1]).prefill_logits(window)
    with_int8 = OnnxDecoder(int8[torch.float32][1]).prefill_logits(window)
    cos = cosines(with_float, with_int8)
    assert not np.array_equal(with_int8, with_float)  # the rounding is real
    # close on average; the worst position loses more (a near-uniform softmax of a random model has probabilities of
    # a few INT8 steps, the known weak spot of O3)
    assert cos.mean() > 0.998 and cos.min() > 0.98, (cos.mean(), cos.min())
