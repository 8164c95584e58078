"""Outlier and scale analysis: how SmoothQuant moved the difficulty from activations to weights (Xiao et al.,
2022, fig. 4), per linear, from the channel absmax saved by the layer-wise diff (no recalibration).

"before": the reference graph (activations and weights as trained); "after": the Q/DQ graph (smoothed
activations as its Q nodes read them, smoothed weights as its DequantizeLinear gives them; for a rotated linear
both are in the rotated basis, calibration/rotation.py).
"""

from __future__ import annotations

import numpy as np

from exporters.probes import layer_of

TOP_CHANNELS = 5


def max_median_ratio(absmax: np.ndarray) -> float:
    """How far the largest channel stands above a typical one: what a per-tensor INT8 scale must cover."""
    return float(absmax.max() / max(float(np.median(absmax)), 1e-12))


def role_of(module: str) -> str:
    """'model.layers.3.mlp.down_proj' -> 'mlp.down_proj'."""
    return module[len(layer_of(module)) + 1:]


def outlier_rows(channels: dict[str, np.ndarray], modules: list[str]) -> list[dict]:
    rows = []
    for m in modules:
        act_before, act_after = channels[f"{m}/activation_before"], channels[f"{m}/activation_after"]
        top = np.argsort(-act_before)[:TOP_CHANNELS]
        rows.append({
            "module": m, "layer": layer_of(m), "role": role_of(m),
            "activation_absmax_before": float(act_before.max()), "activation_absmax_after": float(act_after.max()),
            "activation_max_median_before": max_median_ratio(act_before),
            "activation_max_median_after": max_median_ratio(act_after),
            "weight_max_median_before": max_median_ratio(channels[f"{m}/weight_before"]),
            "weight_max_median_after": max_median_ratio(channels[f"{m}/weight_after"]),
            "top_channels": [{"channel": int(c), "before": float(act_before[c]), "after": float(act_after[c])}
                             for c in top],
        })
    return rows


def worst_module(rows: list[dict]) -> str:
    """The linear whose input had the most extreme outlier before smoothing."""
    return max(rows, key=lambda r: r["activation_max_median_before"])["module"]
