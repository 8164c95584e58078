"""The peak-memory estimate printed before a run: exact model sizes, --low-memory's scaling, the warning; the
stages' allocator policy."""

import os
import platform
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from calibration.data import sampling_dtype
from pipeline.cli import run
from pipeline.config import CalibrationConfig, QuantConfig, RunConfig
from pipeline.memory import ModelShape, estimate_peaks, sampling_bytes
from tests.conftest import tiny_config
from tests.pipeline.test_cli import SMALL


@pytest.mark.parametrize("tied", [False, True])
def test_parameters_are_counted_as_the_loaded_model_holds_them(tied):
    config = tiny_config()
    config.tie_word_embeddings = tied
    model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    shape = ModelShape.from_config(config, "model.layers")
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert shape.layer_parameters == sum(p.numel() for p in model.model.layers[0].parameters())


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16-gptq"])
def test_low_memory_peak_of_a_7b_model_is_a_small_fraction_of_its_weights(scheme):
    config = AutoConfig.for_model("llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    shape = ModelShape.from_config(config, "model.layers")
    assert 6.5e9 < shape.parameters < 7e9  # Llama-2-7B's shape, counted on the meta device
    whole = estimate_peaks(shape, RunConfig("m", "o", CalibrationConfig("a.txt"), QuantConfig(scheme=scheme)))
    streamed = estimate_peaks(shape, RunConfig("m", "o", CalibrationConfig("a.txt"), QuantConfig(scheme=scheme),
                                               low_memory=True))
    for stage in ("calibrate", "quantize"):
        assert whole[stage] > shape.fp32_bytes
        assert streamed[stage] < 0.25 * shape.fp32_bytes, stage
    assert streamed["export"] == whole["export"]  # export still traces the whole model: no pretence otherwise


def test_estimate_is_logged_before_the_stage_and_warns_when_memory_is_short(tmp_path, tiny_model_dir, corpus,
                                                                            caplog, monkeypatch):
    monkeypatch.setattr("pipeline.run.available_bytes", lambda: 1)
    caplog.set_level("INFO")
    argv = ["calibrate", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--calib", str(corpus), *SMALL]
    assert run(argv) == 0
    estimate = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("memory estimate:"))
    assert "calibrate" in estimate and "export" not in estimate  # only the stages about to run
    assert "try --low-memory" in caplog.text


FREED_BLOCK_SCRIPT = """
import sys
import numpy as np
from calibration.heap import trim_heap
from pipeline.memory import map_large_blocks

def rss_mb():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) / 1024

if sys.argv[1] == 'mapped':
    map_large_blocks()
block = np.ones(16 << 20, dtype=np.uint8); del block  # glibc's dynamic threshold rises to 16 MB here
before = rss_mb()
block = np.ones(8 << 20, dtype=np.uint8); del block
if sys.argv[1] == 'trimmed':
    trim_heap()
print(rss_mb() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator policy is glibc's mallopt")
def test_a_freed_activation_sized_block_goes_back_to_the_os_under_the_low_memory_policy_or_a_heap_trim():
    def retained_mb(mode: str) -> float:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", FREED_BLOCK_SCRIPT, mode], capture_output=True, text=True,
                             check=True, env=env)
        return float(out.stdout)

    assert retained_mb("default") > 6  # glibc keeps the freed 8 MB in its heap: the growth seen in quantize
    assert retained_mb("mapped") < 1
    assert retained_mb("trimmed") < 1  # what the quantize passes do per linear, keeping the default policy


@pytest.mark.parametrize("flags, mapped", [([], False), (["--low-memory"], True)])
def test_only_low_memory_runs_under_the_allocator_policy(monkeypatch, tmp_path, flags, mapped):
    """--low-memory trades speed for memory; an in-memory run keeps glibc's faster default (calibration/heap.py
    trims it where a pass fragments it). The run stops at its bad build limits, after the policy is chosen and before any stage."""
    from pipeline import cli

    calls = []
    monkeypatch.setattr("pipeline.memory.map_large_blocks", lambda: calls.append(True))
    text = tmp_path / "calib.txt"
    text.write_text("calibration text\n")
    argv = ["calibrate", "--out", str(tmp_path / "out"), "--calib", str(text), "--max-input-len", "4096", *flags]
    assert cli.run(argv) == 2
    assert calls == ([True] if mapped else [])
    assert not (tmp_path / "out" / "stages").exists()


GRAPH_SIDE = ("onnx", "onnx_ir", "onnxruntime", "polygraphy", "matplotlib")
STAGES_SCRIPT = """
import sys
from pipeline.cli import run
for stage in ("calibrate", "quantize"):
    assert run([stage, *sys.argv[1:]]) == 0
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


@pytest.mark.parametrize("flags", [[], ["--low-memory"]])
def test_calibrate_and_quantize_never_load_the_graph_side(tmp_path, tiny_model_dir, corpus, flags):
    """ONNX, ONNX Runtime, Polygraphy and matplotlib cost ~55 MB of resident memory that the stages before export
    do not use: a tenth of what --low-memory may take for SmolLM2."""
    argv = ["--model", str(tiny_model_dir), "--out", str(tmp_path), "--calib", str(corpus), *SMALL, *flags]
    out = subprocess.run([sys.executable, "-c", STAGES_SCRIPT, *argv], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert "torch" in loaded and not loaded & set(GRAPH_SIDE)


def smollm2_shape(kv_heads: int = 3) -> ModelShape:
    config = AutoConfig.for_model("llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=kv_heads, vocab_size=49152,
                                  tie_word_embeddings=True)
    return ModelShape.from_config(config, "model.layers")


def test_sampling_estimate_is_near_what_smollm2_sampling_measured():
    """SmolLM2's shape (meta device), 512 tokens, as many windows at once as SAMPLING_BATCH gives the dtype: the
    sampler peaked at 1,224 MB loading in bfloat16 and at 1,192 MB sampling in float32 (docs/RESULTS.md)."""
    shape = smollm2_shape()
    assert sampling_bytes(shape, 512, torch.bfloat16) == pytest.approx(1.224e9, rel=0.1)
    assert sampling_bytes(shape, 512, torch.float32) == pytest.approx(1.192e9, rel=0.1)


def test_synthetic_calibration_is_estimated_at_its_sampler_where_that_is_larger():
    """Without grouped KV heads and at 1,024 tokens the sampler's KV cache outweighs the statistics' activations in
    either sampling dtype; a calibration file samples nothing."""
    shape = smollm2_shape(kv_heads=9)

    def calibrate(source: str) -> float:
        config = RunConfig("m", "o", CalibrationConfig(source, seq_len=1024), QuantConfig())
        return estimate_peaks(shape, config)["calibrate"]

    sampler = sampling_bytes(shape, 1024, sampling_dtype())
    assert calibrate("a.txt") < sampler == calibrate("synthetic")
