"""Accuracy budget: keep the fewest activation groups in float (no Q/DQ) so that the fake-quant perplexity on the
holdout windows stays within the budget; and the cost of quantizing each group, for the report.

A unit is the set of linears that read one quantized activation tensor (q/k/v, o, gate/up, down of one layer):
they share one Q/DQ pair, so TensorRT can only keep them in float together.
Sensitivity is measured one unit at a time (that unit float, all others quantized), then units are added in order
of measured gain and the whole plan is re-scored after each addition, because the gains do not simply add up.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm import tqdm

from calibration.quant import QuantPlan, fake_quantized, keep_float
from calibration.smoothing import layer_groups
from pipeline.tuning import torch_perplexity

log = logging.getLogger(__name__)


def activation_units(model: torch.nn.Module, spec, plan: QuantPlan) -> dict[str, tuple[str, ...]]:
    """Unit name (the producer of the shared input) -> its quantized linears."""
    quantized = {m.name for m in plan.quantized()}
    units = {}
    for prefix, group, key in layer_groups(model, spec):
        names = tuple(f"{prefix}.{c}" for c in group.consumers if f"{prefix}.{c}" in quantized)
        if names:
            units[key] = names
    return units


def fit_budget(model: torch.nn.Module, spec, plan: QuantPlan, holdout: np.ndarray, batch_size: int,
               budget_percent: float) -> tuple[QuantPlan, dict]:
    """`model` holds the smoothed float weights of `plan`. Returns the plan with float units, and the evidence."""
    reference = torch_perplexity(model, holdout, batch_size)
    limit = reference * (1 + budget_percent / 100)
    units = activation_units(model, spec, plan)

    def score(float_units: list[str]) -> float:
        reasons = {n: "accuracy budget" for u in float_units for n in units[u]}
        with fake_quantized(model, keep_float(plan, reasons)):
            return torch_perplexity(model, holdout, batch_size)

    quantized = score([])
    evidence = {"budget_percent": budget_percent, "holdout_windows": len(holdout), "reference_perplexity": reference,
                "all_quantized_perplexity": quantized, "unit_cost_percent": {}, "kept_float": [], "steps": []}
    if quantized <= limit:
        evidence.update(final_perplexity=quantized, met=True)
        return plan, evidence
    gain = {}
    for unit in tqdm(units, desc="sensitivity per quantized activation", unit="unit"):
        gain[unit] = quantized - score([unit])
        evidence["unit_cost_percent"][unit] = 100 * gain[unit] / reference
    chosen, current = [], quantized
    for unit in sorted(units, key=gain.get, reverse=True):
        if current <= limit or gain[unit] <= 0:
            break
        chosen.append(unit)
        current = score(chosen)
        evidence["steps"].append({"float": unit, "perplexity": current, "delta_percent": 100 * (current / reference - 1)})
        log.info("budget: %s float -> holdout perplexity %.4f (%+.2f%%)", unit, current, 100 * (current / reference - 1))
    evidence.update(kept_float=chosen, final_perplexity=current, met=current <= limit)
    reasons = {n: f"accuracy budget: quantizing it costs {evidence['unit_cost_percent'][u]:+.2f}% holdout perplexity"
               for u in chosen for n in units[u]}
    return keep_float(plan, reasons), evidence
