"""GPTQ schemes end to end through the CLI on a tiny local model."""

import json

import numpy as np
import onnx_ir as ir
import pytest

from calibration.gptq import load_quantized
from tests.pipeline.test_cli import SMALL, assert_one_line_error, engine, no_artifacts, stages


@pytest.fixture(scope="module")
def w4(tmp_path_factory, tiny_model_dir, corpus):
    out = tmp_path_factory.mktemp("w4")
    assert engine(tiny_model_dir, out, corpus, "--quant", "w4a16-gptq", "--group-size", "32") == 0
    return out


def test_w4a16_gptq_exports_a_faithful_int4_graph(w4):
    report = json.loads((w4 / "report.json").read_text())
    faithfulness = report["export_faithfulness"]
    assert faithfulness["threshold_cosine"] == 0.9999 and faithfulness["faithful"]
    assert faithfulness["quantized_onnx_vs_pytorch_fake_quant"]["cosine_min"] >= 0.9999
    weights = report["weights"]
    assert weights["bits"] == [4] and weights["methods"] == ["gptq"] and weights["group_sizes"] == [32]
    assert weights["output_error_mean"] < weights["rtn_output_error_mean"]
    graph = ir.load(w4 / "quantized.fp16.onnx").graph
    assert not [n for n in graph if n.op_type == "QuantizeLinear"]
    int4 = [n for n in graph if n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.INT4]
    assert len(int4) == 14
    stored = load_quantized(w4 / "quantized_weights.safetensors")
    down = next(n for n in int4 if "layers.1/mlp/down_proj" in n.name)
    codes = down.inputs[0].const_value.numpy().astype(np.int8)  # [K, N] for MatMul
    assert np.array_equal(codes.T, stored["model.layers.1.mlp.down_proj"].codes.numpy())


def test_w3a16_codes_fit_three_bits(tmp_path, tiny_model_dir, corpus):
    assert engine(tiny_model_dir, tmp_path, corpus, "--quant", "w3a16-rtn", "--group-size", "32") == 0
    for name, q in load_quantized(tmp_path / "quantized_weights.safetensors").items():
        assert q.bits == 3 and int(q.codes.min()) >= -4 and int(q.codes.max()) <= 3, name
    plan = json.loads((tmp_path / "quant_plan.json").read_text())
    assert {m["weight_method"] for m in plan["modules"] if m["status"] == "quantized"} == {"rtn"}
    assert json.loads((tmp_path / "report.json").read_text())["export_faithfulness"]["faithful"]


def test_w8a8_gptq_keeps_smoothquant_and_uses_the_gptq_weights(tmp_path, tiny_model_dir, corpus):
    assert engine(tiny_model_dir, tmp_path, corpus, "--quant", "w8a8-gptq", "--alpha", "0.8") == 0
    plan = json.loads((tmp_path / "quant_plan.json").read_text())
    quantized = [m for m in plan["modules"] if m["status"] == "quantized"]
    assert all(m["smoothed"] and m["input_scale"] and m["weight_method"] == "gptq" and m["weight_bits"] == 8
               for m in quantized)
    assert all(m["output_error"] <= m["rtn_output_error"] for m in quantized)
    graph = ir.load(tmp_path / "quantized.onnx").graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph) == 14  # one per quantized linear
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["export_faithfulness"]["faithful"]


@pytest.mark.parametrize("args, fragments", [
    (["--quant", "w5a16-gptq"], ["unknown QUANT 'w5a16-gptq'", "w4a16-gptq"]),
    (["--quant", "w4a16-gptq", "--group-size", "0"], ["group size", "-1"]),
    (["--quant", "w4a16-gptq", "--damp", "0"], ["damp", "0.01"]),
    (["--quant", "w4a16-gptq", "--accuracy-budget", "1"], ["--accuracy-budget", "w4a16-gptq"]),
])
def test_bad_gptq_options_fail_in_one_line(capsys, tmp_path, tiny_model_dir, corpus, args, fragments):
    out = tmp_path / "out"
    argv = ["--out", str(out), *SMALL, "--model", str(tiny_model_dir), "--calib", str(corpus), *args]
    assert_one_line_error(capsys, stages(argv), *fragments)
    assert no_artifacts(out)
