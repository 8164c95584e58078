"""The Hugging Face GPTQ checkpoint layout: exact packing, the format's zero-point convention, refusals, and the
round trip our export -> our import -> identical integer weights and scales."""

import json

import numpy as np
import pytest
import torch

from calibration.gptq import load_quantized, rtn
from exporters import ExportError
from exporters.gptq_checkpoint import (FORMAT_V1, FORMAT_V2, linear_tensors, pack_int32, read_linear,
                                       unpack_int32)
from tests.pipeline.test_cli import SMALL, assert_one_line_error, engine, stages


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", [0, 1])
def test_packing_is_exact_both_ways(bits, axis):
    values = np.random.default_rng(bits).integers(0, 1 << bits, (64, 96) if axis == 0 else (96, 64))
    words = pack_int32(values, bits, axis)
    assert words.dtype == np.int32 and words.shape[axis] == 64 * bits // 32
    assert words.flags["C_CONTIGUOUS"]  # safetensors stores raw memory: a strided view would be scrambled
    assert np.array_equal(unpack_int32(words, bits, 64, axis), values)


def test_four_bit_packing_puts_the_first_value_in_the_low_nibble():
    values = np.arange(8).reshape(8, 1)  # one column of eight 4-bit values -> one word
    assert pack_int32(values, 4, 0).view(np.uint32)[0, 0] == 0x76543210


def test_three_bit_values_straddle_words_as_a_bit_stream():
    values = np.zeros((32, 1), np.int64)
    values[10] = 0b111  # bits 30..32 of the stream: two in word 0, one in word 1
    words = pack_int32(values, 3, 0).view(np.uint32)
    assert words[:, 0].tolist() == [0b11 << 30, 0b1, 0]


def test_v1_stores_zero_minus_one_and_reads_back_symmetric():
    q = rtn(torch.randn(32, 64), 4, 32, fp16_scales=True)
    tensors = linear_tensors("lin", q)
    assert np.all(tensors["lin.qzeros"].view(np.uint32) == 0x77777777)  # zero 8 stored as 7
    back = read_linear(tensors, "lin", 4, 32, FORMAT_V1, 64, 32)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales)
    v2 = dict(tensors, **{"lin.qzeros": pack_int32(np.full((2, 32), 8), 4, 1)})
    assert torch.equal(read_linear(v2, "lin", 4, 32, FORMAT_V2, 64, 32).codes, q.codes)


def test_asymmetric_and_non_contiguous_checkpoints_are_refused():
    q = rtn(torch.randn(32, 64), 4, 32, fp16_scales=True)
    tensors = linear_tensors("lin", q)
    asymmetric = dict(tensors, **{"lin.qzeros": pack_int32(np.full((2, 32), 5), 4, 1)})
    with pytest.raises(ExportError, match="asymmetric"):
        read_linear(asymmetric, "lin", 4, 32, FORMAT_V1, 64, 32)
    shuffled = dict(tensors, **{"lin.g_idx": np.random.default_rng(0).permutation(tensors["lin.g_idx"])})
    with pytest.raises(ExportError, match="not contiguous"):
        read_linear(shuffled, "lin", 4, 32, FORMAT_V1, 64, 32)


@pytest.mark.parametrize("scheme", ["w4a16-gptq", "w3a16-gptq"])
def test_round_trip_export_import_gives_identical_integer_weights(tmp_path, tiny_model_dir, corpus, scheme):
    first, second = tmp_path / "first", tmp_path / "second"
    assert engine(tiny_model_dir, first, corpus, "--quant", scheme, "--group-size", "32") == 0
    checkpoint = first / "gptq_checkpoint"
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["sym"] and config["checkpoint_format"] == "gptq"
    assert engine(checkpoint, second, corpus, "--quant", scheme, "--group-size", "32") == 0
    ours, imported = (load_quantized(p / "quantized_weights.safetensors") for p in (first, second))
    assert ours.keys() == imported.keys() and len(ours) == 14
    for name in ours:
        assert torch.equal(ours[name].codes, imported[name].codes), name
        assert torch.equal(ours[name].scales, imported[name].scales), name
    plan = json.loads((second / "quant_plan.json").read_text())
    assert {m["weight_method"] for m in plan["modules"] if m["status"] == "quantized"} == {"imported"}


def test_importing_with_the_wrong_bit_width_is_refused(capsys, tmp_path, tiny_model_dir, corpus):
    assert engine(tiny_model_dir, tmp_path / "w4", corpus, "--quant", "w4a16-rtn", "--group-size", "32") == 0
    code = stages(["--model", str(tmp_path / "w4" / "gptq_checkpoint"), "--out", str(tmp_path / "bad"),
                   "--calib", str(corpus), *SMALL, "--quant", "w3a16-gptq"])
    assert_one_line_error(capsys, code, "4-bit GPTQ checkpoint", "QUANT=w4a16-gptq")


def test_checkpoint_dequantizes_with_the_gptq_kernels_formula():
    """Independent of our unpacker: the shift-and-mask dequantization of the AutoGPTQ torch kernel (v1: zeros + 1,
    w = scales[g_idx] * (q - zeros[g_idx])) must give back our dequantized weight."""
    q = rtn(torch.randn(48, 96), 4, 32, fp16_scales=True)
    t = {k: torch.from_numpy(v) for k, v in linear_tensors("lin", q).items()}
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    zeros = (t["lin.qzeros"].unsqueeze(2) >> shifts) & 0xF  # [G, N/8, 8]
    zeros = zeros.reshape(zeros.shape[0], -1) + 1
    codes = (t["lin.qweight"].unsqueeze(1) >> shifts[None, :, None]) & 0xF  # [K/8, 8, N]
    codes = codes.reshape(-1, codes.shape[-1])
    g_idx = t["lin.g_idx"].long()
    weight = t["lin.scales"].float()[g_idx] * (codes - zeros[g_idx]).float()  # [K, N]
    assert torch.equal(weight.T, q.dequantize())
