"""Synthetic calibration in the calibrate stage: the text is sampled from the model in sampling_dtype(), the
statistics come from the FP32 model."""

import json

import numpy as np
import torch

from calibration.data import build_windows, sampling_dtype
from calibration.stats import collect_input_absmax, load_stats, quantizable_linears
from pipeline import models
from pipeline.cli import run

CALIB, HOLDOUT, EVAL, SEQ_LEN, BATCH = 3, 4, 1, 24, 2


def test_synthetic_text_is_sampled_in_the_sampling_dtype_and_calibrated_in_fp32(tiny_model_dir, tmp_path):
    argv = ["calibrate", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--calib", "synthetic",
            "--calib-windows", str(CALIB), "--eval-windows", str(EVAL), "--seq-len", str(SEQ_LEN),
            "--batch-size", str(BATCH)]
    assert run(argv) == 0
    saved = np.load(tmp_path / "windows.npz")
    source = models.resolve(str(tiny_model_dir))
    sampler, tokenizer, spec = models.load(source, sampling_dtype())
    sampled = build_windows(sampler, tokenizer, "synthetic", None, CALIB, HOLDOUT, EVAL, SEQ_LEN, seed=0)
    for part in ("calibration", "holdout", "evaluation"):
        assert np.array_equal(saved[part], getattr(sampled, part)), part
    origin = json.loads((tmp_path / "manifest.json").read_text())["stages"]["calibrate"]["calibration_origin"]
    assert f"sampled from the model in {str(sampling_dtype()).removeprefix('torch.')}," in origin  # what it ran in

    fp32 = models.load(source)[0]
    expected = collect_input_absmax(fp32, quantizable_linears(fp32, spec), saved["calibration"], BATCH)
    stats = load_stats(tmp_path / "calibration_stats.safetensors")
    assert stats.keys() == expected.keys() and all(torch.equal(stats[n], expected[n]) for n in expected)
    if sampling_dtype() != torch.float32:  # the two models' statistics differ: the check above can tell them apart
        rounded = collect_input_absmax(sampler, quantizable_linears(sampler, spec), saved["calibration"], BATCH)
        assert not all(torch.equal(rounded[n].float(), expected[n]) for n in expected)


def test_a_fixed_sampling_dtype_is_sampled_in_on_any_cpu_and_keys_the_stage(tiny_model_dir, tmp_path, caplog):
    """--sampling-dtype float32 samples what a float32 sampler samples, whatever this CPU's default; the same OUT
    under "auto" is calibrated again where auto means another dtype, and is up to date where it means float32."""
    argv = ["calibrate", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--calib", "synthetic",
            "--calib-windows", str(CALIB), "--eval-windows", str(EVAL), "--seq-len", str(SEQ_LEN),
            "--batch-size", str(BATCH)]
    assert run([*argv, "--sampling-dtype", "float32"]) == 0
    sampler, tokenizer, _ = models.load(models.resolve(str(tiny_model_dir)), torch.float32)
    sampled = build_windows(sampler, tokenizer, "synthetic", None, CALIB, HOLDOUT, EVAL, SEQ_LEN, seed=0)
    assert np.array_equal(np.load(tmp_path / "windows.npz")["calibration"], sampled.calibration)
    origin = json.loads((tmp_path / "manifest.json").read_text())["stages"]["calibrate"]["calibration_origin"]
    assert "sampled from the model in float32," in origin
    caplog.set_level("INFO")
    assert run(argv) == 0
    assert ("calibrate: up to date" in caplog.text) == (sampling_dtype() == torch.float32)
