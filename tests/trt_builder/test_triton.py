"""The Triton model repository: config.pbtxt parsed with Triton's own model-config protobuf, its tensors equal to
the graph's, and refusals when the model file is missing."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest
import torch
from google.protobuf import text_format

from calibration.architectures import spec_for_model_type
from calibration.stats import quantizable_linears
from exporters.onnx_export import export_model
from pipeline.cli import run
from tests.conftest import VOCAB, tiny_model
from trt_builder import BuildError
from trt_builder.triton import model_config, write_repository

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] (test extra)")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("triton-out")
    model = tiny_model(outliers=False)
    names = list(quantizable_linears(model, spec_for_model_type("llama")))
    ir.save(export_model(model, torch.float32, 21, names), folder / "quantized.onnx")
    ir.save(export_model(model, torch.float16, 21, names), folder / "quantized.fp16.onnx")
    return folder


def parse(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_onnxruntime_repository_parses_and_matches_the_graph(out, tmp_path):
    assert run(["triton", "--out", str(out), "--repository", str(tmp_path), "--name", "tiny"]) == 0
    config = parse((tmp_path / "tiny" / "config.pbtxt").read_text())
    assert (tmp_path / "tiny" / "1" / "quantized.onnx").is_file()
    assert config.name == "tiny" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 4
    inputs = {t.name: t for t in config.input}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"] and len(inputs) == 3 + 2 * 2
    assert list(inputs["past_key_values.1.value"].dims) == [2, -1, 16]
    assert inputs["input_ids"].data_type == model_config_pb2.TYPE_INT64
    outputs = {t.name: t for t in config.output}
    assert list(outputs["logits"].dims) == [-1, VOCAB] and outputs["logits"].data_type == model_config_pb2.TYPE_FP32
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


def test_tensorrt_config_lists_both_profiles_and_fp16_tensors(out):
    from trt_builder.triton import graph_tensors

    inputs, outputs = graph_tensors(out / "quantized.fp16.onnx")
    config = parse(model_config("llm", "tensorrt", inputs, outputs, 8, ["0", "1"]))
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 8
    assert list(config.instance_group[0].profile) == ["0", "1"]
    assert {t.name: t.data_type for t in config.output}["present.0.key"] == model_config_pb2.TYPE_FP16


def test_a_missing_plan_is_refused_with_the_way_out(out, tmp_path):
    with pytest.raises(BuildError, match="did not build a plan on this machine.*--backend onnxruntime"):
        write_repository(out, tmp_path, "x", "tensorrt", 4)
    assert not (tmp_path / "x").exists()
    (out / "model.plan").write_bytes(b"\0")  # a plan whose manifest says another KV layout
    (out / "model.plan.json").write_text(json.dumps({"settings": {"limits": {"max_batch": 2}}, "profiles": {},
                                                     "decoder": {"layers": 3, "kv_heads": 2, "head_dim": 16}}))
    try:
        with pytest.raises(BuildError, match="another KV layout"):
            write_repository(out, tmp_path, "x", "tensorrt", 4)
    finally:
        (out / "model.plan").unlink()
        (out / "model.plan.json").unlink()
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.partial").exists()
