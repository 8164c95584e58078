"""Choosing the SmoothQuant alphas: one global value, a per-group search, or a global grid scored by perplexity
of the PyTorch fake-quant simulation on the holdout windows (calibration source, never the evaluation text)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm import tqdm

from calibration.alpha_search import search_alphas
from calibration.quant import fake_quantized
from calibration.recipe import Recipe, smooth_and_plan
from calibration.smoothing import uniform_alpha
from pipeline.config import QuantConfig
from pipeline.metrics import Perplexity

log = logging.getLogger(__name__)


@torch.no_grad()
def batch_logits(model: torch.nn.Module, windows: np.ndarray, batch_size: int):
    """(token ids, logits) of the model (as it runs now) for each batch of `windows`."""
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size]
        yield ids, model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


def torch_perplexity(model: torch.nn.Module, windows: np.ndarray, batch_size: int) -> float:
    perplexity = Perplexity()
    for ids, logits in batch_logits(model, windows, batch_size):
        perplexity.add(logits, ids)
    return perplexity.value()


def recipe_for(cfg: QuantConfig, alphas: dict[str, float], label: float | str) -> Recipe:
    return Recipe(alphas if cfg.smooth else {}, label, cfg.range_estimator, cfg.percentile, cfg.include, cfg.skip,
                  cfg.rotation_block)


def weight_only_choice(cfg: QuantConfig) -> dict:
    return {"mode": "none", "reason": f"{cfg.scheme} is weight-only: no smoothing"}


def choose_alphas(model: torch.nn.Module, fresh_model, spec, absmax: dict[str, torch.Tensor], cfg: QuantConfig,
                  calibration: np.ndarray, holdout: np.ndarray, batch_size: int,
                  float_modules: dict[str, str]) -> tuple[dict[str, float], dict]:
    """Group key -> alpha, and what the choice was based on (for the manifest and the report).

    `model` is the unsmoothed FP32 model and is left unchanged; `fresh_model()` returns another copy, which the
    grid smooths once per candidate.
    """
    if not cfg.smooth:
        return {}, {"mode": "off"}
    if not isinstance(cfg.alpha, str):
        return uniform_alpha(model, spec, cfg.alpha), {"mode": "global", "alpha": cfg.alpha}
    search = calibration[: cfg.search_windows]
    if cfg.alpha == "auto":
        choices = search_alphas(model, spec, absmax, search)
        return ({k: c.alpha for k, c in choices.items()},
                {"mode": "auto", "objective": "relative W8A8 output error of each group's linears",
                 "tokens": int(search.shape[0] * search.shape[1]), "groups": {k: {"alpha": c.alpha, "error": c.error,
                                                            "error_at": c.error_at} for k, c in choices.items()}})
    reference = torch_perplexity(model, holdout, batch_size)
    scores = {}
    for alpha in tqdm(cfg.alpha_grid, desc="scoring alpha grid on holdout", unit="alpha"):
        candidate = fresh_model()
        plan = smooth_and_plan(candidate, spec, absmax, recipe_for(cfg, uniform_alpha(candidate, spec, alpha), alpha),
                               search, batch_size, float_modules).plan
        with fake_quantized(candidate, plan):
            scores[alpha] = torch_perplexity(candidate, holdout, batch_size)
        log.info("alpha %.2f: holdout perplexity %.4f (%+.2f%%)", alpha, scores[alpha], 100 * (scores[alpha] / reference - 1))
    best = min(scores, key=scores.get)
    return uniform_alpha(model, spec, best), {"mode": "grid", "alpha": best, "holdout_reference_perplexity": reference,
                                              "holdout_perplexity": scores, "holdout_windows": len(holdout)}
