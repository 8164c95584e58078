"""Graph structure of the Q/DQ export, its faithfulness in ONNX Runtime, and the TensorRT linter."""

import numpy as np
import onnx_ir as ir
import pytest
import torch

from calibration.gptq import rtn
from calibration.quant import fake_quantized
from calibration.recipe import Recipe, smooth_and_plan
from calibration.smoothing import uniform_alpha
from exporters import ExportError
from exporters.lint import lint_or_raise, lint_qdq
from exporters.onnx_export import drop_weights, export_model
from exporters.qdq import (LinearQuantization, insert_qdq, module_node_map, round_kept_float_weights,
                           store_float_weights_fp16)
from pipeline.runtime import OnnxDecoder
from tests.conftest import calibrated, export_both_graphs, random_windows, tiny_model


def smoothed_and_planned():
    model = tiny_model()
    spec, linears, absmax = calibrated(model)
    plan = smooth_and_plan(model, spec, absmax, Recipe(uniform_alpha(model, spec, 0.8), 0.8), random_windows(), 4,
                           {"lm_head": "kept float"}).plan
    quantizations = []
    for entry in plan.quantized():
        q = rtn(linears[entry.name].weight, 8, -1, fp16_scales=False)
        quantizations.append(LinearQuantization(entry.name, q.codes.numpy(), q.scales[:, 0].numpy(), entry.input_scale))
    return model, list(linears), plan, quantizations


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, names, plan, quantizations = smoothed_and_planned()
    return model, plan, export_both_graphs(model, names, quantizations, tmp_path_factory.mktemp("onnx"))


def run_ort(path, ids):
    return OnnxDecoder(path).prefill_logits(ids)


def producer_op(value):
    return value.producer().op_type if value.producer() is not None else None


def test_every_quantized_matmul_has_dq_on_both_inputs_and_int8_weights(exported):
    _, plan, graphs = exported
    graph = graphs[torch.float32][0].graph
    quantized = [n for n in graph if n.op_type == "MatMul" and producer_op(n.inputs[1]) == "DequantizeLinear"]
    assert len(quantized) == len(plan.quantized()) == 14
    for node in quantized:
        assert producer_op(node.inputs[0]) == "DequantizeLinear"
        assert producer_op(node.inputs[0].producer().inputs[0]) == "QuantizeLinear"
        weight_dq = node.inputs[1].producer()
        assert weight_dq.inputs[0].const_value.dtype == ir.DataType.INT8
        assert weight_dq.attributes["axis"].as_int() == 1
        assert weight_dq.inputs[1].const_value.shape[0] == weight_dq.inputs[0].const_value.shape[1]
    # No float copy of a quantized weight is left behind.
    assert not [n for n in graph.initializers if n.endswith(".weight_t") and "lm_head" not in n]


def test_each_quantized_gemm_has_its_own_pair_with_the_shared_scale(exported):
    _, _, graphs = exported
    graph = graphs[torch.float32][0].graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph) == 7 * 2  # every linear but lm_head, per layer
    nodes = {n.name: n for n in graph}
    dqs = [nodes[f"/lm/model/layers.0/self_attn/{p}/MatMul"].inputs[0].producer() for p in ("q_proj", "k_proj", "v_proj")]
    qs = [dq.inputs[0].producer() for dq in dqs]
    assert all(q.op_type == "QuantizeLinear" and len(q.outputs[0].uses()) == 1 for q in qs)
    assert len({id(q.inputs[0]) for q in qs}) == 1  # all three quantize the same normed hidden state
    assert len({float(q.inputs[1].const_value.numpy()) for q in qs}) == 1  # with one scale


def test_onnx_runtime_runs_every_quantized_matmul_as_an_integer_gemm(exported, tmp_path):
    """ONNX Runtime's optimized graph: each W8A8 linear became MatMulIntegerToFloat (no float MatMul left on
    dequantized INT8 weights)."""
    import onnx
    import onnxruntime as ort

    _, plan, graphs = exported
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(graphs[torch.float32][1]), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("MatMulIntegerToFloat") == len(plan.quantized()) == 14
    assert "DequantizeLinear" not in ops


def test_fp16_graph_stores_fp16_scales_and_stays_fp16(exported):
    _, _, graphs = exported
    graph = graphs[torch.float16][0].graph
    for node in graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert node.inputs[1].const_value.dtype == ir.DataType.FLOAT16
    assert lint_qdq(graphs[torch.float16][0]) == []


def test_onnx_runtime_matches_the_pytorch_fake_quant_simulation(exported):
    model, plan, graphs = exported
    ids = random_windows(2, 40, seed=3)
    onnx_logits = run_ort(graphs[torch.float32][1], ids)
    with fake_quantized(model, plan), torch.no_grad():
        simulated = model(torch.from_numpy(ids)).logits.numpy()
    with torch.no_grad():
        float_logits = model(torch.from_numpy(ids)).logits.numpy()
    # Same arithmetic up to float summation order: far below the quantization error itself.
    assert np.abs(onnx_logits - simulated).max() < 1e-4
    assert np.abs(onnx_logits - float_logits).max() > 1e-3, "the Q/DQ graph must actually quantize"
    fp16 = run_ort(graphs[torch.float16][1], ids).astype(np.float32)
    cos = (fp16 * onnx_logits).sum() / np.linalg.norm(fp16) / np.linalg.norm(onnx_logits)
    assert cos > 0.999


def test_module_map_links_modules_to_their_nodes(exported):
    _, _, graphs = exported
    mapping = module_node_map(graphs[torch.float32][0])
    k_nodes = mapping["model.layers.1.self_attn.k_proj"]
    assert "/lm/model/layers.1/self_attn/k_proj/MatMul" in k_nodes
    assert "/lm/model/layers.1/self_attn/k_proj/DequantizeLinear_weight" in k_nodes
    assert "/lm/model/layers.1/self_attn/k_proj/QuantizeLinear_input" in k_nodes


def broken(exported, mutate):
    graph = ir.from_proto(ir.to_proto(exported[2][torch.float32][0]))
    nodes = {n.name: n for n in graph.graph}
    mutate(graph.graph, nodes)
    return graph


def test_linter_accepts_the_export_and_rejects_a_nonzero_zero_point(exported):
    assert lint_qdq(exported[2][torch.float32][0]) == []

    def mutate(graph, nodes):
        zp = graph.initializers["model.layers.0.mlp.down_proj.input_zero_point"]
        zp.const_value = ir.tensor(np.array(3, np.int8))

    issues = lint_qdq(broken(exported, mutate))
    assert {i.rule for i in issues} == {"zero-point"}
    assert "model.layers.0.mlp.down_proj" in str(issues[0])


def test_linter_rejects_a_wrong_per_channel_axis(exported):
    def mutate(graph, nodes):
        nodes["/lm/model/layers.1/mlp/gate_proj/DequantizeLinear_weight"].attributes["axis"] = ir.AttrInt64("axis", 0)

    issues = lint_qdq(broken(exported, mutate))
    assert issues and all(i.rule == "axis" for i in issues)
    assert any("model.layers.1.mlp.gate_proj" in str(i) for i in issues)


def test_linter_rejects_a_per_channel_activation_scale(exported):
    def mutate(graph, nodes):
        scale = graph.initializers["model.layers.0.self_attn.o_proj.input_scale"]
        scale.const_value = ir.tensor(np.full(64, 0.1, np.float32))

    issues = lint_qdq(broken(exported, mutate))
    assert "per-tensor" in {i.rule for i in issues}
    with pytest.raises(ExportError, match="per-tensor.*o_proj"):
        lint_or_raise(broken(exported, mutate), "test graph")


def test_linter_rejects_a_matmul_with_dq_on_one_input_only(exported):
    def mutate(graph, nodes):
        matmul = nodes["/lm/model/layers.0/mlp/down_proj/MatMul"]
        matmul.replace_input_with(0, matmul.inputs[0].producer().inputs[0].producer().inputs[0])

    issues = lint_qdq(broken(exported, mutate))
    assert any("down_proj" in i.node and i.rule == "gemm-inputs" for i in issues)


def test_linter_rejects_zero_and_non_finite_scales(exported):
    def mutate(graph, nodes):
        scale = graph.initializers["model.layers.0.mlp.up_proj.weight_scale"]
        values = scale.const_value.numpy().copy()
        values[0] = 0.0
        scale.const_value = ir.tensor(values)

    assert {i.rule for i in lint_qdq(broken(exported, mutate))} == {"scale"}


def test_tied_embeddings_are_stored_once_and_logits_unchanged(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    config = tiny_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    graph = export_model(model, torch.float32, 21, [])
    shapes = [tuple(v.const_value.shape) for v in graph.graph.initializers.values()]
    assert shapes.count((320, 64)) == 1 and (64, 320) not in shapes
    path = tmp_path / "tied.onnx"
    ir.save(graph, path)
    ids = random_windows(2, 16)
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(run_ort(path, ids) - expected).max() < 1e-4


def test_the_qdq_graphs_are_the_same_without_the_float_weights_they_replace():
    """Export drops the quantized linears' float weights (the Q/DQ graph replaces them by their integer codes) and
    traces with stand-ins of their shape: both graphs come out byte for byte as from the full model."""
    model, names, _, quantizations = smoothed_and_planned()
    integer = [q.module for q in quantizations]

    def qdq_graph(dtype, scale_dtype, **weightless):
        graph = export_model(model, dtype, 21, names, **weightless)
        insert_qdq(graph, quantizations, scale_dtype)
        return ir.to_proto(graph).SerializeToString()

    dtypes = ((torch.float32, np.float32), (torch.float16, np.float16))
    expected = [qdq_graph(*d) for d in dtypes]
    drop_weights(model, integer)
    assert all(model.get_submodule(m).weight.numel() == 0 for m in integer)
    assert [qdq_graph(*d, weightless=integer) for d in dtypes] == expected
    assert all(model.get_submodule(m).weight.numel() == 0 for m in integer)  # the stand-ins were for the trace only


def test_float_weights_are_stored_fp16_and_computed_fp32(tmp_path):
    """The W8A8 FP32 graph keeps its float matrices (here the embedding, the vocab projection and one skipped
    linear) in FP16 behind a Cast: half their bytes, logits identical to the same graph storing them FP32."""
    model, names, plan, quantizations = smoothed_and_planned()
    skipped = "model.layers.1.mlp.down_proj"
    quantizations = [q for q in quantizations if q.module != skipped]
    round_kept_float_weights(model, {q.module for q in quantizations})
    embedding = model.get_submodule("model.embed_tokens").weight
    assert torch.equal(embedding, embedding.half().float())  # rounded: FP16-exact
    graph = export_model(model, torch.float32, 21, names)
    insert_qdq(graph, quantizations, np.float32)
    ir.save(graph, tmp_path / "fp32.onnx")
    saved = store_float_weights_fp16(graph)
    ir.save(graph, tmp_path / "fp16-storage.onnx")
    float_matrices = [v for v in graph.graph.initializers.values()
                      if v.const_value.numpy().dtype == np.float32 and v.const_value.numpy().ndim >= 2]
    assert float_matrices == []
    stored = {n: v.const_value.numpy() for n, v in graph.graph.initializers.items() if n.endswith("_fp16")}
    matrices = {id(p): p for p in (model.get_parameter(f"{m}.weight") for m in ("model.embed_tokens", "lm_head",
                                                                                  skipped))}  # tied: one matrix
    assert saved == sum(a.nbytes for a in stored.values()) == 2 * sum(p.numel() for p in matrices.values())
    assert len(stored) == len(matrices)
    assert lint_qdq(graph) == []
    ids = random_windows(2, 16)
    assert np.array_equal(run_ort(tmp_path / "fp16-storage.onnx", ids), run_ort(tmp_path / "fp32.onnx", ids))


def test_float_weight_storage_refuses_values_fp16_cannot_hold():
    model, names, _, quantizations = smoothed_and_planned()
    graph = export_model(model, torch.float32, 21, names)  # not rounded first
    insert_qdq(graph, quantizations, np.float32)
    with pytest.raises(ExportError, match="is not FP16-exact: round the model's kept-float weights first"):
        store_float_weights_fp16(graph)
