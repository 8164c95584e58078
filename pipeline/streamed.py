"""--low-memory: the quantize stage one decoder layer at a time (calibration/layer_stream.py).

Each layer window goes through what the in-memory stage does to the whole model: alpha choice and smoothing on
the float hidden states, ranges, integer weights; then the hidden states advance through it. GPTQ also carries
the hidden states of the already-quantized layers (its inputs), beside the float model's (its target).
The hidden states wait on disk between layers (layer_stream.HiddenStates), and so do each layer's integer weights
until the last layer is done: kept in memory they would grow by the whole model's codes (107 MB of INT8 for
SmolLM2) while the layers still run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from calibration.architectures import ArchitectureSpec
from calibration.gptq import QuantizedWeight, load_quantized, save_quantized
from calibration.layer_stream import WeightReader, advance, embed, layer_windows
from calibration.plan import QuantPlan
from calibration.recipe import smooth_and_plan
from pipeline import tuning
from pipeline.config import QuantConfig
from pipeline.weights import FLOAT_MODULES, clips_weights, integer_weights


def streamed_quantize(reader: WeightReader, spec: ArchitectureSpec, cfg: QuantConfig, absmax: dict[str, torch.Tensor],
                      calibration: np.ndarray, batch: int, scratch: Path
                      ) -> tuple[dict[str, torch.Tensor], QuantPlan, dict, dict[str, QuantizedWeight]]:
    """(smoothing factors, plan, alpha choice, integer weights), as the in-memory quantize stage makes them.
    `scratch`: an empty folder for the hidden states, and for the layers' integer weights until the end."""
    gptq = cfg.recipe.weight_method == "gptq"
    # The float model's hidden states (smoothing keeps it float-exact); GPTQ's inputs are the quantized layers'.
    hidden = embed(reader, spec, calibration, scratch / "hidden.f32", batch)
    quantized_hidden = hidden.copy(scratch / "quantized_hidden.f32") if gptq else hidden
    factors, spilled, plans, choices = {}, [], [], []
    for model in layer_windows(reader, spec, "quantizing layer by layer"):
        plan = power = None
        if cfg.recipe.int8_activations:
            alphas, choice = tuning.choose_alphas(model, None, spec, absmax, cfg, hidden, None, batch, FLOAT_MODULES)
            smoothed = smooth_and_plan(model, spec, absmax, tuning.recipe_for(cfg, alphas, cfg.alpha),
                                       hidden[: cfg.search_windows], batch, FLOAT_MODULES, clips_weights(cfg))
            factors.update(smoothed.factors)
            plan, power = smoothed.plan, smoothed.input_power
            choices.append(choice)
        float_layer = copy.deepcopy(model) if gptq else model  # GPTQ replaces the window's weights in place
        layer_weights, plan = integer_weights(model, spec, plan, cfg, quantized_hidden, batch, None,
                                              hidden if gptq else None, power)
        spilled.append(scratch / f"{len(spilled)}.safetensors")
        save_quantized(layer_weights, spilled[-1])
        plans.append(plan)
        if gptq:
            advance(model, quantized_hidden, batch)
        advance(float_layer, hidden, batch)
    del model, float_layer, layer_weights
    weights = {name: q for path in spilled for name, q in load_quantized(path).items()}
    return factors, merged_plan(plans), merged_choice(choices, cfg), weights


def merged_plan(plans: list[QuantPlan]) -> QuantPlan:
    """One plan from the layer windows' plans: their linears in layer order, the float modules once."""
    linears = tuple(m for p in plans for m in p.modules if m.status != "float")
    return QuantPlan(plans[0].recipe, plans[0].alpha, plans[0].range_estimator,
                     linears + tuple(m for m in plans[-1].modules if m.status == "float"))


def merged_choice(choices: list[dict], cfg: QuantConfig) -> dict:
    if not choices:
        return tuning.weight_only_choice(cfg)
    merged = dict(choices[0])
    if "groups" in merged:  # ALPHA=auto: one entry per smoothing group, each window adds its own
        merged["groups"] = {k: v for c in choices for k, v in c["groups"].items()}
    return merged
