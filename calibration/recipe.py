"""The W8A8 SmoothQuant recipe applied to a model in memory: fold the factors, estimate the activation ranges,
write the plan. One code path for the quantize stage and for every tuning loop that scores a candidate."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from calibration.architectures import ArchitectureSpec
from calibration.heap import trim_heap
from calibration.plan import QuantPlan
from calibration.quant import build_plan
from calibration.ranges import estimate_ranges
from calibration.rotation import resolved_block, rotate_inputs
from calibration.smoothing import apply_factors, compute_factors, consumer_factors, layer_groups
from calibration.stats import AbsmaxObserver, decoder_layers, observe_inputs, quantizable_linears
from calibration.weight_clip import InputPower


@dataclass(frozen=True)
class Recipe:
    alphas: dict[str, float]  # smoothing group key -> alpha; empty: no smoothing
    alpha_label: float | str
    range_estimator: str = "max"
    percentile: float = 99.99
    include: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    # Block Hadamard size for the architecture's rotatable linears; 0: none; None: rotation.DEFAULT_BLOCK where it fits
    rotation_block: int | None = 0


def consumer_alphas(model: torch.nn.Module, spec: ArchitectureSpec, alphas: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}.{c}": alphas[key] for prefix, group, key in layer_groups(model, spec) if key in alphas
            for c in group.consumers}


@dataclass(frozen=True)
class Smoothed:
    factors: dict[str, torch.Tensor]  # smoothing group key -> s
    plan: QuantPlan
    input_power: dict[str, torch.Tensor] | None  # linear -> E[x_j^2] of its smoothed inputs, when asked for


@torch.no_grad()
def smooth_and_plan(model: torch.nn.Module, spec: ArchitectureSpec, absmax: dict[str, torch.Tensor], recipe: Recipe,
                    range_windows: np.ndarray, batch_size: int, float_modules: dict[str, str],
                    input_power: bool = False) -> Smoothed:
    """Smooth `model` in place; return the factors, the plan for the smoothed weights and, with input_power, every
    quantizable linear's input power on `range_windows` (weight clipping's weights, calibration/weight_clip.py)."""
    factors = compute_factors(model, spec, absmax, recipe.alphas) if recipe.alphas else {}
    input_factors = consumer_factors(model, spec, factors)
    apply_factors(model, spec, factors)
    smoothed_absmax = {n: float((a / input_factors[n]).max()) if n in input_factors else float(a.max())
                       for n, a in absmax.items()}
    rotatable = rotatable_linears(model, spec)
    block = resolved_block(recipe.rotation_block, [model.get_submodule(n).in_features for n in rotatable])
    rotated = rotatable if block else []
    rotate_inputs(model, rotated, block)
    # The calibration absmax is per channel before the rotation mixes channels: observe the rotated inputs, in the
    # same pass as the input power (each pass over the windows costs as much as a forward of them).
    linears = quantizable_linears(model, spec)
    rotated_absmax = AbsmaxObserver({n: linears[n] for n in rotated})
    power = InputPower(linears) if input_power else None
    watched = linears if power is not None else {n: linears[n] for n in rotated}

    def observe(name: str, x: torch.Tensor) -> None:
        if name in rotated:
            rotated_absmax(name, x)
        if power is not None:
            power(name, x)
        trim_heap()  # the float64 copy of x, freed among the forward's activations (SmolLM2: 1.2-2.5 GB -> 1.2 GB)

    if watched:
        observe_inputs(model, watched, range_windows, batch_size, observe,
                       " and ".join(what for what, wanted in (("ranges of the rotated inputs", rotated),
                                                              ("input power for weight clipping", power)) if wanted))
    smoothed_absmax.update({n: float(a.max()) for n, a in rotated_absmax.absmax.items()})
    ranges = estimate_ranges(model, smoothed_absmax, range_windows, recipe.range_estimator, recipe.percentile,
                             batch_size)
    plan = build_plan(linears, ranges, input_factors, consumer_alphas(model, spec, recipe.alphas), recipe.alpha_label,
                      recipe.range_estimator, recipe.include, recipe.skip, float_modules)
    modules = tuple(replace(m, rotation_block=block) if m.name in rotated else m for m in plan.modules)
    return Smoothed(factors, replace(plan, modules=modules), power.result() if power is not None else None)


def rotatable_linears(model: torch.nn.Module, spec: ArchitectureSpec) -> list[str]:
    return [f"{spec.layers}.{i}.{name}" for i, _ in decoder_layers(model, spec) for name in spec.rotatable]


def apply_rotations(model: torch.nn.Module, plan: QuantPlan) -> None:
    """Rotate the linears the plan says were rotated (the stages after quantize rebuild the smoothed model)."""
    for block in {m.rotation_block for m in plan.modules if m.rotation_block}:
        rotate_inputs(model, [m.name for m in plan.modules if m.rotation_block == block], block)
