"""Weight-only export: INT4 blocked DequantizeLinear structure, ONNX Runtime vs the dequantized PyTorch model,
and the linter's INT4 rules."""

import numpy as np
import onnx_ir as ir
import pytest
import torch

from calibration.gptq import rtn
from calibration.plan import QuantPlan
from calibration.quant import fake_quantized, weight_only_plan
from calibration.stats import quantizable_linears
from calibration.architectures import spec_for_model_type
from exporters.lint import lint_qdq
from exporters.qdq import grouped_linear
from pipeline.runtime import OnnxDecoder
from tests.conftest import export_both_graphs, random_windows, tiny_model

GROUP = 48  # does not divide K = 64: groups of 48 + 16, exported as blocks of 16 carrying their group's scale


def weight_only(bits: int):
    model = tiny_model()
    names = list(quantizable_linears(model, spec_for_model_type("llama")))
    weights = {n: rtn(model.get_submodule(n).weight, bits, GROUP, fp16_scales=True) for n in names}
    plan = weight_only_plan({n: "" for n in names}, f"w{bits}a16", {n: {"weight_bits": bits} for n in names}, {})
    return model, names, weights, plan


@pytest.fixture(scope="module", params=[4, 3])
def exported(request, tmp_path_factory):
    bits = request.param
    model, names, weights, plan = weight_only(bits)
    linears = [grouped_linear(n, w.codes.numpy(), w.scales.numpy(), w.group_size, None, bits)
               for n, w in weights.items()]
    return bits, model, weights, plan, export_both_graphs(model, names, linears, tmp_path_factory.mktemp("int4"))


def test_weights_are_int4_blocked_along_k_and_activations_stay_float(exported):
    bits, _, weights, _, graphs = exported
    graph = graphs[torch.float16][0].graph
    assert not [n for n in graph if n.op_type == "QuantizeLinear"]
    matmuls = [n for n in graph if n.op_type == "MatMul" and n.inputs[1].producer() is not None
               and n.inputs[1].producer().op_type == "DequantizeLinear"]
    assert len(matmuls) == len(weights) == 14
    for node in matmuls:
        dq = node.inputs[1].producer()
        codes, scale = dq.inputs[0].const_value, dq.inputs[1].const_value
        assert codes.dtype == ir.DataType.INT4 and scale.dtype == ir.DataType.FLOAT16
        k, n = codes.shape
        assert dq.attributes["axis"].as_int() == 0 and dq.attributes["block_size"].as_int() == 16
        assert tuple(scale.shape) == (k // 16, n)
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        values = codes.numpy().astype(np.int8)
        assert values.min() >= lo and values.max() <= hi
        assert node.inputs[0].producer() is None or node.inputs[0].producer().op_type != "DequantizeLinear"
    assert lint_qdq(graphs[torch.float16][0]) == [] and lint_qdq(graphs[torch.float32][0]) == []


def test_onnx_runtime_matches_the_dequantized_pytorch_model(exported):
    _, model, weights, plan, graphs = exported
    ids = random_windows(3, 32, seed=5)
    onnx_logits = OnnxDecoder(graphs[torch.float32][1]).prefill_logits(ids)
    with fake_quantized(model, plan, weights), torch.no_grad():
        torch_logits = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(onnx_logits - torch_logits).max() < 1e-4
    cos = (onnx_logits * torch_logits).sum(-1) / np.linalg.norm(onnx_logits, axis=-1) / np.linalg.norm(torch_logits, axis=-1)
    assert cos.min() > 0.99999


def int4_graph(k=64, n=6, block=16, axis=0, quantize_activation=False):
    """x [1, k] @ DQ(int4 W [k, n]) with blocked scales; variants break one TensorRT rule each."""
    import ml_dtypes

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, k]))

    def const(name, array):
        v = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        v.shape, v.dtype = ir.Shape(array.shape), ir.tensor(array).dtype
        return v

    scale_shape = (k // block, n) if axis == 0 else (k, n // block)
    inits = [const("w", np.ones((k, n), ml_dtypes.int4)), const("s", np.ones(scale_shape, np.float32)),
             const("z", np.zeros(scale_shape, ml_dtypes.int4))]
    dq = ir.node("DequantizeLinear", inits, {"axis": axis, "block_size": block}, name="dq")
    nodes, activation = [dq], x
    if quantize_activation:
        inits += [const("xs", np.array(0.1, np.float32)), const("xz", np.array(0, ml_dtypes.int4))]
        q = ir.node("QuantizeLinear", [x, inits[3], inits[4]], name="q")
        dqx = ir.node("DequantizeLinear", [q.outputs[0], inits[3], inits[4]], name="dqx")
        nodes += [q, dqx]
        activation = dqx.outputs[0]
    mm = ir.node("MatMul", [activation, dq.outputs[0]], name="mm")
    graph = ir.Graph([x], [mm.outputs[0]], nodes=nodes + [mm], initializers=inits, opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("variant,rule", [
    (dict(), None),
    (dict(axis=1, block=2), "block"),  # blocks along N: each output channel's K is not blocked
    (dict(n=5), "int4"),  # odd last dimension
    (dict(quantize_activation=True), "int4"),  # INT4 activations
])
def test_linter_enforces_tensorrt_int4_rules(variant, rule):
    rules = {issue.rule for issue in lint_qdq(int4_graph(**variant))}
    if rule is None:
        assert rules == set()
    else:
        assert rule in rules


def test_linter_rejects_a_block_size_that_does_not_divide_k():
    model = int4_graph()
    model.graph.node(0).attributes["block_size"] = ir.AttrInt64("block_size", 24)
    assert "block" in {issue.rule for issue in lint_qdq(model)}


def test_linter_rejects_int4_below_opset_21():
    model = int4_graph()
    model.opset_imports[""] = 19
    assert "int4" in {issue.rule for issue in lint_qdq(model)}


def test_plan_records_the_weight_layout():
    _, _, _, plan = weight_only(4)
    assert QuantPlan.from_json(plan.to_json()) == plan


def test_the_layerwise_probe_reads_a_blocked_int4_weight_as_pytorch_dequantizes_it(exported):
    """exporters.probes.gemm_weight feeds the outlier analysis and the layer-wise diff: for group-wise INT4 (groups
    of 48 cut into blocks of 16) it must give the same matrix as the GPTQ layout's dequantization."""
    from exporters.probes import gemm_weight

    _, _, weights, _, graphs = exported
    graph = graphs[torch.float32][0]
    for name, weight in weights.items():
        np.testing.assert_allclose(gemm_weight(graph, name), weight.dequantize().numpy().T, rtol=1e-6, atol=1e-7)
