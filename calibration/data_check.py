"""A look at the calibration windows before any statistics are taken: too few tokens, repeated windows, a narrow
vocabulary, or evaluation text that is also in the calibration set all give quietly wrong activation ranges or a
flattering evaluation. The check warns; it never stops the run (a user may calibrate on a small domain set on
purpose)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Below this many tokens the per-tensor absmax of a rare outlier channel is often simply not observed
# (the spine's default is 64 x 512 = 32,768).
MIN_TOKENS = 8192
# A natural-language sample of a few thousand tokens uses a few hundred distinct ones per thousand; far fewer
# means one string repeated (a template, a log line) and ranges fitted to it.
MIN_DISTINCT_PER_1000 = 50


@dataclass(frozen=True)
class DataCheck:
    tokens: int
    windows: int
    duplicate_windows: int  # windows identical to an earlier calibration window
    distinct_tokens: int
    vocabulary_coverage: float  # distinct tokens / vocabulary size
    evaluation_overlap: int  # evaluation windows that also occur among calibration + holdout windows
    warnings: tuple[str, ...]

    def to_json(self) -> dict:
        return asdict(self)


def _row_keys(windows: np.ndarray) -> list[bytes]:
    return [np.ascontiguousarray(row, dtype=np.int64).tobytes() for row in windows]


def check_windows(calibration: np.ndarray, holdout: np.ndarray, evaluation: np.ndarray,
                  vocab_size: int) -> DataCheck:
    keys = _row_keys(calibration)
    duplicates = len(keys) - len(set(keys))
    distinct = int(np.unique(calibration).size)
    tokens = int(calibration.size)
    seen = set(keys) | set(_row_keys(holdout))
    overlap = sum(k in seen for k in _row_keys(evaluation))
    warnings = []
    if tokens < MIN_TOKENS:
        warnings.append(f"only {tokens} calibration tokens (fewer than {MIN_TOKENS}): activation ranges may miss rare "
                        "outliers; raise CALIB_WINDOWS or SEQ_LEN")
    if duplicates:
        warnings.append(f"{duplicates} of {len(keys)} calibration windows repeat an earlier one: the text repeats "
                        "itself; deduplicate it or use a longer source")
    if tokens and 1000 * distinct / tokens < MIN_DISTINCT_PER_1000:
        warnings.append(f"the calibration text uses only {distinct} distinct tokens in {tokens} "
                        f"({100 * distinct / vocab_size:.2f}% of the vocabulary): it is repetitive, so ranges fit that "
                        "text only; use varied text resembling production inputs")
    if overlap:
        warnings.append(f"{overlap} of {len(evaluation)} evaluation windows also occur in the calibration data: the "
                        "evaluation is not held out; use a different EVAL file or the same file for both")
    return DataCheck(tokens, len(keys), duplicates, distinct, distinct / vocab_size, overlap, tuple(warnings))
