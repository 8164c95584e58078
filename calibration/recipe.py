"""The W8A8 SmoothQuant recipe applied to a model in memory: fold the factors, estimate the activation ranges,
write the plan. One code path for the quantize stage and for every tuning loop that scores a candidate."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from calibration.architectures import ArchitectureSpec
from calibration.quant import QuantPlan, build_plan
from calibration.ranges import estimate_ranges
from calibration.smoothing import apply_factors, compute_factors, consumer_factors, layer_groups
from calibration.stats import quantizable_linears


@dataclass(frozen=True)
class Recipe:
    alphas: dict[str, float]  # smoothing group key -> alpha; empty: no smoothing
    alpha_label: float | str
    range_estimator: str = "max"
    percentile: float = 99.99
    include: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()


def consumer_alphas(model: torch.nn.Module, spec: ArchitectureSpec, alphas: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}.{c}": alphas[key] for prefix, group, key in layer_groups(model, spec) if key in alphas
            for c in group.consumers}


@torch.no_grad()
def smooth_and_plan(model: torch.nn.Module, spec: ArchitectureSpec, absmax: dict[str, torch.Tensor], recipe: Recipe,
                    range_windows: np.ndarray, batch_size: int,
                    float_modules: dict[str, str]) -> tuple[dict[str, torch.Tensor], QuantPlan]:
    """Smooth `model` in place; return the factors (group key -> s) and the plan for the smoothed weights."""
    factors = compute_factors(model, spec, absmax, recipe.alphas) if recipe.alphas else {}
    input_factors = consumer_factors(model, spec, factors)
    apply_factors(model, spec, factors)
    smoothed_absmax = {n: float((a / input_factors[n]).max()) if n in input_factors else float(a.max())
                       for n, a in absmax.items()}
    ranges = estimate_ranges(model, smoothed_absmax, range_windows, recipe.range_estimator, recipe.percentile,
                             batch_size)
    plan = build_plan(quantizable_linears(model, spec), ranges, input_factors,
                      consumer_alphas(model, spec, recipe.alphas), recipe.alpha_label, recipe.range_estimator,
                      recipe.include, recipe.skip, float_modules)
    return factors, plan
