"""Verification on CPU: Polygraphy's ONNX Runtime backend runs the reference and Q/DQ graphs on real token windows,
compared with each other (accuracy) and with PyTorch's logits (export faithfulness), which pipeline/simulation.py
saved in a process of its own: this module never imports torch.

Loops over windows delete each window's arrays at the end of their body: a loop variable stays bound while the
next item is computed, so the previous window's logits (100 MB on SmolLM2) would be alive during the next
session run or file read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.datatype import DataType
from tqdm import tqdm

from exporters.decoder_io import DecoderShape
from pipeline.artifacts import SavedArrays
from pipeline.memory import release_memory
from pipeline.metrics import PairStats, Perplexity

log = logging.getLogger(__name__)


def onnx_session(path: Path, providers: list[str] | None = None, disabled_optimizers: tuple[str, ...] = (),
                 threads: int | None = None) -> ort.InferenceSession:
    """A CPU session that computes what the graph says. ONNX Runtime's default optimizer fuses an INT4 blocked
    DequantizeLinear + MatMul into MatMulNBits with accuracy_level 4, which also quantizes the activations to
    INT8 on the fly: a W4A8 kernel, not the W4A16 graph. Level 0 keeps the float activations.
    `disabled_optimizers`: for graphs other tools made that trip an ONNX Runtime optimizer bug.
    The CPU memory arena stays on: without it, glibc's heap kept a SmolLM2 prefill's freed activations (0.5 GB more
    at the peak); its memory goes back when the session closes (verify then calls memory.release_memory).
    The memory pattern (one planned block per shape seen) is off: with it the FP16 Q/DQ graph's session grew from
    0.72 to 1.02 GB at its second SmolLM2 window, and the other graphs ran no faster with it (0.8-1.6 s a window).
    Memory reuse planning is off on CPU: the planner took 0.7-3.2 s of each SmolLM2 session's creation (the FP16
    Q/DQ graph: 4.7 -> 1.8 s), and the arena reuses freed blocks anyway: the same logits, the same run time, and no
    more memory (two windows: 776 -> 702 MB for the FP16 Q/DQ graph, 662 -> 661 MB for the FP32 one).
    `threads`: ONNX Runtime's intra-op threads (its default: one per physical core)."""
    options = ort.SessionOptions()
    options.enable_mem_pattern = False
    cpu_only = providers is None or providers == ["CPUExecutionProvider"]
    options.enable_mem_reuse = not cpu_only  # GPU providers keep the default: not measured (no GPU here)
    if threads is not None:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers))


class OpenGraph:
    """One session of a graph for every check that runs it: creating one costs 1-2 s on SmolLM2 (onnx_session),
    as much as one or two windows. Closing drops the only reference to the session (its weights and arena go back
    to the system) before the next graph's session opens."""

    def __init__(self, path: Path, disabled_optimizers: tuple[str, ...] = ()):
        self.path = Path(path)
        self.session = onnx_session(self.path, disabled_optimizers=disabled_optimizers)

    def __enter__(self) -> OpenGraph:
        return self

    def __exit__(self, *exc) -> None:
        self.session = None
        release_memory()


@contextmanager
def marked_graph(path: Path, names: list[str], only: bool = False,
                 start: tuple[str, np.dtype] | None = None) -> Iterator[OpenGraph]:
    """A session of the graph that also outputs the intermediate tensors `names`. A session computes and holds every
    output it was built with, fetched or not, so each check marks only what it reads. With `only`, the graph is cut
    down to computing `names` alone, reading `start` (name, dtype), when given, as an input the caller feeds
    (exporters.probes.probe_subgraph). The marked graph is written beside the original as a hidden file, so that it
    points into the original's data file (only the graph is written, no copy of the weights), and deleted when the
    session closes."""
    import onnx_ir as ir

    from exporters.probes import probe_subgraph, with_outputs

    marked = path.with_name(f".marked-{path.name}")
    model = ir.load(path)
    if only:
        probe_subgraph(model, names, start)
    else:
        with_outputs(model, names)
    ir.save(model, marked)  # external tensors keep their place in the original's data file
    del model
    release_memory()  # the IR graph holds reference cycles: free it before the session loads the weights
    try:
        with OpenGraph(marked) as graph:
            yield graph
    finally:
        marked.unlink(missing_ok=True)


def window_feeder(runner: OnnxrtRunner, reserved_slots: int = 0):
    """window -> the decoder graph's inputs for that whole window with an empty past (teacher-forced logits);
    `reserved_slots` masked past slots first (DecoderShape.prefill_feed)."""
    metadata = runner.get_input_metadata()
    shape = DecoderShape.from_inputs({name: meta.shape for name, meta in metadata.items()})
    past_dtype = DataType.to_dtype(metadata[shape.past_names[0]].dtype, "numpy")
    return lambda window: shape.prefill_feed(window[None, :], past_dtype, reserved_slots)


def session_logits(session: ort.InferenceSession, windows: np.ndarray, label: str | None = None):
    """Teacher-forced logits of the session's graph (Polygraphy's ONNX Runtime runner) on each window, as float32
    (progress shown when labelled)."""
    with OnnxrtRunner(session) as runner:
        feed = window_feeder(runner)
        for window in tqdm(windows, desc=label, unit="window", disable=label is None):
            yield runner.infer(feed(window))["logits"].astype(np.float32, copy=False)  # FP16 graphs: a float32 copy


def graph_logits(path: Path, windows: np.ndarray, label: str | None = None,
                 disabled_optimizers: tuple[str, ...] = ()):
    """session_logits of the graph in a session of its own, closed also when the caller stops early."""
    with OpenGraph(path, disabled_optimizers) as graph:
        yield from session_logits(graph.session, windows, label)


class PairMetrics:
    """Perplexity of both and every PairStats metric of a candidate against a reference, added window by window."""

    def __init__(self):
        self.reference, self.candidate, self.pair = Perplexity(), Perplexity(), PairStats()

    def add(self, window: np.ndarray, reference: np.ndarray, candidate: np.ndarray) -> None:
        """window: the tokens [positions]; reference, candidate: their logits [1, positions, vocab]."""
        reference_lse, candidate_lse = self.pair.add(reference, candidate)
        self.reference.add_window(reference, window, reference_lse)
        self.candidate.add_window(candidate, window, candidate_lse)

    def summary(self) -> dict:
        ref_ppl, cand_ppl = self.reference.value(), self.candidate.value()
        return {
            "perplexity_reference": ref_ppl,
            "perplexity_candidate": cand_ppl,
            "perplexity_delta_percent": 100.0 * (cand_ppl / ref_ppl - 1.0),
            "predicted_tokens": self.reference.count,
            **self.pair.summary(),
        }


def pair_metrics(windows: np.ndarray, reference_logits, candidate_logits) -> dict:
    metrics = PairMetrics()
    for window, ref, cand in zip(windows, reference_logits, candidate_logits):
        metrics.add(window, ref, cand)
        del ref, cand  # gone before the next window's (module note)
    return metrics.summary()


def compare_graphs(reference: Path, candidate: Path, windows: np.ndarray, label: str, saved: MutableMapping,
                   candidate_disabled_optimizers: tuple[str, ...] = ()) -> dict:
    """The candidate against the reference on the same windows. One session at a time: the reference's logits wait
    in `saved` (SavedArrays, on disk) and are read back a window at a time while the candidate runs; two graphs'
    sessions side by side would hold both models' weights and ONNX Runtime arenas at once."""
    for i, values in enumerate(graph_logits(reference, windows, f"{label}: {reference.name}")):
        saved[f"reference{i}"] = values
        del values  # gone before the next window's (module note)
    kept = (saved[f"reference{i}"] for i in range(len(windows)))
    result = pair_metrics(windows, kept, graph_logits(candidate, windows, f"{label}: {candidate.name}",
                                                      candidate_disabled_optimizers))
    saved.clear()  # 100 MB a window for SmolLM2: the disk space goes back before the next check
    return result


def save_reference_logits(graph: OpenGraph, windows: np.ndarray, saved: MutableMapping, label: str) -> None:
    """The reference graph's one pass over the evaluation windows: each window's logits saved as reference<i>
    (SavedArrays: a 512-token window of a 49k vocabulary is 100 MB), for the graphs that run next and for
    `faithfulness`, which compares them once this session is closed: comparisons beside a running session raised
    SmolLM2's reference pass from 1,475 to 1,657-1,742 MB."""
    for i, logits in enumerate(session_logits(graph.session, windows, label)):
        saved[f"reference{i}"] = logits
        del logits  # gone before the next window's (module note)


def faithfulness(expected: Iterable[np.ndarray], logits: Iterable[np.ndarray]) -> dict:
    """A graph's logits against those of the PyTorch model it was exported from (computed before any session
    opened, so model and session never share memory), window by window, on as many windows as both give."""
    stats = PairStats()
    for baseline, candidate in zip(expected, logits):
        stats.add(baseline, candidate)
        del baseline, candidate  # gone before the next window's (module note)
    return stats.summary()


def check_quantized(graph: OpenGraph, windows: np.ndarray, simulated_logits: Iterable[np.ndarray],
                    saved: MutableMapping, keep: int, label: str) -> tuple[dict, dict]:
    """The Q/DQ graph's one pass over the evaluation windows, after save_reference_logits. Returns its first windows
    against the PyTorch fake-quant simulation (faithfulness) and every window against the reference's saved logits
    (accuracy). The logits of both graphs on the first `keep` windows stay saved (reference<i>, quantized<i>) for
    precision_floors; the reference's others are deleted as they are used."""
    faithful, accuracy, expected = PairStats(), PairMetrics(), iter(simulated_logits)
    for i, (window, logits) in enumerate(zip(windows, session_logits(graph.session, windows, label))):
        accuracy.add(window, saved[f"reference{i}"], logits)
        if (simulated := next(expected, None)) is not None:
            faithful.add(simulated, logits)
        if i < keep:
            saved[f"quantized{i}"] = logits
        else:
            del saved[f"reference{i}"]
        del logits, simulated  # gone before the next window's (module note)
    return faithful.summary(), accuracy.summary()


def precision_floors(reference_fp16: Path, quantized_fp16: Path, windows: np.ndarray, saved: SavedArrays) -> dict:
    """What arithmetic precision alone changes, measured rather than assumed, on the windows whose FP32 logits
    check_quantized kept in `saved` (reference<i>, quantized<i>; read back a window at a time, cleared at the end):
    - float: the FP16 reference against the FP32 reference. A float implementation (the exported graph against
      PyTorch, a TensorRT FP16 plan against ONNX Runtime) is within tolerance when it deviates no more.
    - quantized: the FP16 Q/DQ graph against the FP32 Q/DQ graph. A W8A8 graph is discontinuous (a rounding at a
      Q node flips for a tiny input change), so the same recipe at another precision moves much further than the
      float floor; an INT8 TensorRT plan is held to this spread, not to the float one.
    - fp16_qdq_vs_reference: the graph TensorRT builds, against the FP32 reference."""
    # Each FP16 graph's logits are saved and its session closed before any comparison runs: the comparisons'
    # float64 temporaries beside a running FP16 session raised verify's peak by ~0.4 GB on SmolLM2.
    for label, path in (("reference_fp16", reference_fp16), ("quantized_fp16", quantized_fp16)):
        for i, values in enumerate(graph_logits(path, windows, f"{path.name} (precision floors)")):
            saved[f"{label}{i}"] = values
            del values  # gone before the next window's (module note)

    float_floor = pair_metrics(windows, saved.numbered("reference", len(windows)),
                               saved.numbered("reference_fp16", len(windows)))
    quantized_floor, fp16_qdq = PairMetrics(), PairMetrics()
    for i, window in enumerate(windows):  # the FP16 Q/DQ graph's logits read once for both of its comparisons
        qdq_fp16 = saved[f"quantized_fp16{i}"]
        quantized_floor.add(window, saved[f"quantized{i}"], qdq_fp16)
        fp16_qdq.add(window, saved[f"reference{i}"], qdq_fp16)
        del qdq_fp16  # gone before the next window's (module note)
    saved.clear()
    return {"float": float_floor, "quantized": quantized_floor.summary(), "fp16_qdq_vs_reference": fp16_qdq.summary()}


def compare_plan(plan: Path, graph: Path, windows: np.ndarray, label: str) -> dict:
    """A TensorRT plan (Polygraphy TrtRunner, prefill profile) against ONNX Runtime on the graph it was built
    from, on identical feeds: the plan's reserved cache slot (trt_builder/profiles.py) is fed, masked, to both.
    Written against Polygraphy's TensorRT backend; NOT run here (no TensorRT on these machines)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from trt_builder.profiles import RESERVED_SLOTS

    stats = PairStats()
    with OpenGraph(graph) as opened, OnnxrtRunner(opened.session) as onnx, \
            TrtRunner(EngineFromBytes(plan.read_bytes()), optimization_profile=0) as trt:
        feed = window_feeder(onnx, RESERVED_SLOTS)
        for window in tqdm(windows, desc=label, unit="window"):
            inputs = feed(window)
            stats.add(onnx.infer(inputs)["logits"], np.asarray(trt.infer(inputs)["logits"]))
    return stats.summary()


# Greedy generation through the KV-cache graphs (the loop production services run), on fixed varied prompts.
GENERATION_PROMPTS = (
    "The capital of France is",
    "Here is a short poem about the sea:",
    "In 1905, Albert Einstein published",
    "def fibonacci(n):",
    "The three primary colors are",
)
GENERATED_TOKENS = 32


def onnx_greedy(graph: OpenGraph, prompts: list[list[int]], new_tokens: int, stops: tuple[int, ...]) -> list[list[int]]:
    """Greedy tokens of our KV-cache loop, in the graph's session its logits checks ran in. The prompts go in as one
    left-padded batch, as in simulation.torch_greedy: on SmolLM2 3.4 -> 1.0 s for the reference graph and 2.9 ->
    0.8 s for the Q/DQ graph against one prompt at a time, with the same tokens for every prompt in both graphs."""
    from pipeline.generation import Sampling, generate_ids
    from pipeline.runtime import OnnxDecoder

    engine = OnnxDecoder(graph.path, session=graph.session)
    return generate_ids(engine, prompts, new_tokens, Sampling(stop_token_ids=stops, min_new_tokens=new_tokens))


def generation_agreement(baseline: list[list[int]], candidate: list[list[int]]) -> dict:
    """Per prompt: tokens equal at the same step, and the length of the common prefix (greedy outputs diverge for
    good after the first different token, so the prefix is the meaningful figure). Identical means the same
    tokens and the same length (both stopped at the same end-of-sequence token, or both ran to the limit)."""
    prefixes, same, total = [], 0, 0
    for b, c in zip(baseline, candidate):
        prefix = next((i for i, (x, y) in enumerate(zip(b, c)) if x != y), min(len(b), len(c)))
        prefixes.append(prefix)
        same += sum(x == y for x, y in zip(b, c))
        total += len(b)
    return {"prompts": len(baseline), "identical": sum(b == c for b, c in zip(baseline, candidate)),
            "token_agreement": same / max(total, 1), "common_prefix_lengths": prefixes,
            "mean_common_prefix": float(np.mean(prefixes))}
