"""Accuracy budget: keep the fewest activation groups in float (no Q/DQ) so that the fake-quant model stays within
a target on the holdout windows (perplexity above float, or mean KL from float); and the cost of quantizing each
group, for the report.

A unit is the set of linears that read one quantized activation tensor (q/k/v, o, gate/up, down of one layer):
they share one Q/DQ pair, so TensorRT can only keep them in float together.
Sensitivity is measured one unit at a time (that unit float, all others quantized), then units are added in order
of measured gain and the whole plan is re-scored after each addition, because the gains do not simply add up.
KL is the denser judge: it weighs every position's whole next-token distribution, where perplexity only sees the
probability of the one token that followed.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm import tqdm

from calibration.quant import QuantPlan, fake_quantized, keep_float
from calibration.smoothing import layer_groups
from pipeline.accuracy_target import Target
from pipeline.metrics import Perplexity, kl_divergence
from pipeline.tuning import batch_logits

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


class HoldoutJudge:
    """Scores the model (as it runs now) against the float model's logits on the holdout windows, kept from the
    first call: {"perplexity", "perplexity_delta_percent", "kl_mean"}."""

    def __init__(self, model: torch.nn.Module, holdout: np.ndarray, batch_size: int):
        self.model, self.holdout, self.batch_size = model, holdout, batch_size
        self.reference_logits, perplexity = [], Perplexity()
        for ids, logits in batch_logits(model, holdout, batch_size):
            self.reference_logits.append(logits)
            perplexity.add(logits, ids)
        self.reference_perplexity = perplexity.value()

    def score(self) -> dict:
        perplexity, kl_sum, positions = Perplexity(), 0.0, 0
        batches = batch_logits(self.model, self.holdout, self.batch_size)
        for (ids, logits), reference in zip(batches, self.reference_logits):
            perplexity.add(logits, ids)
            kl = kl_divergence(reference[:, :-1], logits[:, :-1], torch.float32)  # the positions perplexity scores
            kl_sum, positions = kl_sum + float(kl.sum()), positions + kl.size
        value = perplexity.value()
        return {"perplexity": value, "perplexity_delta_percent": 100 * (value / self.reference_perplexity - 1),
                "kl_mean": kl_sum / positions}


def fit_budget(model: torch.nn.Module, spec, plan: QuantPlan, holdout: np.ndarray, batch_size: int,
               target: Target, dequantized: dict[str, torch.Tensor]) -> tuple[QuantPlan, dict]:
    """`model` holds the smoothed float weights of `plan`; `dequantized` the integer weights the plan will export,
    so every candidate is judged with exactly the weights it would ship. Returns the plan with float units, and
    the evidence."""
    judge = HoldoutJudge(model, holdout, batch_size)
    units = activation_units(model, spec, plan)

    def score(float_units: list[str]) -> dict:
        reasons = {n: "accuracy budget" for u in float_units for n in units[u]}
        with fake_quantized(model, keep_float(plan, reasons), dequantized):
            return judge.score()

    quantized = score([])
    evidence = {"target": str(target), "metric": target.metric, "budget": target.value,
                "holdout_windows": len(holdout), "reference_perplexity": judge.reference_perplexity,
                "all_quantized": quantized, "unit_cost": {}, "kept_float": [], "steps": []}
    current = quantized
    if not target.met(quantized):
        gain = {}
        for unit in tqdm(units, desc=f"sensitivity per quantized activation ({target.metric})", unit="unit"):
            gain[unit] = target.of(quantized) - target.of(score([unit]))
            evidence["unit_cost"][unit] = gain[unit]
        chosen = []
        for unit in sorted(units, key=gain.get, reverse=True):
            if target.met(current) or gain[unit] <= 0:
                break
            chosen.append(unit)
            current = score(chosen)
            evidence["steps"].append({"float": unit, **current})
            log.info("budget: %s float -> holdout %s", unit, target.describe(target.of(current)))
        evidence["kept_float"] = chosen
    evidence.update(final=current, met=target.met(current))
    reasons = {n: f"accuracy budget: quantizing it costs {target.describe(evidence['unit_cost'][u])} on the holdout"
               for u in evidence["kept_float"] for n in units[u]}
    return keep_float(plan, reasons), evidence
