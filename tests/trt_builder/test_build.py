"""TensorRT builds are real or skipped with the reason; nothing here pretends an engine was built."""

import json

import pytest

from trt_builder.build import prefill_profile
from trt_builder.compat import unavailable_reason

REASON = unavailable_reason()
needs_tensorrt = pytest.mark.skipif(REASON is not None, reason=f"TensorRT build impossible here: {REASON}")


def test_prefill_profile_spans_one_token_to_the_limits():
    profile = prefill_profile(max_batch=8, max_seq_len=1024)
    assert profile.min_shape == (1, 1) and profile.max_shape == (8, 1024)
    assert profile.min_shape <= profile.opt_shape <= profile.max_shape


@pytest.mark.tensorrt
@needs_tensorrt
def test_build_a_strongly_typed_int8_plan(tmp_path, tiny_model_dir, corpus):
    from pipeline.cli import run

    out = tmp_path / "run"
    assert run(["engine", "--model", str(tiny_model_dir), "--out", str(out), "--calib", str(corpus),
                "--calib-windows", "4", "--eval-windows", "2", "--seq-len", "32", "--require-plan"]) == 0
    manifest = json.loads((out / "model.plan.json").read_text())
    assert (out / "model.plan").stat().st_size > 0
    assert manifest["strongly_typed"] and manifest["profiles"][0]["input_ids"]["max_shape"] == [4, 512]
