"""Per-tensor static activation ranges: which absmax the INT8 scale maps to 127.

- max: the calibration absmax (the spine's choice; never clips).
- percentile: the q-th percentile of |x| (clips the rare tail; TensorRT's and Model Optimizer's percentile
  calibrators), from a streaming histogram over [0, absmax].
- mse: the clipping ratio of the absmax minimising the squared error of Q/DQ(x) against x (Model Optimizer's
  and Banner et al.'s MSE calibration), accumulated per ratio over the windows.
All three observe the smoothed activations x / s, so they run after the smoothing factors are folded.
"""

from __future__ import annotations

import numpy as np
import torch

from calibration import CalibrationError
from calibration.quant import activation_scale, fake_quant_activation
from calibration.stats import observe_inputs

ESTIMATORS = ("max", "percentile", "mse")
HISTOGRAM_BINS = 4096
CLIP_RATIOS = tuple(round(float(r), 2) for r in np.linspace(0.05, 1.0, 20))


def percentile_from_histogram(counts: torch.Tensor, upper: float, percentile: float) -> float:
    """Right edge of the first bin where the cumulative count reaches `percentile` % of all values."""
    cumulative = torch.cumsum(counts.double(), 0)
    target = cumulative[-1] * percentile / 100.0
    index = int(torch.searchsorted(cumulative, target))
    return upper * (index + 1) / counts.numel()


def clipping_errors(x: torch.Tensor, absmax: float, ratios: tuple[float, ...]) -> torch.Tensor:
    """Sum of squared Q/DQ error of x for each candidate range ratio * absmax."""
    x = x.float()
    return torch.tensor([float((fake_quant_activation(x, activation_scale(absmax * r)) - x).pow(2).sum())
                         for r in ratios], dtype=torch.float64)


class RangeObserver:
    """Streams one quantized tensor's smoothed inputs and returns the absmax its INT8 scale should use."""

    def __init__(self, estimator: str, absmax: float, percentile: float):
        if estimator not in ESTIMATORS:
            raise CalibrationError(f"unknown range estimator '{estimator}': choose one of {', '.join(ESTIMATORS)}")
        self.estimator, self.absmax, self.percentile = estimator, absmax, percentile
        self.counts = torch.zeros(HISTOGRAM_BINS, dtype=torch.float64)
        self.errors = torch.zeros(len(CLIP_RATIOS), dtype=torch.float64)

    def observe(self, x: torch.Tensor) -> None:
        if self.estimator == "percentile":
            self.counts += torch.histc(x.abs().float(), HISTOGRAM_BINS, 0.0, self.absmax).double()
        elif self.estimator == "mse":
            self.errors += clipping_errors(x, self.absmax, CLIP_RATIOS)

    def result(self) -> float:
        if self.estimator == "percentile" and self.counts.sum() > 0:
            return min(self.absmax, percentile_from_histogram(self.counts, self.absmax, self.percentile))
        if self.estimator == "mse" and self.errors.sum() > 0:
            return self.absmax * CLIP_RATIOS[int(torch.argmin(self.errors))]
        return self.absmax


@torch.no_grad()
def estimate_ranges(model: torch.nn.Module, absmax: dict[str, float], windows: np.ndarray, estimator: str,
                    percentile: float, batch_size: int) -> dict[str, float]:
    """Linear name -> range for its input, observing the (already smoothed) model on `windows`.

    `absmax` holds each tensor's smoothed calibration absmax, the upper bound of every estimator.
    """
    observers = {name: RangeObserver(estimator, value, percentile) for name, value in absmax.items()}
    if estimator == "max":
        return {name: o.result() for name, o in observers.items()}

    linears = {name: model.get_submodule(name) for name in observers}
    observe_inputs(model, linears, windows, batch_size, lambda name, x: observers[name].observe(x),
                   f"{estimator} ranges")
    return {name: o.result() for name, o in observers.items()}
