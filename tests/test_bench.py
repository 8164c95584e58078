"""CI smoke run of `make bench` on a tiny model: every section is produced, the kernel census sees our W8A8
linears run as integer GEMMs, and targets are reported (their values mean nothing on a tiny model)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from bench.run import main
from calibration.data import SAMPLING_BATCH
from pipeline.gguf_cache import CACHE_ENV


def test_bench_smoke_run_on_a_tiny_model(tmp_path, tiny_model_dir, corpus, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, os.environ[CACHE_ENV])  # the bench points it at its own cache: restored after
    results = tmp_path / "results"
    main(["--model", str(tiny_model_dir), "--calib", str(corpus), "--eval", str(corpus), "--calib-windows", "4",
          "--eval-windows", "2", "--seq-len", "32", "--recipes", "w8a8,w4a16-rtn", "--out", str(tmp_path / "out"),
          "--results", str(results), "--latency-repeats", "1"])
    r = json.loads((results / "bench.json").read_text())
    assert set(r["pipeline"]) == {"calibrate", "quantize", "export", "build", "verify"}
    assert all(r["load"][k]["seconds"] > 0 for k in ("first", "cached"))
    assert all(s["seconds"] > 0 and s["peak_rss_bytes"] > 100e6 for s in r["pipeline"].values())
    assert r["integer_kernels"]["smoothtrt W8A8"]["integer_matmuls"] == 14  # every quantized linear, 2 layers x 7
    assert r["integer_kernels"]["ORT quantize_static"]["integer_matmuls"] > 0
    assert r["artifacts"]["smoothtrt W8A8"]["bytes"] < r["artifacts"]["reference FP32"]["bytes"]
    assert set(r["accuracy"]) == {"w8a8", "w4a16-rtn", "ORT quantize_static"}
    # the second recipe ran on the first one's calibration, not a calibration of its own
    assert r["recipe_runs"]["w4a16-rtn"]["calibration_reused"] and r["recipe_runs"]["w4a16-rtn"]["engine"]["seconds"] > 0
    manifest = json.loads((tmp_path / "out" / "w4a16-rtn" / "manifest.json").read_text())
    assert manifest["config"]["quant"]["scheme"] == "w4a16-rtn" and manifest["stages"]["verify"]["status"] == "done"
    assert set(r["latency"]["smoothtrt W8A8"]) == {"prefill 1x512", "prefill 4x128", "decode step (KV cache)"}
    for timings in (r["latency"], r["latency_one_thread"]):  # a sample per repeat and per decode step, every graph
        for shapes in timings.values():
            assert [s["samples"] for s in shapes.values()] == [1, 1, 32]
            assert all(0 < s["best_ms"] <= s["median_ms"] for s in shapes.values())
    measured = [t for t in r["targets"] if t["measured"] is not None]
    assert len(measured) == 14 + len(r["synthetic_calibration"]) and all(t["met"] in (True, False) for t in measured)
    assert sum("1 thread" in t["target"] for t in measured) == 4
    low = r["low_memory"]  # the layer-by-layer stages saved what the in-memory ones saved
    assert low["statistics_identical"] and set(low["stages"]) == {"calibrate", "quantize"}
    assert low["plan_entries_differing"] == 0 and low["weight_codes_differing"] == 0 and low["weight_codes"] > 0
    assert r["memory_estimates"]["low_memory"]["calibrate"] < r["memory_estimates"]["in_memory"]["calibrate"]
    # the default calibration, one whole sampling batch: in this CPU's dtype and in float32 (the same run without
    # native bfloat16)
    sampled = {s["sampling_dtype"]: s for s in r["synthetic_calibration"]}
    assert "float32" in sampled and [s["default"] for s in sampled.values()].count(True) == 1
    for name, synthetic in sampled.items():
        out = tmp_path / "out" / "synthetic" / name
        windows = np.load(out / "windows.npz")
        sampled_windows = sum(len(windows[part]) for part in ("calibration", "holdout", "evaluation"))
        assert sampled_windows == synthetic["samples"] == SAMPLING_BATCH[getattr(torch, name)]
        origin = json.loads((out / "manifest.json").read_text())["stages"]["calibrate"]
        assert f"in {name}," in origin["calibration_origin"] and synthetic["peak_rss_bytes"] > 100e6
    assert r["report"]["seconds"] > 0 and (tmp_path / "out" / "w8a8" / "report.html").is_file()
    assert "| target | measured | limit | met |" in (results / "bench.md").read_text()
    assert f"Machine: {r['machine']['cpu']}, " in (results / "bench.md").read_text()


def test_a_process_peak_is_its_own_and_not_the_bench_process():
    """Linux carries the spawner's memory high-water mark into a spawned program's ru_maxrss: measured that way
    from a bench holding 400 MB, a process that peaks at 200 MB would report 400."""
    import numpy as np

    from bench.run import timed_process

    held = np.ones(50_000_000)  # 400 MB resident in this process
    measured = timed_process(["-c", "import time, numpy as np; a = np.ones(25_000_000); time.sleep(0.3)"])
    assert held.sum() > 0 and 200e6 < measured["peak_rss_bytes"] < 300e6


def test_a_stage_that_starts_a_process_is_measured_with_it():
    """verify runs its PyTorch side in a child process while the stage's own process waits: the peak is what both
    held at once (each 200 MB here), not the larger of the two (ru_maxrss alone would say ~200 MB)."""
    from bench.run import timed_process

    holder = "import time, numpy as np; a = np.ones(25_000_000); time.sleep({})"
    measured = timed_process(["-c", f"import subprocess, sys; {holder.format(0.2)}; "
                                    f"subprocess.run([sys.executable, '-c', '{holder.format(0.8)}'], check=True)"])
    assert 400e6 < measured["peak_rss_bytes"] < 520e6
