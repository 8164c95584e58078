"""Comparison metrics of two models' outputs on the same inputs: small pure functions and streaming accumulators.

All maths in float64 on numpy arrays [..., features] (logits: [batch, positions, vocab]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1]).astype(np.float64, copy=False)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = _rows(logits)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Sum and count of -log p(token t+1 | tokens <= t) over a [batch, seq] window."""
    logp = log_softmax(logits[:, :-1])
    target = ids[:, 1:].reshape(-1)
    nll = -logp[np.arange(target.size), target]
    return float(nll.sum()), int(nll.size)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine between a and b per row (per position for logits)."""
    a64, b64 = _rows(a), _rows(b)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return (a64 * b64).sum(-1) / np.maximum(den, 1e-30)


def snr_db(signal_power: float, error_power: float) -> float | None:
    """10 log10(sum x^2 / sum (y - x)^2); None for identical tensors (no error: JSON has no infinity)."""
    if error_power == 0.0:
        return None
    return 10.0 * math.log10(max(signal_power, 1e-300) / error_power)


def kl_divergence(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> np.ndarray:
    """KL(p_reference || p_candidate) of the next-token distributions, per position, in nats."""
    log_p, log_q = log_softmax(reference_logits), log_softmax(candidate_logits)
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def top_k_hits(reference_logits: np.ndarray, candidate_logits: np.ndarray, k: int) -> np.ndarray:
    """Per position: is the reference's top-1 token among the candidate's k most likely?"""
    ref_top1 = _rows(reference_logits).argmax(-1)
    cand = _rows(candidate_logits)
    top = np.argpartition(-cand, k - 1, axis=-1)[:, :k] if k < cand.shape[-1] else np.argsort(-cand, axis=-1)
    return (top == ref_top1[:, None]).any(-1)


@dataclass
class PairStats:
    """Streaming comparison of a candidate's logits with a baseline's (teacher-forced, position by position)."""

    window_cosines: list[float] = field(default_factory=list)
    max_abs: float = 0.0
    abs_sum: float = 0.0
    signal_power: float = 0.0
    error_power: float = 0.0
    elements: int = 0
    top1_same: int = 0
    top5_hits: int = 0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    positions: int = 0

    def add(self, baseline: np.ndarray, candidate: np.ndarray) -> None:
        base, cand = _rows(baseline), _rows(candidate)  # [positions, features] float64, converted once
        error = cand - base
        magnitude = np.abs(error)
        self.window_cosines.append(float(cosines(base, cand).mean()))
        self.max_abs = max(self.max_abs, float(magnitude.max()))
        self.abs_sum += float(magnitude.sum())
        self.signal_power += float(np.einsum("ij,ij->", base, base))
        self.error_power += float(np.einsum("ij,ij->", error, error))
        self.elements += error.size
        self.top1_same += int((base.argmax(-1) == cand.argmax(-1)).sum())
        self.top5_hits += int(top_k_hits(base, cand, 5).sum())
        kl = kl_divergence(base, cand)
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.positions += kl.size

    def summary(self) -> dict:
        positions = max(self.positions, 1)
        return {
            "windows": len(self.window_cosines),
            "positions": self.positions,
            "cosine_mean": float(np.mean(self.window_cosines)),
            "cosine_min": float(np.min(self.window_cosines)),
            "max_abs_error": self.max_abs,
            "mean_abs_error": self.abs_sum / max(self.elements, 1),
            "snr_db": snr_db(self.signal_power, self.error_power),
            "top1_agreement": self.top1_same / positions,
            "top5_agreement": self.top5_hits / positions,
            "kl_mean": self.kl_sum / positions,
            "kl_max": self.kl_max,
        }


@dataclass
class Perplexity:
    nll: float = 0.0
    count: int = 0

    def add(self, logits: np.ndarray, ids: np.ndarray) -> None:
        s, n = next_token_nll(logits, ids)
        self.nll += s
        self.count += n

    def value(self) -> float:
        return float(np.exp(self.nll / self.count))
