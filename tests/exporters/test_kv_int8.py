"""INT8 KV cache: graph structure, the linter's one allowed Q->Concat, and numbers: a decode step reproduces the
prefill exactly (nothing is re-quantized), and the INT8 cache stays close to the float cache."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from exporters.kv_quant import kv_scales, observe_kv_absmax, quantize_kv_cache
from exporters.lint import lint_qdq
from pipeline.generation import Sampling, generate_ids
from pipeline.runtime import OnnxDecoder
from tests.conftest import export_both_graphs, random_windows, stepwise_logits
from tests.exporters.test_qdq import smoothed_and_planned


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """The W8A8 FP32 and FP16 graphs with a float cache, and the same with an INT8 cache."""
    model, names, _, quantizations = smoothed_and_planned()
    folder = tmp_path_factory.mktemp("kv")
    float_graphs = export_both_graphs(model, names, quantizations, folder)
    session = ort.InferenceSession(str(float_graphs[torch.float32][1]), providers=["CPUExecutionProvider"])
    scales = kv_scales(observe_kv_absmax(session, random_windows(4, 32, seed=3)))
    int8 = {}
    for dtype, scale_dtype in ((torch.float32, np.float32), (torch.float16, np.float16)):
        graph = ir.load(float_graphs[dtype][1])
        quantize_kv_cache(graph, scales, scale_dtype)
        path = folder / f"{dtype}.kv-int8.onnx"
        ir.save(graph, path)
        int8[dtype] = (graph, path)
    return float_graphs, int8, scales


def test_cache_tensors_are_int8_and_attention_reads_them_dequantized(graphs):
    _, int8, scales = graphs
    graph = int8[torch.float16][0].graph
    assert len(scales) == 4 and all(s > 0 for s in scales.values())
    for present in [v for v in graph.outputs if v.name.startswith("present.")]:
        assert present.dtype == ir.DataType.INT8
        concat = present.producer()
        assert concat.op_type == "Concat" and concat.inputs[0].dtype == ir.DataType.INT8
        assert concat.inputs[1].producer().op_type == "QuantizeLinear"
        assert [u.node.op_type for u in present.uses()] == ["DequantizeLinear"]
        dq = present.uses()[0].node
        assert dq.inputs[1].const_value.numpy().dtype == np.float16  # FP16 scale: the graph stays FP16
    assert lint_qdq(int8[torch.float16][0]) == [] and lint_qdq(int8[torch.float32][0]) == []


def test_decode_steps_reproduce_the_int8_prefill(graphs):
    engine = OnnxDecoder(graphs[1][torch.float32][1])
    assert engine.kv_dtype == np.int8
    window = random_windows(2, 10, seed=8)
    stepwise, cache = stepwise_logits(engine, window, prefill=4)
    assert cache.past()["past_key_values.0.key"].dtype == np.int8
    assert np.abs(stepwise - engine.prefill_logits(window)).max() < 1e-4


def test_int8_cache_stays_close_to_the_float_cache(graphs):
    float_graphs, int8, _ = graphs
    window = random_windows(3, 32, seed=11)
    base = OnnxDecoder(float_graphs[torch.float32][1]).prefill_logits(window)
    quant = OnnxDecoder(int8[torch.float32][1]).prefill_logits(window)
    cos = (base * quant).sum(-1) / np.linalg.norm(base, axis=-1) / np.linalg.norm(quant, axis=-1)
    assert cos.min() > 0.99 and not np.array_equal(base, quant)
    prompts = [[5, 17, 42], [200, 3, 9, 9]]
    assert all(len(t) == 8 for t in generate_ids(OnnxDecoder(int8[torch.float16][1]), prompts, 8, Sampling()))
