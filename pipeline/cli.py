"""`python -m pipeline <stage>`: one subcommand per stage, and `engine` chaining them all."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from calibration import CalibrationError
from exporters import ExportError
from pipeline import PipelineError
from pipeline.accuracy_target import Target
from pipeline.config import (RANGE_ESTIMATORS, SAMPLING_DTYPES, SCHEMES, WEIGHT_CLIPS, BuildConfig, CalibrationConfig,
                             ExportConfig, QuantConfig, RunConfig)
from trt_builder import BuildError

USER_ERRORS = (PipelineError, CalibrationError, ExportError, BuildError)
ORDER = ("calibrate", "quantize", "export", "build", "verify")
HELP = {
    "calibrate": "token windows + per-channel activation absmax of every decoder linear input",
    "quantize": "SmoothQuant factors and the W8A8 plan, or GPTQ/RTN weights; integer weights and plan saved",
    "export": "reference ONNX, Q/DQ ONNX (FP32 for ONNX Runtime, FP16 for TensorRT), module map, lint",
    "build": "TensorRT plan from the FP16 Q/DQ ONNX (skipped with a reason where TensorRT is absent)",
    "verify": "ONNX Runtime vs PyTorch and reference vs Q/DQ on evaluation windows, precision floors, layer-wise "
              "diff; then report.json/.md/.html",
    "engine": "all stages in order, each in a process of its own, resuming from what OUT already holds",
    "triton": "a Triton Inference Server model repository (config.pbtxt + model) from an OUT folder",
    "report": "report.json/.md/.html from the artifacts in OUT (no recalibration); --bisect finds the fewest linears "
              "to keep float for an accuracy target",
    "serve": "OpenAI-style /v1/completions and /health on localhost, from an OUT folder (TensorRT or ONNX Runtime)",
}


def _alpha(text: str) -> float | str:
    """A number or one of the search modes; QuantConfig says what is wrong with anything else."""
    try:
        return float(text)
    except ValueError:
        return text


def _add_options(p: argparse.ArgumentParser) -> None:
    d_cal, d_q, d_b = CalibrationConfig(), QuantConfig(), BuildConfig()
    p.add_argument("--model", default="smollm2-135m", help="hub id, local HF folder, .gguf file or alias")
    p.add_argument("--out", default=None, help="output folder (default build/<model-name>)")
    p.add_argument("--calib", default=d_cal.source,
                   help="calibration .txt/.jsonl file, a Hugging Face dataset hf:<name>[:<config>[:<split>]], or "
                        "'synthetic' (text sampled from the model)")
    p.add_argument("--chat-template", action="store_true",
                   help="render each calibration record (jsonl 'messages' or 'text', a .txt paragraph) with the "
                        "model's chat template before tokenizing")
    p.add_argument("--sampling-dtype", default=d_cal.sampling_dtype, choices=SAMPLING_DTYPES,
                   help="CALIB=synthetic: the dtype text is sampled in (auto: bfloat16 where the CPU has it natively, "
                        "else float32)")
    p.add_argument("--eval", default=None, help="evaluation text (default: held-out windows of the calibration source)")
    p.add_argument("--calib-windows", type=int, default=d_cal.windows)
    p.add_argument("--eval-windows", type=int, default=d_cal.eval_windows)
    p.add_argument("--seq-len", type=int, default=d_cal.seq_len)
    p.add_argument("--seed", type=int, default=d_cal.seed)
    p.add_argument("--batch-size", type=int, default=d_cal.batch_size, help="calibration batch size")
    p.add_argument("--quant", default=d_q.scheme, metavar="SCHEME",
                   help=f"quantization scheme: {', '.join(SCHEMES)} (w8a8: SmoothQuant + INT8; -gptq: GPTQ weights; "
                        "w4a16/w3a16: weight-only INT4 blocked DequantizeLinear)")
    p.add_argument("--group-size", type=int, default=d_q.group_size,
                   help="weight-only schemes: input columns per weight scale (-1: per output channel)")
    p.add_argument("--damp", type=float, default=d_q.damp, help="GPTQ dampening, fraction of mean Hessian diagonal")
    p.add_argument("--no-act-order", action="store_true",
                   help="GPTQ in natural column order (default: act-order with static groups)")
    p.add_argument("--no-float-target", action="store_true",
                   help="GPTQ fits each layer to its own float output on quantized inputs (the original GPTQ) "
                        "instead of the float model's output")
    p.add_argument("--alpha", type=_alpha, default=d_q.alpha,
                   help="SmoothQuant migration strength: a number in [0, 1] for every layer, 'auto' (per-group search "
                        "on calibration inputs) or 'grid' (best global value on the holdout windows)")
    p.add_argument("--range-estimator", default=d_q.range_estimator, choices=RANGE_ESTIMATORS,
                   help="activation range: calibration max, a percentile of |x|, or the MSE-optimal clipping")
    p.add_argument("--weight-clip", default=None, choices=WEIGHT_CLIPS,
                   help="INT8 weights (QUANT=w8a8): 'mse' (its default) clips each row where that lowers its "
                        "input-power-weighted error on calibration inputs; 'none' maps each row's max|w| to 127")
    p.add_argument("--percentile", type=float, default=d_q.percentile, help="percentile for --range-estimator percentile")
    p.add_argument("--rotate-block", type=int, default=None, metavar="N",
                   help="QUANT=w8a8: rotate each down_proj input online by a block Hadamard of N channels (a power "
                        "of 4) before its INT8 quantizer, spreading its outlier channels; default 64 where it divides "
                        "the channels (not with --no-smooth); 0: off")
    p.add_argument("--accuracy-budget", default=None, metavar="TARGET",
                   help="ppl:<percent> (or just <percent>) or kl:<nats>: keep the fewest activation groups float so "
                        "the holdout windows stay within it (the 95%% upper bound of perplexity above float, or mean KL "
                        "from float)")
    p.add_argument("--holdout-windows", type=int, default=d_cal.holdout_windows,
                   help="calibration-source windows kept out of the statistics to score tuning choices")
    p.add_argument("--no-smooth", action="store_true", help="naive W8A8 without SmoothQuant (for comparison)")
    p.add_argument("--include", action="append", default=[], help="quantize only modules matching this glob")
    p.add_argument("--skip", action="append", default=[], help="keep modules matching this glob in float")
    p.add_argument("--skip-file", default=None, metavar="FILE",
                   help="keep the modules listed in FILE (one glob per line) in float, e.g. OUT/float_modules.txt "
                        "written by `report --bisect`")
    p.add_argument("--kv-cache-int8", action="store_true",
                   help="INT8 KV cache: past/present as INT8 with calibrated per-tensor scales (default: float)")
    p.add_argument("--int8-attention", action="store_true",
                   help="INT8 attention matmuls (SmoothQuant O3): Q/DQ with calibrated per-tensor scales on both "
                        "inputs of QK^T and PV (default: float)")
    p.add_argument("--low-memory", action="store_true",
                   help="calibrate and quantize one decoder layer at a time, read from the checkpoint (peak memory: "
                        "about one layer plus the calibration hidden states); export and verify still load the model")
    p.add_argument("--max-batch", type=int, default=d_b.max_batch, help="TensorRT profile max batch")
    p.add_argument("--max-input-len", type=int, default=d_b.max_input_len, help="TensorRT prefill profile: longest prompt")
    p.add_argument("--max-seq-len", type=int, default=d_b.max_seq_len,
                   help="TensorRT decode profile: longest prompt + generated tokens")
    p.add_argument("--require-plan", action="store_true", default=os.environ.get("REQUIRE_PLAN") == "1",
                   help="fail when the TensorRT plan cannot be built (also REQUIRE_PLAN=1)")
    p.add_argument("-v", "--verbose", action="store_true")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m pipeline", description="SmoothQuant W8A8 or GPTQ W4A16 -> verified Q/DQ ONNX -> TensorRT")
    sub = root.add_subparsers(dest="command", required=True)
    for name in ORDER + ("engine",):
        _add_options(sub.add_parser(name, help=HELP[name], description=HELP[name]))
    _add_serve_options(sub.add_parser("serve", help=HELP["serve"], description=HELP["serve"]))
    _add_triton_options(sub.add_parser("triton", help=HELP["triton"], description=HELP["triton"]))
    _add_report_options(sub.add_parser("report", help=HELP["report"], description=HELP["report"]))
    return root


def _add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="OUT folder of `make engine`")
    p.add_argument("--bisect", default=None, metavar="TARGET",
                   help="ppl:<percent> or kl:<nats>: the fewest linears to keep float to meet it on the evaluation "
                        "windows, written to OUT/float_modules.txt for --skip-file")
    p.add_argument("-v", "--verbose", action="store_true")


def _report(args: argparse.Namespace) -> None:
    from pipeline.bisect import bisect
    from pipeline.report_files import write_reports
    from pipeline.run import VERIFICATION

    out = Path(args.out)
    if not (out / VERIFICATION).is_file():
        raise PipelineError(f"{out} has no {VERIFICATION}: run `make engine OUT={out}` first (its verify stage)")
    if args.bisect is not None:
        found = bisect(out, Target.parse(args.bisect, "--bisect"))
        print(f"bisect: {len(found['exclusions'])} linears float -> {found['target']['metric']} {found['result']:.4g} "
              f"(target {found['target']['value']}, {'met' if found['met'] else 'NOT met'}); exclusion list "
              f"{found['exclusion_file']}")
    print(f"report: {write_reports(out)} (also report.html, report.json)")


def skip_globs(args: argparse.Namespace) -> tuple[str, ...]:
    """--skip globs plus the lines of --skip-file (blank lines and # comments ignored)."""
    listed = []
    if args.skip_file is not None:
        path = Path(args.skip_file)
        if not path.is_file():
            raise PipelineError(f"--skip-file {path} does not exist: give the float_modules.txt that "
                                "`python -m pipeline report --bisect` wrote")
        listed = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return tuple(args.skip) + tuple(g for g in listed if g)


def _add_triton_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="OUT folder of `make engine`")
    p.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime"), default="auto",
                   help="auto: the TensorRT plan if OUT has one, else Triton's ONNX Runtime backend on quantized.onnx")
    p.add_argument("--repository", default=None, help="model repository folder (default OUT/triton)")
    p.add_argument("--name", default="smoothtrt", help="model name in the repository")
    p.add_argument("--max-batch", type=int, default=BuildConfig().max_batch,
                   help="max_batch_size for the ONNX Runtime backend (a plan's comes from its manifest)")
    p.add_argument("-v", "--verbose", action="store_true")


def _triton(args: argparse.Namespace) -> None:
    from trt_builder.triton import PLAN, write_repository

    out = Path(args.out)
    if not out.is_dir():
        raise PipelineError(f"--out {out} is not a folder: run `make engine OUT={out}` first")
    backend = args.backend
    if backend == "auto":
        backend = "tensorrt" if (out / PLAN).is_file() else "onnxruntime"
        if backend == "onnxruntime":
            logging.warning("triton: no TensorRT plan in %s (none was built on this machine); the repository uses "
                            "Triton's ONNX Runtime backend on quantized.onnx", out)
    folder = write_repository(out, Path(args.repository or out / "triton"), args.name, backend, args.max_batch)
    print(f"triton: {backend} model repository written to {folder}")


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    from pipeline.serve import ServeLimits

    d = ServeLimits()
    p.add_argument("--engine", required=True, help="OUT folder of `make engine` (its plan if TensorRT runs here, "
                                                   "else quantized.onnx), or a .plan/.onnx file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="largest max_tokens a request may ask")
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len, help="prompt + generated tokens per request")
    p.add_argument("--max-pending", type=int, default=d.max_pending, help="requests admitted at once; more get 503")
    p.add_argument("-v", "--verbose", action="store_true")


def config_from(args: argparse.Namespace) -> RunConfig:
    from pipeline.models import resolve

    out = args.out or str(Path("build") / resolve(args.model).name)
    return RunConfig(
        model=args.model,
        out=out,
        calibration=CalibrationConfig(args.calib, args.eval, args.calib_windows, args.holdout_windows,
                                      args.eval_windows, args.seq_len, args.seed, args.batch_size,
                                      args.chat_template, args.sampling_dtype),
        quant=QuantConfig(args.alpha, not args.no_smooth, tuple(args.include), skip_globs(args),
                          args.range_estimator, args.percentile, accuracy_budget=args.accuracy_budget,
                          scheme=args.quant, group_size=args.group_size, damp=args.damp,
                          act_order=not args.no_act_order, float_target=not args.no_float_target,
                          weight_clip=args.weight_clip, rotation_block=args.rotate_block),
        export=ExportConfig(kv_cache_int8=args.kv_cache_int8, int8_attention=args.int8_attention),
        build=BuildConfig(max_batch=args.max_batch, max_input_len=args.max_input_len, max_seq_len=args.max_seq_len,
                          require_plan=args.require_plan),
        low_memory=args.low_memory,
    )


def stage_processes(argv: list[str]) -> int:
    """`engine`: each stage as `python -m pipeline <stage>` with the same options, as `make engine` runs them, until
    one fails (it printed its error; its exit code is returned). In one process the stages' memory added up: the
    process held 0.70 GB of torch and freed heap when verify began, and SmolLM2 W8A8 peaked at 1.80 GB, against 1.28
    GB with a process per stage (issue 7's limit: 1.35 GB). This process imports neither torch nor the model (17 MB).
    Ctrl-C reaches the running stage through the terminal's process group, and the stage ends as it does alone
    (code 130, completed stages kept); this process ignores it, and each stage starts with SIGINT as it found it
    (a child would inherit the ignoring)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    in_child = signal.SIG_IGN if previous == signal.SIG_IGN else signal.SIG_DFL  # SIG_DFL: Python sets its handler
    try:
        for stage in ORDER:
            code = subprocess.call([sys.executable, "-m", "pipeline", stage, *argv],
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, in_child))
            if code != 0:
                return 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + N
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.command == "engine":
        return stage_processes(argv[1:])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "serve":
            from pipeline.serve import ServeLimits, serve

            serve(args.engine, args.host, args.port, ServeLimits(max_tokens=args.max_tokens,
                                                                  max_seq_len=args.max_seq_len,
                                                                  max_pending=args.max_pending))
            return 0
        if args.command == "triton":
            _triton(args)
            return 0
        if args.command == "report":
            _report(args)
            return 0
        from pipeline.memory import map_large_blocks
        from pipeline.run import STAGE_FUNCTIONS, Run, announce_memory

        config = config_from(args)
        if config.low_memory:
            map_large_blocks()
        config.build.limits()  # bad limits fail before any stage runs
        current = Run(config)
        if args.command != "verify":  # verify: its PyTorch side's process announces it (reading the model's config
            announce_memory(current, (args.command,))  # imports transformers, and with it torch)
        module, _, function = STAGE_FUNCTIONS[args.command].partition(":")  # verify's module never imports torch
        getattr(importlib.import_module(module), function)(current)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; completed stages are kept and the next run resumes after them", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk or a file-size limit mid-write: the stage's temporary files are gone
        full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        where = f" writing {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}: "
              f"{'free disk space or choose another OUT' if full else 'check the path and its permissions'}; "
              "completed stages are kept", file=sys.stderr)
        return 2
    return 0


def main() -> None:
    sys.exit(run())
