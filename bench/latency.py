"""ONNX Runtime CPU latency of decoder graphs side by side, and which kernels ran their MatMuls."""

from __future__ import annotations

import collections
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from exporters.decoder_io import DecoderShape
from pipeline.runtime import OnnxDecoder

PREFILL_SHAPES = {"prefill 1x512": (1, 512), "prefill 4x128": (4, 128)}
DECODE_PROMPT, DECODE_STEPS = 128, 32
INTEGER_MATMULS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "QGemm")
FLOAT_MATMULS = ("MatMul", "FusedMatMul", "Gemm", "MatMulNBits")


def _prefill_seconds(engine: OnnxDecoder, ids: np.ndarray) -> float:
    start = time.perf_counter()
    engine.prefill_logits(ids)
    return time.perf_counter() - start


def _decode_step_seconds(engines: dict[str, OnnxDecoder], ids: np.ndarray) -> dict[str, list[float]]:
    """Each graph prefills the prompt into its own cache, then the graphs take turns one decode step at a time."""
    caches = {}
    for label, engine in engines.items():
        caches[label] = engine.new_cache(1, DECODE_PROMPT + DECODE_STEPS)
        engine.step(ids[:, :DECODE_PROMPT], np.ones((1, DECODE_PROMPT), np.int64), np.arange(DECODE_PROMPT)[None],
                    caches[label])
    times = {label: [] for label in engines}
    for t in range(DECODE_PROMPT, DECODE_PROMPT + DECODE_STEPS):
        for label, engine in engines.items():
            start = time.perf_counter()
            engine.step(ids[:, t:t + 1], np.ones((1, t + 1), np.int64), np.array([[t]]), caches[label])
            times[label].append(time.perf_counter() - start)
    return times


def _tokens(text_tokens: np.ndarray, batch: int, length: int) -> np.ndarray:
    return np.resize(text_tokens, batch * length).reshape(batch, length).astype(np.int64)


def compare(graphs: dict[str, tuple[Path, tuple[str, ...]]], repeats: int, text_tokens: np.ndarray,
            threads: int | None = None) -> dict:
    """Milliseconds per graph (path, ONNX Runtime optimizers to disable) and shape on real token ids: the median and
    the best of the samples. The graphs take turns sample by sample, so a change of machine load hits all of them
    alike as far as it can; the ratios between graphs are the figures to quote.
    Why the best too: on our 2-vCPU machines ONNX Runtime's two threads run in fast and slow periods of several
    seconds. One process timing the same Q/DQ graph on the same 1x512 input measured 455-486 ms, then 599-653 ms
    for 18 runs, then 465-486 ms again (docs/RESULTS.md), and the slow periods slow the INT8 graph more (x1.3-1.4)
    than the FP32 one (x1.1-1.2). Such interference only ever adds time, so the best sample is the speed the graph
    runs at (what `timeit` reports, for the same reason); the medians say how often the machine was slow. A slow
    period can outlast a whole comparison (the bench at 1974a98: every 1x512 sample of every graph). With one
    thread (`threads=1`) there are no such periods: the Q/DQ graph took 861-914 ms in each of 4 processes."""
    engines = {label: OnnxDecoder(path, disabled_optimizers=off, threads=threads)
               for label, (path, off) in graphs.items()}
    inputs = {name: _tokens(text_tokens, *shape) for name, shape in PREFILL_SHAPES.items()}
    samples = {label: collections.defaultdict(list) for label in graphs}
    for engine in engines.values():  # warm-up: allocations, kernel choices
        for ids in inputs.values():
            engine.prefill_logits(ids)
    for _ in range(repeats):
        for name, ids in inputs.items():
            for label, engine in engines.items():
                samples[label][name].append(_prefill_seconds(engine, ids))
    decode = _decode_step_seconds(engines, _tokens(text_tokens, 1, DECODE_PROMPT + DECODE_STEPS))
    for label, times in decode.items():
        samples[label]["decode step (KV cache)"] = times
    return {label: {name: {"median_ms": 1e3 * statistics.median(values), "best_ms": 1e3 * min(values),
                           "samples": len(values)}
                    for name, values in by_shape.items()}
            for label, by_shape in samples.items()}


def kernel_census(path: Path, disabled_optimizers: tuple[str, ...] = ()) -> dict:
    """ONNX Runtime's profile of one prefill: how many integer and float MatMul kernels ran."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(path).with_suffix("")) + ".profile"
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(disabled_optimizers))
    shape = DecoderShape.from_session(session)
    session.run(["logits"], shape.prefill_feed(np.arange(64)[None]))
    profile = Path(session.end_profiling())
    ops = collections.Counter(event["args"]["op_name"] for event in json.loads(profile.read_text())
                              if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"))
    profile.unlink()
    return {"integer_matmuls": sum(ops[o] for o in INTEGER_MATMULS), "float_matmuls": sum(ops[o] for o in FLOAT_MATMULS),
            "ops": {op: n for op, n in ops.items() if op in INTEGER_MATMULS + FLOAT_MATMULS}}
