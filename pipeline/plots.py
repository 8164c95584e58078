"""Report figures as PNG bytes (matplotlib, no display needed)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # file output only: never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _values(xs) -> list[float]:
    """None (an exact match: no error, so no finite SNR) plots as a gap."""
    return [np.nan if x is None else x for x in xs]


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def ratio_by_layer(rows: list[dict], quantity: str, title: str) -> bytes:
    """Max/median channel ratio of `quantity` ('activation' or 'weight') per layer, one line per linear role,
    before (solid) and after smoothing (dashed)."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, role in enumerate(dict.fromkeys(r["role"] for r in rows)):
        mine = [r for r in rows if r["role"] == role]
        x = range(len(mine))
        color = f"C{i}"
        ax.plot(x, [r[f"{quantity}_max_median_before"] for r in mine], color=color, label=f"{role} before")
        ax.plot(x, [r[f"{quantity}_max_median_after"] for r in mine], color=color, linestyle="--",
                label=f"{role} after")
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("channel absmax: max / median")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _png(fig)


def channel_profile(module: str, channels: dict[str, np.ndarray]) -> bytes:
    """Per input channel absmax of one linear's activation and weight, before and after smoothing."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, quantity in zip(axes, ("activation", "weight")):
        ax.plot(channels[f"{module}/{quantity}_before"], label="before", linewidth=0.8)
        ax.plot(channels[f"{module}/{quantity}_after"], label="after smoothing", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("input channel")
        ax.set_ylabel("absmax")
        ax.set_title(f"{module}: {quantity}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _png(fig)


def error_by_layer(layerwise: dict) -> bytes:
    """Local SNR of every quantized GEMM (where error enters) and the residual stream's SNR per block (where it
    has grown to), in execution order."""
    fig, ax = plt.subplots(figsize=(9, 4))
    gemms = layerwise["gemms"]
    ax.plot(range(len(gemms)), _values(g["local_snr_db"] for g in gemms), ".", markersize=4, label="GEMM local SNR")
    ax.plot(range(len(gemms)), _values(g["output_snr_db"] for g in gemms), ".", markersize=4,
            label="GEMM output SNR vs reference")
    last_gemm = {g["layer"]: i for i, g in enumerate(gemms)}  # a block's output follows its last quantized GEMM
    blocks = layerwise["blocks"]  # one per layer holding a quantized GEMM (exporters.probes.find_probes)
    ax.plot([last_gemm[b["layer"]] for b in blocks], _values(b["snr_db"] for b in blocks), "-",
            label="block output SNR vs reference")
    if layerwise["large_error_threshold_db"] is not None:
        ax.axhline(layerwise["large_error_threshold_db"], color="red", linestyle=":", label="large local error threshold")
    ax.set_xlabel("quantized GEMM, execution order")
    ax.set_ylabel("SNR (dB)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)
