import numpy as np
import pytest
import torch

from calibration import CalibrationError
from calibration.data import build_windows, cut_windows, split_same_source, synthetic_windows
from calibration.sources import source_text


def test_same_source_split_follows_the_protocol():
    windows = cut_windows(np.arange(100), 10)
    calib, evaluation = split_same_source(windows, n_calib=3, n_eval=2, source="x")
    assert evaluation[0, 0] == 0 and evaluation[-1, -1] == 19  # first windows
    assert calib[-1, -1] == 99 and calib[0, 0] == 70  # last windows
    assert not set(calib.ravel()) & set(evaluation.ravel())


def test_too_short_text_is_refused_with_the_fix():
    with pytest.raises(CalibrationError, match="10 windows .* 9 calibration \\+ 2 evaluation"):
        split_same_source(cut_windows(np.arange(100), 10), 9, 2, "x")


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\x00\x01\x02binary", "looks binary"),
    (b"caf\xe9 latin-1", "not UTF-8"),
])
def test_bad_calibration_files(tmp_path, content, message):
    path = tmp_path / "calib.txt"
    path.write_bytes(content)
    with pytest.raises(CalibrationError, match=message):
        source_text(str(path), None, chat=False)


def test_jsonl_needs_text_fields(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "alpha"}\n\n{"text": "beta"}\n')
    assert source_text(str(good), None, chat=False) == "alpha\n\nbeta"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "alpha"}\n{"body": "beta"}\n')
    with pytest.raises(CalibrationError, match="bad.jsonl:2: missing string field 'text'"):
        source_text(str(bad), None, chat=False)


def test_missing_file(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        source_text(str(tmp_path / "nope.txt"), None, chat=False)


def test_source_windows_are_token_slices(tokenizer, corpus):
    w = build_windows(None, tokenizer, str(corpus), None, n_calib=3, n_holdout=2, n_eval=2, seq_len=16, seed=0)
    ids = tokenizer(corpus.read_text(), add_special_tokens=False)["input_ids"]
    assert w.evaluation.tolist() == [ids[:16], ids[16:32]]
    n = len(ids) // 16
    assert w.calibration[-1].tolist() == ids[(n - 1) * 16 : n * 16]
    # the holdout is the two windows just before the three calibration windows: same source, no overlap
    assert w.holdout.tolist() == [ids[(n - 5) * 16 : (n - 4) * 16], ids[(n - 4) * 16 : (n - 3) * 16]]
    assert "held out" in w.evaluation_origin


@pytest.mark.parametrize("dtype, batches", [(torch.float32, [8, 8, 4]), (torch.bfloat16, [16, 4])])
def test_synthetic_windows_are_sampled_in_batches_that_fit_the_dtype(tokenizer, dtype, batches):
    """float32 samples half as many windows at once as bfloat16: its KV cache is twice the size (SAMPLING_BATCH)."""
    from tests.conftest import tiny_model

    model = tiny_model(outliers=False).to(dtype)
    sampled, generate = [], model.generate
    model.generate = lambda input_ids, **kw: sampled.append(len(input_ids)) or generate(input_ids=input_ids, **kw)
    assert synthetic_windows(model, tokenizer, 20, seq_len=8, seed=0).shape == (20, 8)
    assert sampled == batches


def test_synthetic_windows_are_seeded_samples_of_the_model(tokenizer):
    from tests.conftest import tiny_model

    model = tiny_model(outliers=False)
    a = build_windows(model, tokenizer, "synthetic", None, n_calib=3, n_holdout=1, n_eval=1, seq_len=48, seed=7)
    b = build_windows(model, tokenizer, "synthetic", None, n_calib=3, n_holdout=1, n_eval=1, seq_len=48, seed=7)
    c = build_windows(model, tokenizer, "synthetic", None, n_calib=3, n_holdout=1, n_eval=1, seq_len=48, seed=8)
    assert a.calibration.shape == (3, 48) and a.holdout.shape == (1, 48) and a.evaluation.shape == (1, 48)
    assert a.digest() == b.digest() != c.digest()
    assert len({tuple(r) for r in a.calibration} | {tuple(a.holdout[0])}) == 4  # different prompts, different windows
