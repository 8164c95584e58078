"""The integer weights of a plan: imported from a GPTQ checkpoint, round-to-nearest, or layer-by-layer GPTQ."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from calibration.gptq import QuantizedWeight, rtn
from calibration.heap import trim_heap
from calibration.plan import QuantPlan
from calibration.quant import select_modules, weight_only_plan
from calibration.sequential import GptqSettings, LinearOutcome, gptq_sequential
from calibration.stats import quantizable_linears
from calibration.weight_clip import clipped_int8
from pipeline.config import QuantConfig

# Kept float by default: the embedding is a lookup (no GEMM) and the vocab projection is the most sensitive GEMM.
FLOAT_MODULES = {"model.embed_tokens": "embedding lookup, kept float", "lm_head": "vocab projection, kept float"}


def clips_weights(cfg: QuantConfig) -> bool:
    """Whether integer_weights clips the round-to-nearest INT8 weights, and so needs smooth_and_plan's input power."""
    return cfg.weight_clip == "mse" and cfg.recipe.weight_method != "gptq"


def integer_weights(model, spec, plan: QuantPlan | None, cfg: QuantConfig, calibration: np.ndarray, batch: int,
                    imported: dict[str, QuantizedWeight] | None, float_calibration: np.ndarray | None = None,
                    input_power: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, QuantizedWeight], QuantPlan]:
    """Integer weights of every linear the plan quantizes (W8A8: per channel, after smoothing; weight-only: the
    plan is made here from --include/--skip): imported from a GPTQ checkpoint, or by RTN (clipped with
    --weight-clip mse, weighted by input_power: smooth_and_plan's), or by layer-by-layer GPTQ on the calibration
    windows (token ids, or a layer window's inputs with the float model's beside them in float_calibration)."""
    recipe = cfg.recipe
    int8 = recipe.int8_activations
    names = list(quantizable_linears(model, spec))
    reasons = {m.name: m.reason for m in plan.modules if m.name in names} if int8 else \
        select_modules(names, cfg.include, cfg.skip)
    selected = [n for n in names if not reasons[n]]
    # W8A8 keeps FP32 per-channel scales (its FP16 graph rounds them as before); weight-only rounds its scales to
    # FP16 first, so the FP32 graph, the FP16 graph and the GPTQ checkpoint hold the same numbers.
    settings = GptqSettings(recipe.weight_bits, -1 if int8 else cfg.group_size, cfg.damp, cfg.act_order,
                            fp16_scales=not int8, float_target=cfg.float_target)
    method = "imported" if imported is not None else recipe.weight_method
    clip_ratios: dict[str, torch.Tensor] = {}
    if imported is not None:
        outcomes = {n: imported[n] for n in selected if n in imported}
        selected = list(outcomes)
        reasons.update({n: "not quantized in the GPTQ checkpoint" for n in names if n not in imported})
    elif method == "gptq":
        outcomes = gptq_sequential(model, spec, set(selected), calibration, batch, settings, float_calibration)
    elif cfg.weight_clip == "mse":
        outcomes = {}
        for n in selected:
            outcomes[n], clip_ratios[n] = clipped_int8(model.get_submodule(n).weight, input_power[n])
            trim_heap()  # its float64 temporaries, freed between the kept codes (SmolLM2: up to +0.6 GB without)
    else:
        outcomes = {n: rtn(model.get_submodule(n).weight, settings.bits, settings.group_size, settings.fp16_scales)
                    for n in selected}
    weights = {n: o.result.weight if isinstance(o, LinearOutcome) else o for n, o in outcomes.items()}
    entries = {n: weight_fields(weights[n], method, outcomes[n], clip_ratios.get(n)) for n in selected}
    if int8:
        return weights, replace(plan, modules=tuple(replace(m, **entries.get(m.name, {})) for m in plan.modules))
    label = (f"w{recipe.weight_bits}a16: int{recipe.weight_bits} {method} weights"
             f"{' in INT4 containers' if recipe.weight_bits == 3 else ''}, group size {cfg.group_size}, "
             "activations float")
    return weights, weight_only_plan(reasons, label, entries, FLOAT_MODULES)


def weight_fields(q: QuantizedWeight, method: str, outcome, clip_ratios: torch.Tensor | None) -> dict:
    fields = {"weight_bits": q.bits, "group_size": q.group_size, "weight_method": method,
              "weight_scale_min": float(q.scales.min()), "weight_scale_max": float(q.scales.max())}
    if isinstance(outcome, LinearOutcome):
        fields.update(output_error=outcome.output_error, rtn_output_error=outcome.rtn_output_error,
                      damp=outcome.result.damp_used)
    if clip_ratios is not None:
        fields.update(clip_ratio_mean=float(clip_ratios.mean()), clipped_rows=int((clip_ratios < 1).sum()))
    return fields
