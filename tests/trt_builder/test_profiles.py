"""Prefill and decode profiles: consistent dimension ranges, limits refused when contradictory, and every
profile's min and max shapes actually run through the decoder graph in ONNX Runtime. Also the plan manifest
check that refuses a plan built for another TensorRT or GPU."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from calibration.architectures import spec_for_model_type
from calibration.stats import quantizable_linears
from exporters.decoder_io import IDS, MASK, DecoderShape
from exporters.onnx_export import export_model
from pipeline.runtime import OnnxDecoder
from tests.conftest import VOCAB, tiny_model
from trt_builder import BuildError
from trt_builder.build import graph_decoder_shape
from trt_builder.profiles import Limits, check_consistent, decoder_profiles
from trt_builder.runtime import check_compatible

LIMITS = Limits(max_batch=3, max_input_len=16, max_seq_len=24)


@pytest.fixture(scope="module")
def decoder_path(tmp_path_factory):
    model = tiny_model(outliers=False)
    path = tmp_path_factory.mktemp("profiles") / "decoder.onnx"
    names = list(quantizable_linears(model, spec_for_model_type("llama")))
    ir.save(export_model(model, torch.float32, 21, names), path)
    return path


def test_profiles_follow_the_limits_and_the_graph(decoder_path):
    shape = graph_decoder_shape(decoder_path)
    assert shape == DecoderShape(layers=2, kv_heads=2, head_dim=16)
    profiles = decoder_profiles(shape, LIMITS)
    prefill, decode = profiles["prefill"], profiles["decode"]
    assert prefill[IDS] == [(1, 1), (2, 8), (3, 16)]
    assert prefill[MASK] == [(1, 2), (2, 9), (3, 17)]  # one reserved past slot + the prompt
    assert decode[IDS] == [(1, 1), (2, 1), (3, 1)]
    assert decode[shape.past_names[-1]] == [(1, 2, 1, 16), (2, 2, 12, 16), (3, 2, 24, 16)]
    assert decode[MASK][-1] == (3, 25)


def test_inconsistent_profiles_and_limits_are_refused(decoder_path):
    shape = graph_decoder_shape(decoder_path)
    profile = decoder_profiles(shape, LIMITS)["decode"]
    profile[shape.past_names[1]] = [(1, 2, 1, 16), (2, 2, 11, 16), (3, 2, 24, 16)]
    with pytest.raises(BuildError, match="sharing 'past_sequence' disagree"):
        check_consistent(shape, profile, "decode")
    with pytest.raises(BuildError, match="MAX_INPUT_LEN 64 exceeds MAX_SEQ_LEN 32"):
        Limits(max_batch=1, max_input_len=64, max_seq_len=32)
    with pytest.raises(BuildError, match="must be positive"):
        Limits(max_batch=0)


def test_every_profile_edge_runs_in_onnx_runtime(decoder_path):
    engine = OnnxDecoder(decoder_path)
    rng = np.random.default_rng(0)
    for name, profile in decoder_profiles(engine.shape, LIMITS).items():
        for point in (0, 2):  # min and max
            batch, new = profile[IDS][point]
            past = profile[engine.shape.past_names[0]][point][2]
            feed = {IDS: rng.integers(0, VOCAB, (batch, new)), MASK: np.ones(profile[MASK][point], np.int64),
                    "position_ids": np.tile(np.arange(past, past + new), (batch, 1))}
            feed[MASK][:, 0] = 0  # the reserved slot
            feed.update({n: rng.standard_normal(profile[n][point]).astype(np.float32) for n in engine.shape.past_names})
            outputs = engine.session.run(None, feed)
            assert outputs[0].shape == (batch, new, VOCAB), (name, point)
            assert outputs[1].shape == (batch, 2, past + new, 16)
            assert np.isfinite(outputs[0]).all()


def test_a_plan_for_another_tensorrt_or_gpu_is_refused():
    manifest = {"tensorrt_version": "10.16.0", "gpu_compute_capability": "9.0"}
    check_compatible(manifest, "10.16.1", "9.0")  # same major.minor and GPU: accepted
    with pytest.raises(BuildError, match="built for TensorRT 10.16.0 on compute capability 9.0.*TensorRT 11.1.0"):
        check_compatible(manifest, "11.1.0", "9.0")
    with pytest.raises(BuildError, match="this machine has TensorRT 10.16.0 on compute capability 8.9"):
        check_compatible(manifest, "10.16.0", "8.9")
