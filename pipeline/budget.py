"""Accuracy budget: keep the fewest activation groups in float (no Q/DQ) so that the fake-quant model stays within
a target on the holdout windows (perplexity above float, or mean KL from float); and the cost of quantizing each
group, for the report.

A unit is the set of linears that read one quantized activation tensor (q/k/v, o, gate/up, down of one layer):
they share one Q/DQ pair, so TensorRT can only keep them in float together.
Sensitivity is measured one unit at a time (that unit float, all others quantized), then units are added in order
of measured gain and the whole plan is re-scored after each addition, because the gains do not simply add up.

The gain that orders the units is always the KL one: KL weighs every position's whole next-token distribution, where
perplexity only sees the probability of the one token that followed, and only KL transfers from the holdout to the
evaluation text (SmolLM2, docs/TUNING.md: the unit with the largest holdout perplexity gain, kept float alone, moved
the evaluation from +1.24% to +1.63%). A perplexity target is held to its one-sided 95% upper bound over the holdout
windows, not to the point value: W8A8 perplexity deltas of a few tenths of a percent are within the spread between
texts, so the point value alone certified +0.99% on 4 holdout windows that evaluated at +1.24%.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm import tqdm

from calibration.gptq import QuantizedWeight
from calibration.plan import QuantPlan
from calibration.quant import fake_quantized, keep_float
from calibration.smoothing import layer_groups
from pipeline.accuracy_target import METRICS, PERPLEXITY_BOUND, Target
from pipeline.metrics import Perplexity, kl_divergence
from pipeline.tuning import batch_logits

log = logging.getLogger(__name__)

Z_ONE_SIDED_95 = 1.645


def activation_units(model: torch.nn.Module, spec, plan: QuantPlan) -> dict[str, tuple[str, ...]]:
    """Unit name (the producer of the shared input) -> its quantized linears."""
    quantized = {m.name for m in plan.quantized()}
    units = {}
    for prefix, group, key in layer_groups(model, spec):
        names = tuple(f"{prefix}.{c}" for c in group.consumers if f"{prefix}.{c}" in quantized)
        if names:
            units[key] = names
    return units


def add_windows(perplexity: Perplexity, logits: np.ndarray, ids: np.ndarray) -> list[float]:
    """Adds a batch to `perplexity` window by window; returns each window's mean next-token NLL."""
    return [perplexity.add(logits[i : i + 1], ids[i : i + 1]) for i in range(len(ids))]


def perplexity_delta_bound(candidate_nll: np.ndarray, reference_nll: np.ndarray) -> float:
    """One-sided 95% upper bound of the perplexity delta (percent) from per-window mean NLLs: the windows are equally
    long, so the mean of their NLL differences is the log perplexity ratio, and their spread its standard error."""
    diff = candidate_nll - reference_nll
    spread = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.inf
    return 100 * float(np.expm1(diff.mean() + Z_ONE_SIDED_95 * spread))


class HoldoutJudge:
    """Scores the model (as it runs now) against the float model's logits on the holdout windows, kept from the
    first call: {"perplexity", "perplexity_delta_percent", PERPLEXITY_BOUND, "kl_mean"}."""

    def __init__(self, model: torch.nn.Module, holdout: np.ndarray, batch_size: int):
        self.model, self.holdout, self.batch_size = model, holdout, batch_size
        self.reference_logits, perplexity, nll = [], Perplexity(), []
        for ids, logits in batch_logits(model, holdout, batch_size):
            self.reference_logits.append(logits)
            nll += add_windows(perplexity, logits, ids)
        self.reference_perplexity, self.reference_nll = perplexity.value(), np.array(nll)

    def score(self) -> dict:
        perplexity, kl_sum, positions, nll = Perplexity(), 0.0, 0, []
        batches = batch_logits(self.model, self.holdout, self.batch_size)
        for (ids, logits), reference in zip(batches, self.reference_logits):
            nll += add_windows(perplexity, logits, ids)
            kl = kl_divergence(reference[:, :-1], logits[:, :-1], np.float32)  # the positions perplexity scores
            kl_sum, positions = kl_sum + float(kl.sum()), positions + kl.size
        value = perplexity.value()
        return {"perplexity": value, "perplexity_delta_percent": 100 * (value / self.reference_perplexity - 1),
                PERPLEXITY_BOUND: perplexity_delta_bound(np.array(nll), self.reference_nll),
                "kl_mean": kl_sum / positions}


def judged_key(target: Target) -> str:
    """What the budget holds to the target: mean KL as measured, a perplexity delta by its upper bound."""
    return PERPLEXITY_BOUND if target.metric == "ppl" else METRICS[target.metric]


def fit_budget(model: torch.nn.Module, spec, plan: QuantPlan, holdout: np.ndarray, batch_size: int,
               target: Target, weights: dict[str, QuantizedWeight]) -> tuple[QuantPlan, dict]:
    """`model` holds the smoothed float weights of `plan`; `weights` the integer weights the plan will export,
    so every candidate is judged with exactly the weights it would ship. Returns the plan with float units, and
    the evidence."""
    judge = HoldoutJudge(model, holdout, batch_size)
    units = activation_units(model, spec, plan)

    def score(float_units: list[str]) -> dict:
        reasons = {n: "accuracy budget" for u in float_units for n in units[u]}
        with fake_quantized(model, keep_float(plan, reasons), weights):
            return judge.score()

    quantized, key = score([]), judged_key(target)
    evidence = {"target": str(target), "metric": target.metric, "budget": target.value,
                "holdout_windows": len(holdout), "reference_perplexity": judge.reference_perplexity,
                "judged_by": key,
                "all_quantized": quantized, "unit_cost": {}, "unit_kl_cost": {}, "kept_float": [], "steps": []}
    current = quantized
    if not target.met(quantized, key):
        gain = {}
        for unit in tqdm(units, desc="sensitivity per quantized activation", unit="unit"):
            alone = score([unit])
            gain[unit] = quantized["kl_mean"] - alone["kl_mean"]
            evidence["unit_kl_cost"][unit] = gain[unit]
            evidence["unit_cost"][unit] = target.of(quantized) - target.of(alone)
        chosen = []
        for unit in sorted(units, key=gain.get, reverse=True):
            if target.met(current, key) or gain[unit] <= 0:
                break
            chosen.append(unit)
            current = score(chosen)
            evidence["steps"].append({"float": unit, **current})
            log.info("budget: %s float -> holdout %s (judged %s)", unit, target.describe(target.of(current)),
                     target.describe(current[key]))
        evidence["kept_float"] = chosen
    evidence.update(final=current, met=target.met(current, key))
    reasons = {n: f"accuracy budget: quantizing it costs {target.describe(evidence['unit_cost'][u])} on the holdout"
               for u in evidence["kept_float"] for n in units[u]}
    return keep_float(plan, reasons), evidence
