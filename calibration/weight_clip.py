"""Per-output-channel clipping of INT8 weights: the scale of each row maps ratio * max|w| to 127 instead of max|w|,
with the ratio chosen to minimise the row's output error on calibration inputs.

For one row w and inputs x, E[(x . (w - q))^2] ~ sum_j E[x_j^2] (w_j - q_j)^2 when channels are uncorrelated (the
diagonal of GPTQ's Hessian). Weighting by E[x_j^2] matters after smoothing: the weight columns that absorbed an
outlier channel are the largest in their rows, and clipping them would undo the smoothing; an unweighted MSE
search (Model Optimizer's and Banner et al.'s weight MSE) would clip exactly those.
"""

from __future__ import annotations

import torch

from calibration.gptq import QuantizedWeight, code_range, group_scales, quantize_columns

CLIP_RATIOS = tuple(round(1.0 - 0.02 * i, 2) for i in range(26))  # 1.00 .. 0.50


@torch.no_grad()
def clipping_errors(weight: torch.Tensor, input_power: torch.Tensor, ratios: tuple[float, ...]) -> torch.Tensor:
    """[rows, ratios]: sum_j input_power_j (w_j - Q(w_j))^2 of every row at every clipping ratio (INT8, symmetric)."""
    w = weight.double()
    base = group_scales(weight, 8, -1, fp16_scales=False).double()  # [rows, 1]
    power = input_power.double()
    lo, hi = code_range(8)
    errors, diff = [], torch.empty_like(w)
    for r in ratios:  # in one buffer: the weight-sized temporaries, not the arithmetic, are what this costs
        torch.div(w, base * r, out=diff).round_().clamp_(lo, hi).mul_(base).mul_(r).sub_(w)
        errors.append(diff.square_().mul_(power).sum(dim=1))
    return torch.stack(errors, dim=1)


@torch.no_grad()
def clipped_int8(weight: torch.Tensor, input_power: torch.Tensor,
                 ratios: tuple[float, ...] = CLIP_RATIOS) -> tuple[QuantizedWeight, torch.Tensor]:
    """Per-channel INT8 weight with each row's best clipping ratio, and the ratios chosen (1.0: no clipping wins
    ties, so a row is only clipped when that measurably lowers its error)."""
    errors = clipping_errors(weight, input_power, ratios)
    best = torch.tensor(ratios, dtype=torch.float64)[errors.argmin(dim=1)]
    scales = (group_scales(weight, 8, -1, fp16_scales=False).double() * best[:, None]).float()
    codes = quantize_columns(weight.float(), scales, 8)
    return QuantizedWeight(codes.to(torch.int8), scales, 8, weight.shape[1]), best.float()


class InputPower:
    """observe(name, x) for observe_inputs: E[x_j^2] per input channel of each of `linears`' (smoothed, float)
    inputs. Its sums are allocated before the pass and added to in place (calibration.stats.AbsmaxObserver: why)."""

    def __init__(self, linears: dict[str, torch.nn.Linear]):
        self.sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
        self.rows = dict.fromkeys(linears, 0)

    def __call__(self, name: str, x: torch.Tensor) -> None:
        self.sums[name] += x.double().square_().sum(dim=0)
        self.rows[name] += x.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        return {n: (total / self.rows[n]).float() for n, total in self.sums.items() if self.rows[n]}
