"""GPTQ and RTN maths: error reduction on real layer inputs, group layout, static-group act-order, numerics."""

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from calibration import CalibrationError
from calibration.architectures import spec_for_model_type
from calibration.gptq import (HessianAccumulator, QuantizedWeight, code_range, float_target, gptq, group_scales,
                              load_quantized, output_error, rtn, save_quantized)
from calibration.sequential import GptqSettings, gptq_sequential
from calibration.stats import quantizable_linears
from pipeline import troubleshooting
from tests.conftest import random_windows, tiny_model


def correlated_inputs(rows=512, features=96, seed=0):
    """Inputs with correlated channels and a few large ones, like a transformer's: where GPTQ beats RTN."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g) / features**0.5
    x = torch.randn(rows, features, generator=g) @ (torch.eye(features) + 2 * mixing)
    x[:, :3] *= 20.0
    return x


def statistics(x, float_x=None):
    acc = HessianAccumulator(x.shape[1])
    acc.add(x, float_x)
    return acc


def hessian_of(x):
    return statistics(x).hessian()


def direct_error(weight, quantized, x):
    return float(((x @ (weight - quantized.dequantize()).T) ** 2).sum() / ((x @ weight.T) ** 2).sum())


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, True), (4, 32, False), (3, 32, True), (4, -1, True),
                                                       (8, -1, True)])
def test_gptq_lowers_the_layer_output_error_against_rtn(bits, group_size, act_order):
    x = correlated_inputs()
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    h = hessian_of(x)
    result = gptq(weight, h, bits, group_size, act_order=act_order, block_size=32)
    baseline = rtn(weight, bits, group_size, fp16_scales=True)
    ours, theirs = direct_error(weight, result.weight, x), direct_error(weight, baseline, x)
    assert ours < 0.8 * theirs, (ours, theirs)
    # The error computed from the sums alone is the error on the inputs themselves.
    assert output_error(weight, result.weight, statistics(x)) == pytest.approx(ours, rel=1e-6)
    lo, hi = code_range(bits)
    assert result.weight.codes.min() >= lo and result.weight.codes.max() <= hi


def test_float_target_fits_the_float_output_from_perturbed_inputs():
    """A layer whose inputs carry upstream quantization error: fitting W' to the float output W X_f from the
    perturbed inputs X beats using W itself, and output_error measures exactly ||W X_f - Q X|| / ||W X_f||."""
    float_x = correlated_inputs()
    distortion = torch.eye(96) + 0.05 * torch.randn(96, 96, generator=torch.Generator().manual_seed(3))
    x = float_x @ distortion  # a systematic error, which a linear layer can undo
    weight = torch.randn(32, 96, generator=torch.Generator().manual_seed(4))
    stats = statistics(x, float_x)

    def error(w):
        return float(((float_x @ weight.T - x @ w.T) ** 2).sum() / ((float_x @ weight.T) ** 2).sum())

    fitted = float_target(weight, stats)
    assert error(fitted) < 0.2 * error(weight)
    q = gptq(fitted, stats.hessian(), 4, 32).weight
    assert output_error(weight, q, stats) == pytest.approx(error(q.dequantize()), rel=1e-6)
    assert output_error(weight, q, stats) < output_error(weight, rtn(weight, 4, 32, True), stats)


def test_static_group_act_order_keeps_groups_contiguous_along_k():
    """Act-order permutes the visiting order, not the groups: group g is columns [g*gs, (g+1)*gs) with the scale
    fixed from the unquantized weight, which TensorRT's blocked DequantizeLinear can express."""
    x = correlated_inputs()
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    h = hessian_of(x)
    assert not torch.equal(torch.argsort(h.diagonal(), descending=True), torch.arange(96))  # a real permutation
    q = gptq(weight, h, 4, 32, act_order=True).weight
    assert q.scales.shape == (64, 3) and q.group_size == 32
    assert torch.equal(q.scales, group_scales(weight, 4, 32, fp16_scales=True))
    expanded = q.column_scales()
    for g in range(3):
        block = expanded[:, 32 * g : 32 * (g + 1)]
        assert torch.equal(block, q.scales[:, g : g + 1].expand_as(block))
    assert torch.equal(q.dequantize(), q.codes.float() * expanded)


def test_a_group_size_that_does_not_divide_k_leaves_a_shorter_last_group():
    weight = torch.randn(8, 96)
    q = rtn(weight, 4, 64, fp16_scales=False)
    assert q.scales.shape == (8, 2)
    last = weight[:, 64:].abs().amax(dim=1) / 7.5
    assert torch.allclose(q.scales[:, 1], last)
    assert (q.dequantize() - weight).abs().max() <= 0.5 * q.column_scales().max() + 1e-6


def test_rtn_int8_per_channel_is_the_w8a8_weight_rule():
    """absmax / 127 per output row (all-zero row: scale 1), codes in [-127, 127], every row's absmax hits 127."""
    weight = torch.randn(16, 48)
    weight[3] = 0.0
    q = rtn(weight, 8, -1, fp16_scales=False)
    absmax = weight.abs().amax(dim=1)
    expected = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    assert q.scales.shape == (16, 1) and torch.equal(q.scales[:, 0], expected)
    assert torch.equal(q.codes, torch.round(weight / expected[:, None]).to(torch.int8))
    nonzero = torch.arange(16) != 3
    assert torch.all(q.codes.abs().amax(dim=1)[nonzero] == 127) and torch.all(q.codes[3] == 0)


def test_degenerate_hessian_gets_more_damping_and_stays_finite():
    x = torch.randn(4, 64)  # 4 rows for 64 features: H has rank 4
    weight = torch.randn(16, 64)
    h = hessian_of(x)
    h[5, 5] = -1.0  # and one negative direction, so even 1% damping is not enough
    result = gptq(weight, h, 4, 32, damp=0.01)
    assert result.damp_used > 0.01
    assert torch.isfinite(result.weight.dequantize()).all()


def test_dead_input_features_quantize_to_zero():
    x = correlated_inputs()
    x[:, 7] = 0.0
    q = gptq(torch.randn(16, 96), hessian_of(x), 4, 32).weight
    assert torch.all(q.codes[:, 7] == 0)


def test_saved_weights_load_back_identical(tmp_path):
    q = gptq(torch.randn(16, 96), hessian_of(correlated_inputs()), 3, 32).weight
    save_quantized({"layer.w": q}, tmp_path / "w.safetensors")
    back = load_quantized(tmp_path / "w.safetensors")["layer.w"]
    assert isinstance(back, QuantizedWeight) and (back.bits, back.group_size) == (3, 32)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales)


SAVE_SCRIPT = """
import sys, torch
from calibration.gptq import rtn, save_quantized
torch.manual_seed(0)
weights = {f"model.layers.{i}.mlp.down_proj": rtn(torch.randn(8, 64), 4, 32, fp16_scales=True) for i in range(8)}
save_quantized(weights, sys.argv[1])
"""


def test_two_processes_saving_the_same_weights_write_the_same_bytes(tmp_path):
    """safetensors orders a metadata map by hash, seeded per process: two runs must not differ by it."""
    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for path in paths:
        subprocess.run([sys.executable, "-c", SAVE_SCRIPT, str(path)], check=True, cwd=Path(__file__).parents[2])
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_weights_without_their_layouts_are_refused_with_the_fix(tmp_path):
    save_file({"layer.w.codes": torch.zeros(2, 2, dtype=torch.int8)}, str(tmp_path / "old.safetensors"),
              metadata={"layer.w": "8,2"})
    with pytest.raises(CalibrationError, match="run the quantize stage again") as refused:
        load_quantized(tmp_path / "old.safetensors")
    assert troubleshooting.find(str(refused.value)) is not None  # in the README's error list


def test_sequential_gptq_beats_rtn_on_the_model_output():
    """On the calibration windows (GPTQ's objective), layer by layer and at the logits."""
    model = tiny_model()
    spec = spec_for_model_type("llama")
    names = list(quantizable_linears(model, spec))
    windows = random_windows(8, 32)
    ids = torch.from_numpy(windows)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    by_rtn = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            linear = by_rtn.get_submodule(name)
            linear.weight.copy_(rtn(linear.weight, 3, 32, True).dequantize())
        rtn_error = float(((by_rtn(input_ids=ids).logits - reference) ** 2).mean())
    original = {n: model.get_submodule(n).weight.clone() for n in names}
    outcomes = gptq_sequential(model, spec, set(names), windows, 4, GptqSettings(3, 32))
    with torch.no_grad():
        gptq_error = float(((model(input_ids=ids).logits - reference) ** 2).mean())
    assert set(outcomes) == set(names)
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)
    for name, outcome in outcomes.items():  # the model now holds exactly the dequantized GPTQ weights
        assert torch.equal(model.get_submodule(name).weight, outcome.result.weight.dequantize())
        assert not torch.equal(original[name], model.get_submodule(name).weight)
    assert np.mean([o.output_error < o.rtn_output_error for o in outcomes.values()]) == 1.0
