"""Comparison metrics against values worked out by hand."""

import math

import numpy as np
import pytest

from pipeline.metrics import PairStats, kl_divergence, next_token_nll, snr_db, top_k_hits


def test_kl_of_two_known_distributions():
    p, q = np.log([[0.5, 0.5]]), np.log([[0.9, 0.1]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(p, q)[0] == pytest.approx(expected, rel=1e-12)
    assert kl_divergence(p + 3.0, p)[0] == pytest.approx(0.0, abs=1e-15)  # logits shift: same distribution


def test_top5_asks_whether_the_reference_choice_is_still_a_candidate():
    reference = np.array([[0.0, 0, 0, 0, 0, 0, 9.0]])  # top-1 is token 6
    ranks_sixth = np.array([[6.0, 5, 4, 3, 2, 0, 1.0]])  # token 6 is the candidate's 6th most likely
    ranks_fifth = np.array([[6.0, 5, 4, 3, 0, 0, 2.0]])
    assert not top_k_hits(reference, ranks_sixth, 5)[0] and top_k_hits(reference, ranks_fifth, 5)[0]
    tied_fifth = np.array([[6.0, 5, 4, 3, 2, 2, 2.0]])  # four tokens above, two tied with it: still among 5
    assert top_k_hits(reference, tied_fifth, 5)[0]


def test_snr_and_the_exact_case():
    assert snr_db(100.0, 1.0) == pytest.approx(20.0)
    assert snr_db(1.0, 0.0) is None


def test_pair_stats_and_nll_on_a_tiny_example():
    base = np.array([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]])
    cand = base + np.array([[[0.0, 0.5, 0.0], [0.0, 0.0, 0.0]]])
    s = PairStats()
    s.add(base, cand)
    summary = s.summary()
    assert summary["max_abs_error"] == 0.5 and summary["mean_abs_error"] == pytest.approx(0.5 / 6)
    assert summary["snr_db"] == pytest.approx(10 * math.log10(13 / 0.25))
    assert summary["top1_agreement"] == 1.0 and summary["positions"] == 2
    total, count = next_token_nll(base, np.array([[0, 1]]))
    assert count == 1 and total == pytest.approx(math.log(math.exp(2) + 2))  # p(token 1) from position 0


def test_chunked_window_metrics_equal_the_whole_window_ones(monkeypatch):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(1, 200, 50)).astype(np.float32)
    cand = base + rng.normal(scale=0.1, size=base.shape).astype(np.float32)
    ids = rng.integers(0, 50, (1, 200))
    whole, chunked = PairStats(), PairStats()
    monkeypatch.setattr("pipeline.metrics.CHUNK_ROWS", 1000)  # one chunk: the window at once
    whole.add(base, cand)
    nll_whole = next_token_nll(base, ids)
    monkeypatch.setattr("pipeline.metrics.CHUNK_ROWS", 7)  # 200 positions in 29 uneven chunks
    chunked.add(base, cand)
    assert next_token_nll(base, ids)[1] == nll_whole[1] == 199
    assert next_token_nll(base, ids)[0] == pytest.approx(nll_whole[0], rel=1e-12)
    for key, value in whole.summary().items():
        assert chunked.summary()[key] == pytest.approx(value, rel=1e-12), key


def test_pair_metrics_perplexities_from_the_kl_normalisers_equal_the_direct_ones(monkeypatch):
    """PairMetrics takes each position's logsumexp from PairStats' KL instead of computing it again: the
    perplexities must be next_token_nll's, and the pair statistics PairStats' own."""
    from pipeline.metrics import Perplexity
    from pipeline.verify import PairMetrics

    monkeypatch.setattr("pipeline.metrics.CHUNK_ROWS", 7)  # 120 positions in uneven chunks
    rng = np.random.default_rng(1)
    windows = rng.integers(0, 300, (3, 120))
    metrics, alone, direct, kl = PairMetrics(), PairStats(), (Perplexity(), Perplexity()), []
    for window in windows:
        base = rng.normal(scale=3.0, size=(1, 120, 300)).astype(np.float32)
        cand = base + rng.normal(scale=0.5, size=base.shape).astype(np.float32)
        metrics.add(window, base, cand)
        alone.add(base, cand)
        kl.append(kl_divergence(base, cand))
        for perplexity, logits in zip(direct, (base, cand)):
            perplexity.add(logits, window[None, :])
    summary = metrics.summary()
    assert summary["predicted_tokens"] == 3 * 119
    assert summary["perplexity_reference"] == pytest.approx(direct[0].value(), rel=1e-12)
    assert summary["perplexity_candidate"] == pytest.approx(direct[1].value(), rel=1e-12)
    assert summary["perplexity_candidate"] != pytest.approx(summary["perplexity_reference"], rel=1e-3)
    assert {k: summary[k] for k in alone.summary()} == alone.summary()
    assert summary["kl_mean"] == pytest.approx(np.concatenate(kl).mean(), rel=1e-12)
