"""Comparison metrics of two models' outputs on the same inputs: small pure functions and streaming accumulators.

Inputs are arrays [..., features] (logits: [batch, positions, vocab]; numpy, or CPU torch tensors); the maths runs
in float64 numpy (a SmolLM2 window is 512 x 49,152 logits, and the KL floor being measured is ~1e-6). numpy, not
torch: verify's graph checks run in a process that never imports torch (pipeline/verify_stage.py), and on SmolLM2
logits numpy took 0.56 s a window against torch's 0.52 s (two threads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


# Positions converted to float64 at a time: a whole SmolLM2 window is 512 x 49,152 logits, 200 MB per float64 copy,
# and the metrics make several. 8 rows (3 MB per temporary) measured faster than 64 on SmolLM2 logits and kept the
# heap from growing: larger temporaries are served from glibc's heap once its mmap threshold has risen, and
# fragment it (a window's metrics alone peaked 330 MB higher with 64).
CHUNK_ROWS = 8


def _rows(x, dtype=np.float64) -> np.ndarray:
    a = np.asarray(x)
    return a.reshape(-1, a.shape[-1]).astype(dtype, copy=False)


def _row_chunks(x):
    """[positions, features] float64 pieces of x, CHUNK_ROWS positions each."""
    rows = np.asarray(x).reshape(-1, np.shape(x)[-1])
    return (rows[i : i + CHUNK_ROWS].astype(np.float64) for i in range(0, len(rows), CHUNK_ROWS))


def logsumexp(x: np.ndarray) -> np.ndarray:
    peak = x.max(-1)
    return peak + np.log(np.exp(x - peak[:, None]).sum(-1))


def next_token_nll(logits, ids: np.ndarray) -> tuple[float, int]:
    """Sum and count of -log p(token t+1 | tokens <= t) over a [batch, seq] window: logsumexp - target logit."""
    targets = np.asarray(ids)[:, 1:].reshape(-1).astype(np.int64)
    total, count = 0.0, 0
    for start, x in zip(range(0, len(targets), CHUNK_ROWS), _row_chunks(np.asarray(logits)[:, :-1])):
        target = targets[start : start + CHUNK_ROWS]
        nll = logsumexp(x) - x[np.arange(len(target)), target]
        total, count = total + float(nll.sum()), count + int(nll.size)
    return total, count


def cosines(a, b) -> np.ndarray:
    """Cosine between a and b per row (per position for logits)."""
    a64, b64 = _rows(a), _rows(b)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return np.einsum("ij,ij->i", a64, b64) / np.maximum(den, 1e-30)


def snr_db(signal_power: float, error_power: float) -> float | None:
    """10 log10(sum x^2 / sum (y - x)^2); None for identical tensors (no error: JSON has no infinity)."""
    if error_power == 0.0:
        return None
    return 10.0 * math.log10(max(signal_power, 1e-300) / error_power)


def kl_divergence(reference_logits, candidate_logits, dtype=np.float64) -> np.ndarray:
    """KL(p_reference || p_candidate) of the next-token distributions, per position, in nats, from the logits x, y:
    sum p (x - y) - logsumexp(x) + logsumexp(y), p = softmax(x) (two exponentials a row, where the log-softmax form
    takes three and twice the temporaries). float32 agreed with float64 to 1e-8 nats in the mean on 2,044 x 49,152
    logits: enough to rank candidates (budget), not to measure a precision floor of ~1e-6 (verify keeps float64)."""
    x, y = _rows(reference_logits, dtype), _rows(candidate_logits, dtype)
    return _kl_terms(x, y, y - x, x.max(-1), y.max(-1))[0]


def _kl_terms(x: np.ndarray, y: np.ndarray, error: np.ndarray, x_peak: np.ndarray,
              y_peak: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """KL per row (kl_divergence's formula, from the error y - x and the row maxima), and the logsumexp of x and of
    y, which the perplexities need: PairStats passes what it has computed already."""
    weights = np.exp(x - x_peak[:, None])  # p times its row's normaliser
    normaliser = weights.sum(-1)
    lse_x = x_peak + np.log(normaliser)
    lse_y = y_peak + np.log(np.exp(y - y_peak[:, None]).sum(-1))
    return lse_y - lse_x - np.einsum("ij,ij->i", weights, error) / normaliser, lse_x, lse_y


def top_k_hits(reference_logits, candidate_logits, k: int, reference_top1: np.ndarray | None = None) -> np.ndarray:
    """Per position: is the reference's top-1 token among the candidate's k most likely, i.e. do fewer than k
    tokens have a higher candidate logit (a tie with the k-th counts as among)? Counting takes a quarter of the
    time of np.argpartition on SmolLM2 logits. reference_top1: the reference's argmax, when known."""
    cand = _rows(candidate_logits)
    top1 = _rows(reference_logits).argmax(-1) if reference_top1 is None else reference_top1
    own = cand[np.arange(len(cand)), top1]
    return np.count_nonzero(cand > own[:, None], axis=-1) < k


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

    def add(self, baseline: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One window's logits, a chunk of positions at a time. Returns each position's logsumexp of the baseline
        and of the candidate, which the KL computes anyway: PairMetrics takes the perplexities from them."""
        window_cosines, normalisers = [], []
        for base, cand in zip(_row_chunks(baseline), _row_chunks(candidate)):
            error = cand - base
            base_power, cand_power = np.einsum("ij,ij->i", base, base), np.einsum("ij,ij->i", cand, cand)
            den = np.sqrt(base_power * cand_power)
            window_cosines.append(np.einsum("ij,ij->i", base, cand) / np.maximum(den, 1e-30))
            magnitude = np.abs(error)
            self.max_abs = max(self.max_abs, float(magnitude.max()))
            self.abs_sum += float(magnitude.sum())
            self.signal_power += float(base_power.sum())
            self.error_power += float(np.einsum("ij,ij->", error, error))
            self.elements += error.size
            rows, base_top, cand_top = np.arange(len(base)), base.argmax(-1), cand.argmax(-1)
            self.top1_same += int((base_top == cand_top).sum())
            self.top5_hits += int(top_k_hits(base, cand, 5, base_top).sum())
            kl, *chunk_normalisers = _kl_terms(base, cand, error, base[rows, base_top], cand[rows, cand_top])
            normalisers.append(chunk_normalisers)
            self.kl_sum += float(kl.sum())
            self.kl_max = max(self.kl_max, float(kl.max()))
            self.positions += kl.size
        self.window_cosines.append(float(np.concatenate(window_cosines).mean()))
        base_lse, cand_lse = zip(*normalisers)
        return np.concatenate(base_lse), np.concatenate(cand_lse)

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

    def add(self, logits: np.ndarray, ids: np.ndarray) -> float:
        """Adds the batch; returns its mean next-token NLL."""
        s, n = next_token_nll(logits, ids)
        self.nll += s
        self.count += n
        return s / n

    def add_window(self, logits: np.ndarray, window: np.ndarray, logsumexp_rows: np.ndarray) -> None:
        """One window's logits ([1, positions, vocab]) with each position's logsumexp already computed:
        -log p(token t+1) = logsumexp - the target's logit, the last position predicting nothing."""
        targets = np.asarray(window).reshape(-1)[1:].astype(np.int64)
        target_logits = np.asarray(logits).reshape(-1, np.shape(logits)[-1])[np.arange(len(targets)), targets]
        nll = logsumexp_rows[: len(targets)] - target_logits.astype(np.float64)
        self.nll += float(nll.sum())
        self.count += int(nll.size)

    def value(self) -> float:
        return float(np.exp(self.nll / self.count))
