import pytest
import torch

from calibration.smoothing import (apply_factors, compute_factors, consumer_factors, expand_to_query_heads,
                                   share_across_query_heads, smoothing_factors, uniform_alpha)
from calibration.stats import collect_input_absmax
from tests.conftest import calibrated, random_windows, tiny_model


def test_factor_formula_and_dead_channels():
    act = torch.tensor([4.0, 0.0, 9.0, 1.0])
    weight = torch.tensor([1.0, 2.0, 0.0, 4.0])
    s = smoothing_factors(act, weight, alpha=0.5)
    assert s[0] == pytest.approx(2.0)  # 4^0.5 / 1^0.5
    assert s[3] == pytest.approx(0.5)  # 1^0.5 / 4^0.5
    assert s[1] == 1.0 and s[2] == 1.0  # nothing to migrate on an all-zero channel
    assert torch.equal(smoothing_factors(act, weight, alpha=1.0)[[0, 3]], torch.tensor([4.0, 1.0]))


def test_gqa_factor_is_shared_by_query_heads_of_a_group():
    per_channel = torch.arange(4 * 3, dtype=torch.float32)  # 4 heads x head_dim 3, 2 KV heads
    shared = share_across_query_heads(per_channel, num_heads=4, num_kv_heads=2)
    assert shared.tolist() == [3.0, 4.0, 5.0, 9.0, 10.0, 11.0]
    assert expand_to_query_heads(shared, 4, 2).tolist() == [3, 4, 5, 3, 4, 5, 9, 10, 11, 9, 10, 11]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_smoothing_keeps_the_float_model_equivalent(model_type):
    model = tiny_model(model_type)
    spec, _, absmax = calibrated(model)
    ids = torch.from_numpy(random_windows(2, 48, seed=1))
    before = model(ids).logits
    factors = compute_factors(model, spec, absmax, uniform_alpha(model, spec, 0.8))
    assert len(factors) == 4 * model.config.num_hidden_layers
    assert any(f.max() > 2 for f in factors.values()), "the planted outliers should give large factors"
    apply_factors(model, spec, factors)
    after = model(ids).logits
    assert (after - before).abs().max() / before.abs().max() <= 1e-4


def test_smoothed_statistics_are_the_statistics_divided_by_the_factors():
    model = tiny_model()
    spec, linears, absmax = calibrated(model)
    factors = compute_factors(model, spec, absmax, uniform_alpha(model, spec, 0.8))
    divided = consumer_factors(model, spec, factors)
    apply_factors(model, spec, factors)
    measured = collect_input_absmax(model, linears, random_windows())
    for name, value in measured.items():
        torch.testing.assert_close(value, absmax[name] / divided[name], rtol=1e-4, atol=1e-6)


def test_smoothing_flattens_the_outlier_channels():
    model = tiny_model()
    spec, linears, absmax = calibrated(model)
    factors = compute_factors(model, spec, absmax, uniform_alpha(model, spec, 0.8))
    divided = consumer_factors(model, spec, factors)
    name = "model.layers.0.self_attn.q_proj"
    ratio_before = absmax[name].max() / absmax[name].median()
    smoothed = absmax[name] / divided[name]
    assert smoothed.max() / smoothed.median() < ratio_before / 5
