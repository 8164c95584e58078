"""The running per-channel statistics of the calibration passes: their values, and buffers that exist before the
pass and are only updated in place (a result allocated during the pass fragmented glibc's heap: calibrate peaked
at 1.9-2.1 GB instead of 1.1 GB on SmolLM2 in about half the runs)."""

import pytest
import torch

from calibration import CalibrationError
from calibration.stats import AbsmaxObserver, check_finite, observe_inputs, observing, quantizable_linears
from calibration.weight_clip import InputPower
from tests.conftest import calibrated, random_windows, tiny_model


def seen_inputs(model, linears, windows) -> dict[str, torch.Tensor]:
    """Every input each linear received over the windows, [tokens, in_features]."""
    seen = {name: [] for name in linears}
    with torch.no_grad(), observing(linears, lambda name, x: seen[name].append(x.clone())):
        for start in range(0, len(windows), 2):
            model(input_ids=torch.from_numpy(windows[start : start + 2]), use_cache=False)
    return {name: torch.cat(xs) for name, xs in seen.items()}


def test_running_statistics_live_in_buffers_allocated_before_the_pass():
    model = tiny_model()
    spec, linears, _ = calibrated(model)
    windows = random_windows(6, 32, seed=3)
    absmax, power = AbsmaxObserver(linears), InputPower(linears)
    buffers = {name: (absmax.absmax[name].data_ptr(), power.sums[name].data_ptr()) for name in linears}

    def observe(name, x):
        absmax(name, x)
        power(name, x)

    observe_inputs(model, linears, windows, 2, observe, "test")  # three batches
    assert {name: (absmax.absmax[name].data_ptr(), power.sums[name].data_ptr()) for name in linears} == buffers
    for name, x in seen_inputs(model, linears, windows).items():
        assert torch.equal(absmax.absmax[name], x.abs().amax(dim=0))
        torch.testing.assert_close(power.result()[name], x.double().square().mean(dim=0).float())


def test_a_nan_input_stays_in_the_absmax_and_is_reported():
    linears = {"a": torch.nn.Linear(4, 2)}
    observer = AbsmaxObserver(linears)
    observer("a", torch.tensor([[1.0, float("nan"), -3.0, 0.5]]))
    observer("a", torch.tensor([[2.0, 1.0, 1.0, -0.25]]))
    assert observer.absmax["a"][[0, 2, 3]].tolist() == [2.0, 3.0, 0.5] and observer.absmax["a"][1].isnan()
    with pytest.raises(CalibrationError, match="NaN/Inf activations seen in calibration at the input of a"):
        check_finite(observer.absmax)


def test_a_linear_the_forward_never_calls_is_named():
    model = tiny_model()
    spec = calibrated(model)[0]
    linears = quantizable_linears(model, spec)
    unused = torch.nn.Linear(8, 8)
    observer = AbsmaxObserver({**linears, "model.unused": unused})
    observe_inputs(model, linears, random_windows(2, 16), 2, observer, "test")
    with pytest.raises(CalibrationError, match="model.unused received no input during calibration"):
        check_finite(observer.absmax)
