"""TensorRT builds are real or skipped with the reason; nothing here pretends an engine was built."""

import json

import numpy as np
import pytest

from trt_builder.compat import unavailable_reason

REASON = unavailable_reason()
needs_tensorrt = pytest.mark.skipif(REASON is not None, reason=f"TensorRT build impossible here: {REASON}")


@pytest.mark.tensorrt
@needs_tensorrt
def test_build_a_strongly_typed_int8_plan(tmp_path, tiny_model_dir, corpus):
    from pipeline.cli import run

    out = tmp_path / "run"
    assert run(["engine", "--model", str(tiny_model_dir), "--out", str(out), "--calib", str(corpus),
                "--calib-windows", "4", "--eval-windows", "2", "--seq-len", "32", "--require-plan"]) == 0
    manifest = json.loads((out / "model.plan.json").read_text())
    assert (out / "model.plan").stat().st_size > 0
    assert manifest["strongly_typed"] and manifest["profiles"]["prefill"]["input_ids"][2] == [4, 512]
    assert list(manifest["profiles"]) == ["prefill", "decode"]

    # The plan generates through the same loop as the FP16 graph it was built from, via pipeline.runtime.load.
    from pipeline.generation import Sampling, generate_ids
    from pipeline.runtime import load

    prompts = [[5, 17, 42], [7, 8]]
    plan_tokens = generate_ids(load(out / "model.plan"), prompts, 8, Sampling())
    onnx_tokens = generate_ids(load(out / "quantized.fp16.onnx"), prompts, 8, Sampling())
    agree = np.mean([a == b for p, o in zip(plan_tokens, onnx_tokens) for a, b in zip(p, o)])
    assert agree >= 0.75, (plan_tokens, onnx_tokens)

    # verify compared the plan with ONNX Runtime (TrtRunner), and the report lists each GEMM's precision.
    report = json.loads((out / "report.json").read_text())
    assert report["tensorrt_plan_vs_onnxruntime"]["within_tolerance"]
    assert report["tensorrt_fp16_plan_vs_onnxruntime"]["within_tolerance"]
    layers = report["tensorrt_layers"]
    assert len(layers["gemms"]) == 14 and all(g["layer"] for g in layers["gemms"])
    assert layers["not_int8"] == [], layers["not_int8"]
