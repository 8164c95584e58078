"""End to end through the CLI on a tiny local model: artifacts, report, determinism, resume and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.artifacts import atomic_path
from pipeline import troubleshooting
from pipeline.cli import ORDER, run
from tests.conftest import tiny_model

SMALL = ["--calib-windows", "4", "--eval-windows", "2", "--seq-len", "32", "--batch-size", "2"]


def stages(argv: list[str]) -> int:
    """What `engine` runs, each stage in this process, so that capsys, caplog and monkeypatch see it (the engine
    command starts a process per stage: test_engine_runs_every_stage_in_a_process_of_its_own)."""
    for stage in ORDER:
        if (code := run([stage, *argv])) != 0:
            return code
    return 0


def engine(model_dir, out, corpus, *extra):
    return stages(["--model", str(model_dir), "--out", str(out), "--calib", str(corpus), *SMALL, *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, corpus):
    out = tmp_path_factory.mktemp("run")
    assert engine(tiny_model_dir, out, corpus) == 0
    return out


def engine_process(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "engine", *argv], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])


def test_engine_runs_every_stage_in_a_process_of_its_own(tmp_path, tiny_model_dir, corpus):
    """`python -m pipeline engine` runs the stages as `make engine` does: each process announces the memory estimate
    of its own stage (one process for all would announce them once, together). A stage that fails ends the run
    with its one-line error and exit code; what came before it is kept and nothing after it runs."""
    argv = ["--model", str(tiny_model_dir), "--calib", str(corpus), *SMALL]
    done = engine_process("--out", str(tmp_path / "out"), *argv)
    assert done.returncode == 0, done.stderr[-800:]
    announced = [line.split("peak per stage ")[1] for line in done.stderr.splitlines() if "memory estimate" in line]
    assert [stage.split()[0] for stage in announced] == ["calibrate", "quantize", "export", "verify"]
    assert all(stage.count(" GB") == 1 for stage in announced)
    assert (tmp_path / "out" / "report.json").is_file()

    failed = engine_process("--out", str(tmp_path / "bad"), *argv, "--rotate-block", "256")  # refused by quantize
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1].startswith("error: --rotate-block 256 does not divide")
    assert (tmp_path / "bad" / "stages" / "calibrate.json").is_file()
    assert "export:" not in failed.stderr and not list((tmp_path / "bad").glob("*.onnx"))


def test_engine_writes_every_artifact_and_an_honest_report(finished):
    for name in ("reference.onnx", "quantized.onnx", "quantized.fp16.onnx", "module_map.json", "quant_plan.json",
                 "calibration_stats.safetensors", "smoothing_factors.safetensors", "report.json", "report.md",
                 "manifest.json"):
        assert (finished / name).is_file(), name
    report = json.loads((finished / "report.json").read_text())
    assert report["modules"]["quantized"] == 14
    assert report["export_faithfulness"]["quantized_onnx_vs_pytorch_fake_quant"]["cosine_min"] > 0.9999
    assert report["export_faithfulness"]["reference_onnx_vs_pytorch_fp32"]["max_abs_error"] < 1e-4
    assert report["evaluation"]["predicted_tokens"] == 2 * 31
    generation = report["generation"]  # the exported KV-cache graph generates what PyTorch generates
    assert generation["reference_onnx_vs_pytorch_generate"]["identical"] == len(generation["prompts"]) == 5
    assert (finished / "tokenizer" / "tokenizer.json").is_file()
    manifest = json.loads((finished / "manifest.json").read_text())
    assert manifest["config"]["quant"]["alpha"] == "auto"
    assert manifest["stages"]["calibrate"]["windows_sha256"] == report["calibration"]["windows_sha256"]
    import torch  # each stage records the CPU it ran on: float results, and so the plan, depend on its kernels

    for stage in manifest["stages"].values():
        assert stage["machine"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert stage["machine"]["cpu"] and stage["machine"]["logical_cpus"] >= 1
    data_check = manifest["stages"]["calibrate"]["data_check"]  # the small test set is flagged, not refused
    assert data_check["evaluation_overlap"] == 0 and data_check["warnings"][0].startswith("only ")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert manifest["stages"]["build"]["status"] == "skipped"
        assert not (finished / "model.plan").exists()
        assert "TensorRT engine" in report["not_verified"][0]


def test_second_run_resumes_and_changes_nothing(finished, tiny_model_dir, corpus, caplog):
    before = {p.name: p.stat().st_mtime_ns for p in finished.iterdir() if p.is_file()}
    caplog.set_level("INFO")
    assert engine(tiny_model_dir, finished, corpus) == 0
    for stage in ("calibrate", "quantize", "export", "verify"):
        assert f"{stage}: up to date" in caplog.text
    after = {p.name: p.stat().st_mtime_ns for p in finished.iterdir() if p.is_file() and p.name in before}
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {k: v for k, v in before.items() if k != "manifest.json"}


def test_two_runs_give_byte_identical_onnx_plan_and_weights(finished, tiny_model_dir, corpus, tmp_path):
    assert engine(tiny_model_dir, tmp_path, corpus) == 0
    for name in ("reference.onnx", "quantized.onnx", "quantized.fp16.onnx", "quant_plan.json",
                 "calibration_stats.safetensors", "smoothing_factors.safetensors", "quantized_weights.safetensors"):
        assert (tmp_path / name).read_bytes() == (finished / name).read_bytes(), name


def test_a_changed_alpha_reruns_from_quantize(finished, tiny_model_dir, corpus, tmp_path, caplog):
    caplog.set_level("INFO")
    assert engine(tiny_model_dir, finished, corpus, "--alpha", "0.5") == 0
    assert "calibrate: up to date" in caplog.text and "quantize: up to date" not in caplog.text
    assert json.loads((finished / "quant_plan.json").read_text())["alpha"] == 0.5


def test_an_interrupted_write_leaves_no_artifact(tmp_path):
    target = tmp_path / "quantized.onnx"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def save_model_dir(folder, model, tokenizer=None):
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def assert_one_line_error(capsys, code, *fragments):
    # Progress bars also go to stderr; the error is the final line, and it is a single line.
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err
    assert troubleshooting.find(err) is not None, f"not in the README's error list (pipeline/troubleshooting.py): {err}"


def no_artifacts(out):
    return not out.exists() or not [p for p in out.rglob("*") if p.suffix in (".onnx", ".partial", ".plan")]


@pytest.mark.parametrize("args, fragments", [
    (["--model", "./missing/model.gguf"], ["not found", "alias"]),
    (["--alpha", "1.5"], ["ALPHA must be within [0, 1]"]),
    (["--seq-len", "4096"], ["windows", "longer text"]),
    (["--skip", "*.no_such_proj"], ["--skip pattern", "matches no quantizable module"]),
    (["--calib", "missing.txt"], ["does not exist"]),
    (["--sampling-dtype", "float32"], ["--sampling-dtype float32 applies to CALIB=synthetic", "drop --sampling-dtype"]),
    (["--low-memory", "--calib", "synthetic"], ["--low-memory", "synthetic samples text from the whole model"]),
    (["--low-memory", "--accuracy-budget", "1"], ["--low-memory", "--accuracy-budget scores the whole model"]),
    (["--low-memory", "--skip", "*.no_such_proj"], ["--skip pattern", "matches no quantizable module"]),
    (["--rotate-block", "8"], ["--rotate-block must be 0 (off) or a power of 4"]),
    (["--rotate-block", "16", "--quant", "w4a16-rtn"], ["--rotate-block applies to QUANT=w8a8"]),
    (["--rotate-block", "256"], ["--rotate-block 256 does not divide the 128 input channels"]),
])
def test_bad_options_fail_in_one_line(capsys, tmp_path, tiny_model_dir, corpus, args, fragments):
    out = tmp_path / "out"
    # argparse keeps the last --model/--calib, so the case's own value overrides the good default.
    argv = ["--out", str(out), *SMALL, "--model", str(tiny_model_dir), "--calib", str(corpus), *args]
    assert_one_line_error(capsys, stages(argv), *fragments)
    assert no_artifacts(out)


def test_unwritable_out(capsys, tmp_path, tiny_model_dir, corpus):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(capsys, engine(tiny_model_dir, blocker / "out", corpus), "cannot write to OUT")


def test_unsupported_architecture_lists_the_supported_ones(capsys, tmp_path, corpus, tokenizer):
    config = AutoConfig.for_model("gpt2", vocab_size=320, n_embd=32, n_layer=1, n_head=2)
    folder = save_model_dir(tmp_path / "gpt2", AutoModelForCausalLM.from_config(config), tokenizer)
    assert_one_line_error(capsys, engine(folder, tmp_path / "out", corpus), "unsupported architecture 'gpt2'", "llama")


def test_missing_tokenizer(capsys, tmp_path, corpus):
    folder = save_model_dir(tmp_path / "no-tokenizer", tiny_model())
    assert_one_line_error(capsys, engine(folder, tmp_path / "out", corpus), "no usable tokenizer")


def test_nan_weights_are_reported_at_calibration(capsys, tmp_path, corpus, tokenizer):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[0, 0] = float("nan")
    folder = save_model_dir(tmp_path / "nan", model, tokenizer)
    out = tmp_path / "out"
    assert_one_line_error(capsys, engine(folder, out, corpus), "NaN/Inf", "model.layers.1")
    assert not (out / "calibration_stats.safetensors").exists()


def test_require_plan_refuses_without_tensorrt(capsys, finished, tiny_model_dir, corpus):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    code = run(["build", "--model", str(tiny_model_dir), "--out", str(finished), "--calib", str(corpus), *SMALL,
                "--require-plan"])
    assert_one_line_error(capsys, code, "REQUIRE_PLAN=1", "tensorrt")


def test_int8_kv_cache_option_exports_int8_past_and_verifies(tmp_path, tiny_model_dir, corpus):
    from pipeline.runtime import OnnxDecoder

    assert engine(tiny_model_dir, tmp_path, corpus, "--kv-cache-int8") == 0
    scales = json.loads((tmp_path / "kv_cache_scales.json").read_text())
    assert len(scales) == 2 * 2 and all(s > 0 for s in scales.values())
    for graph in ("quantized.onnx", "quantized.fp16.onnx"):
        assert OnnxDecoder(tmp_path / graph).kv_dtype == np.int8
    assert OnnxDecoder(tmp_path / "reference.onnx").kv_dtype == np.float32  # the reference stays float
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kv_cache"] == "int8" and abs(report["accuracy"]["perplexity_delta_percent"]) < 50
    assert report["export_faithfulness"]["faithful"] is None  # the float-cache simulation cannot judge it


def test_int8_attention_option_quantizes_the_attention_matmuls_and_verifies(tmp_path, tiny_model_dir, corpus):
    assert engine(tiny_model_dir, tmp_path, corpus, "--int8-attention") == 0
    ranges = json.loads((tmp_path / "attention_ranges.json").read_text())
    assert len(ranges) == 2 * 2 * 2 and all(v > 0 for v in ranges.values())
    for name in ("quantized.onnx", "quantized.fp16.onnx"):
        nodes = list(ir.load(tmp_path / name).graph)
        assert sum(n.op_type == "QuantizeLinear" and "self_attn/MatMul" in n.name for n in nodes) == 8
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["attention_matmuls"] == "int8" and abs(report["accuracy"]["perplexity_delta_percent"]) < 50
    assert report["export_faithfulness"]["faithful"] is None  # the simulation's attention is float
    generation = report["generation"]  # the KV-cache loop runs through the INT8 attention graph
    assert len(generation["quantized_vs_reference_onnx"]["common_prefix_lengths"]) == 5


def test_rotate_block_option_rotates_the_down_proj_inputs_and_verifies(tmp_path, tiny_model_dir, corpus):
    assert engine(tiny_model_dir, tmp_path, corpus, "--rotate-block", "16") == 0
    plan = json.loads((tmp_path / "quant_plan.json").read_text())["modules"]
    assert {m["name"] for m in plan if m["rotation_block"] == 16} == {f"model.layers.{i}.mlp.down_proj" for i in (0, 1)}
    assert all(m["rotation_block"] is None for m in plan if not m["name"].endswith("down_proj"))
    for name in ("quantized.onnx", "quantized.fp16.onnx"):
        graph = ir.load(tmp_path / name).graph
        quantizers = [n for n in graph if n.op_type == "QuantizeLinear" and "mlp/down_proj" in n.name]
        assert len(quantizers) == 2  # each down_proj quantizes what its rotation produced
        assert all("/down_proj/rotation/" in q.inputs[0].producer().name for q in quantizers)
        assert sum(n.op_type == "MatMul" and "/rotation/" in n.name for n in graph) == 2
    assert not [n for n in ir.load(tmp_path / "reference.onnx").graph if "/rotation/" in n.name]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["export_faithfulness"]["faithful"] is True  # the simulation rotates as the graph does
    assert abs(report["accuracy"]["perplexity_delta_percent"]) < 50
