"""Per-group alpha search and activation range estimators: the objective is the exported arithmetic, the
choices are the argmins they claim, and the estimators clip where (and only where) clipping pays."""

import copy

import numpy as np
import pytest
import torch

from calibration import CalibrationError
from calibration.alpha_search import DEFAULT_GRID, coarse_to_fine, lowest, quantized_output_error, search_alphas
from calibration.quant import FakeQuantLinear, activation_scale
from calibration.ranges import CLIP_RATIOS, RangeObserver, clipping_errors, percentile_from_histogram
from calibration.recipe import Recipe, smooth_and_plan
from calibration.smoothing import apply_factors, compute_factors, consumer_factors, layer_groups, uniform_alpha
from calibration.stats import observing, quantizable_linears, run_windows
from tests.conftest import calibrated, random_windows, tiny_model


def test_search_objective_is_the_error_of_the_exported_arithmetic():
    """The objective for one alpha equals the error of FakeQuantLinear (what the Q/DQ graph computes) after folding."""
    model = tiny_model()
    spec, _, absmax = calibrated(model)
    inputs = {}
    hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0]))
    model(input_ids=torch.from_numpy(random_windows(2)), use_cache=False)
    hook.remove()
    x = inputs["x"].reshape(-1, inputs["x"].shape[-1])
    name = "model.layers.0.mlp.down_proj"
    original = model.get_submodule(name).weight.detach().clone()
    smoothed_model = copy.deepcopy(model)
    factors = compute_factors(smoothed_model, spec, absmax, uniform_alpha(smoothed_model, spec, 0.7))
    s = consumer_factors(smoothed_model, spec, factors)[name]
    apply_factors(smoothed_model, spec, factors)
    fake = FakeQuantLinear(smoothed_model.get_submodule(name), activation_scale(float((absmax[name] / s).max())))
    y = x @ original.T
    with torch.no_grad():
        expected = float((fake(x / s) - y).pow(2).sum() / y.pow(2).sum())
    assert quantized_output_error(x, [original], s, absmax[name]) == pytest.approx(expected, rel=1e-4)


def test_search_returns_the_argmin_for_every_group_and_smooths_the_planted_outliers():
    model = tiny_model()
    spec, _, absmax = calibrated(model)
    choices = search_alphas(model, spec, absmax, random_windows(4))
    assert set(choices) == {key for _, _, key in layer_groups(model, spec)}
    for choice in choices.values():
        assert set(choice.error_at) <= set(DEFAULT_GRID) and len(choice.error_at) <= 10
        assert choice.error == min(choice.error_at.values()) and choice.error_at[choice.alpha] == choice.error
        i = DEFAULT_GRID.index(choice.alpha)  # the choice is a minimum against both its grid neighbours
        assert set(DEFAULT_GRID[max(i - 1, 0): i + 2]) <= set(choice.error_at)
    # input_layernorm carries channels x40: migrating them into the weights must beat the weakest smoothing.
    norm = choices["model.layers.0.input_layernorm"]
    assert norm.alpha > DEFAULT_GRID[0] and norm.error < norm.error_at[DEFAULT_GRID[0]]


@pytest.mark.parametrize("minimum", range(len(DEFAULT_GRID)))
def test_coarse_to_fine_finds_the_exhaustive_argmin_of_a_single_minimum_in_fewer_evaluations(minimum):
    def curve(alpha):  # one minimum at DEFAULT_GRID[minimum], asymmetric slopes
        distance = alpha - DEFAULT_GRID[minimum]
        return 3.0 * distance if distance > 0 else -distance + 0.01 * alpha

    evaluated = []
    errors = coarse_to_fine(DEFAULT_GRID, lambda a: evaluated.append(a) or curve(a))
    assert lowest(errors) == DEFAULT_GRID[minimum] == min(DEFAULT_GRID, key=curve)
    assert len(evaluated) == len(set(evaluated)) == len(errors) <= 10
    assert all(errors[a] == curve(a) for a in errors)


def test_search_leaves_the_model_unchanged():
    model = tiny_model()
    spec, _, absmax = calibrated(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    search_alphas(model, spec, absmax, random_windows(2))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_percentile_of_a_uniform_histogram():
    counts = torch.ones(1000)
    assert percentile_from_histogram(counts, upper=2.0, percentile=99.0) == pytest.approx(1.98, abs=2e-3)
    assert percentile_from_histogram(counts, upper=2.0, percentile=100.0) == pytest.approx(2.0)


def test_mse_clips_a_heavy_tailed_tensor_but_not_a_uniform_one():
    rng = np.random.default_rng(0)
    # Student-t with 3 degrees of freedom: a tail long enough that the full range wastes INT8 levels on it.
    heavy = torch.from_numpy(rng.standard_t(3, size=20000).astype(np.float32))
    uniform = torch.from_numpy(rng.uniform(-1, 1, size=20000).astype(np.float32))
    for x, clipped in ((heavy, True), (uniform, False)):
        observer = RangeObserver("mse", float(x.abs().max()), 99.99)
        observer.observe(x)
        errors = clipping_errors(x, float(x.abs().max()), CLIP_RATIOS)
        assert observer.result() == pytest.approx(float(x.abs().max()) * CLIP_RATIOS[int(errors.argmin())])
        assert (observer.result() < float(x.abs().max())) is clipped


def test_percentile_observer_never_exceeds_the_max_and_unknown_estimators_are_refused():
    x = torch.linspace(-3, 3, 10001)
    observer = RangeObserver("percentile", 3.0, 99.0)
    observer.observe(x)
    assert 2.9 < observer.result() < 3.0
    with pytest.raises(CalibrationError, match="unknown range estimator 'entropy'"):
        RangeObserver("entropy", 1.0, 99.0)


def test_one_pass_over_the_smoothed_model_gives_rotated_ranges_and_every_input_power():
    """smooth_and_plan observes once for what the calibration statistics cannot give: the rotated inputs' absmax
    (the plan's range) and weight clipping's E[x_j^2], both of the inputs as the smoothed, rotated weights see them."""
    model = tiny_model()
    spec, _, absmax = calibrated(model)
    windows = random_windows(3)
    smoothed = smooth_and_plan(model, spec, absmax, Recipe(uniform_alpha(model, spec, 0.8), 0.8, rotation_block=16),
                               windows, 2, {}, input_power=True)
    seen = {}
    with observing(quantizable_linears(model, spec), lambda name, x: seen.setdefault(name, []).append(x)):
        run_windows(model, windows)  # one batch: an independent pass, batched differently
    inputs = {name: torch.cat(xs).double() for name, xs in seen.items()}
    assert set(smoothed.input_power) == set(inputs)
    for name, x in inputs.items():
        torch.testing.assert_close(smoothed.input_power[name], x.pow(2).mean(0).float(), rtol=1e-5, atol=0)
    rotated = [m for m in smoothed.plan.modules if m.rotation_block]
    assert {m.name.rsplit(".", 1)[-1] for m in rotated} == {"down_proj"}
    for m in rotated:
        assert m.input_absmax == pytest.approx(float(inputs[m.name].abs().max()), rel=1e-5)
    assert smooth_and_plan(tiny_model(), spec, absmax, Recipe({}, 0.0), windows, 2, {}).input_power is None
