"""--low-memory through the CLI: the calibrate and quantize stages, one layer at a time, save what the in-memory
stages save."""

import json

import pytest
import torch

from calibration.gptq import load_quantized
from pipeline.cli import run
from tests.pipeline.test_cli import SMALL


def quantized(model_dir, out, corpus, scheme, *extra):
    for stage in ("calibrate", "quantize"):
        argv = [stage, "--model", str(model_dir), "--out", str(out), "--calib", str(corpus), "--quant", scheme]
        assert run(argv + SMALL + list(extra)) == 0
    return json.loads((out / "quant_plan.json").read_text()), load_quantized(out / "quantized_weights.safetensors")


@pytest.mark.parametrize("scheme, extra", [("w8a8", ()), ("w4a16-gptq", ()), ("w8a8", ("--rotate-block", "16"))])
def test_low_memory_plan_and_integer_weights_equal_the_in_memory_ones(tmp_path, tiny_model_dir, corpus, scheme,
                                                                      extra):
    plan, weights = quantized(tiny_model_dir, tmp_path / "whole", corpus, scheme, *extra)
    streamed_plan, streamed_weights = quantized(tiny_model_dir, tmp_path / "streamed", corpus, scheme, "--low-memory",
                                                *extra)
    assert streamed_plan == plan  # every entry: names, alphas, ranges, scales, GPTQ output errors
    assert set(streamed_weights) == set(weights)
    for name, q in weights.items():
        assert torch.equal(streamed_weights[name].codes, q.codes), name
        assert torch.equal(streamed_weights[name].scales, q.scales), name
    manifest = json.loads((tmp_path / "streamed" / "manifest.json").read_text())
    assert manifest["config"]["low_memory"] is True
    assert not list((tmp_path / "streamed").glob(".*"))  # the layers' spilled weights are gone with the stage
