"""The calibration-set check: each problem is reported with its fix, and a healthy set gives no warning."""

import numpy as np

from calibration.data_check import MIN_TOKENS, check_windows

VOCAB = 1000


def varied(n, seq_len=512, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (n, seq_len)).astype(np.int64)


def test_a_varied_held_out_set_passes():
    windows = varied(24)
    check = check_windows(windows[:16], windows[16:20], windows[20:], VOCAB)
    assert check.warnings == ()
    assert (check.tokens, check.windows, check.duplicate_windows, check.evaluation_overlap) == (16 * 512, 16, 0, 0)
    assert check.distinct_tokens == len(np.unique(windows[:16]))
    assert check.vocabulary_coverage == check.distinct_tokens / VOCAB


def test_too_few_tokens():
    check = check_windows(varied(2), varied(1, seed=1), varied(1, seed=2), VOCAB)
    assert len(check.warnings) == 1 and f"only 1024 calibration tokens (fewer than {MIN_TOKENS})" in check.warnings[0]


def test_repeated_windows_are_counted():
    windows = varied(16)
    windows[5] = windows[2]
    windows[9] = windows[2]
    check = check_windows(windows, varied(1, seed=1), varied(1, seed=2), VOCAB)
    assert check.duplicate_windows == 2
    assert check.warnings == ("2 of 16 calibration windows repeat an earlier one: the text repeats itself; "
                              "deduplicate it or use a longer source",)


def test_a_repetitive_text_is_flagged_by_its_vocabulary():
    one_sentence = np.tile(np.arange(40), 16 * 512 // 40 + 1)[: 16 * 512].reshape(16, 512)
    check = check_windows(one_sentence, varied(1, seed=1), varied(1, seed=2), VOCAB)
    assert check.distinct_tokens == 40
    assert any("only 40 distinct tokens in 8192 (4.00% of the vocabulary)" in w for w in check.warnings)


def test_evaluation_windows_seen_in_calibration_or_holdout():
    windows = varied(24)
    evaluation = np.stack([windows[3], windows[17], varied(1, seed=5)[0]])
    check = check_windows(windows[:16], windows[16:20], evaluation, VOCAB)
    assert check.evaluation_overlap == 2
    assert check.warnings == ("2 of 3 evaluation windows also occur in the calibration data: the evaluation is not "
                              "held out; use a different EVAL file or the same file for both",)
