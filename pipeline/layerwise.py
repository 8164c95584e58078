"""Layer-wise diff of the reference and Q/DQ graphs: where quantization error enters and where it grows, keyed by
PyTorch module name.

Both graphs run in ONNX Runtime on the same evaluation windows with chosen tensors marked as outputs
(exporters/probes.py). Per quantized GEMM two numbers:
- local SNR: the GEMM's own output y_q against the float GEMM on the same input, x' W' (x' the input the Q node
  reads, W' the smoothed float weight). Upstream error is in both sides, so this is the error this GEMM adds
  (activation rounding and clipping, weight rounding): where error enters.
- output SNR: y_q against the reference graph's output of the same module, upstream error included: how much
  error has accumulated there. Smoothing divides a producer's output rows (v_proj, up_proj) by its factor, so
  those outputs are multiplied back before comparing.
Per decoder block: the residual stream's SNR against the reference, and its drop from the previous block (where
error grows).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from exporters.decoder_io import DecoderShape
from exporters.probes import Probes, find_probes, gemm_weight, layer_of
from pipeline.artifacts import SavedArrays
from pipeline.memory import release_memory
from pipeline.metrics import snr_db
from pipeline.runtime import kv_dtype
from pipeline.verify import OpenGraph, marked_graph

# A GEMM adds a "large" error when its local error power is 100x (20 dB) the median GEMM's of the same run:
# ordinary INT8 rounding differs between GEMMs by a few dB; a wrong scale or weight costs tens of dB.
LARGE_ERROR_DB = 20.0


@dataclass
class TensorError:
    """Streaming error power and cosine of a candidate tensor against a baseline."""

    signal: float = 0.0
    error: float = 0.0
    dot: float = 0.0
    candidate: float = 0.0

    def add(self, baseline: np.ndarray, candidate: np.ndarray) -> None:
        b, c = baseline.astype(np.float64).ravel(), candidate.astype(np.float64).ravel()
        self.signal += float(b @ b)
        self.error += float((c - b) @ (c - b))
        self.dot += float(b @ c)
        self.candidate += float(c @ c)

    def snr_db(self) -> float | None:
        return snr_db(self.signal, self.error)

    def cosine(self) -> float:
        return self.dot / max(np.sqrt(self.signal * self.candidate), 1e-300)


class _GraphProbes:
    """A graph's probes, and the input-channel absmax of each module's weight as the graph multiplies it
    (dequantized where quantized), found once for every pass of the diff. Each pass marks only its own probes
    (verify.marked_graph): a session computes and holds every output it was built with (SmolLM2: ~0.7 GB per graph
    for all 30 layers' probes), so a session per pass holds a pass's worth. A pass's graph is cut down to its own
    blocks, fed the previous pass's last block output (Start): exact, since that tensor is all a block reads from
    the blocks before it (a test checks the diff in passes equals the diff in one)."""

    def __init__(self, path: Path, modules: list[str]):
        model = ir.load(path)
        self.probes = find_probes(model, modules)
        self.weight_absmax = {m: np.abs(gemm_weight(model, m)).max(1) for m in modules}
        del model
        release_memory()  # the IR graph holds reference cycles: free its weights before a session copies them
        self.path = path

    def mark(self, probes: Probes, start: Start | None):
        """A session of the graph computing `probes` alone, from the previous pass's block output where there was
        one: one pass long; close it (leave its `with`) before the other graph's opens, and its arena's memory goes
        back."""
        return marked_graph(self.path, probes.names(), only=True,
                            start=(start.name, start.values[0].dtype) if start else None)


@dataclass
class Start:
    """Where a pass starts in one graph: the previous pass's last block output (its tensor name) on each window."""

    name: str
    values: list[np.ndarray]

    def feed(self, window_index: int) -> dict[str, np.ndarray]:
        return {self.name: self.values[window_index]}


def fetch(graph: OpenGraph, window: np.ndarray, names: list[str],
          fed: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The probes `names` of a marked graph's session on one window; `fed`: values of tensors the marked graph
    reads as inputs (Start.feed)."""
    shape = DecoderShape.from_session(graph.session)
    feed = shape.prefill_feed(window[None, :], kv_dtype(graph.session, shape))
    return dict(zip(names, graph.session.run(names, {**feed, **(fed or {})})))


def clipped_fraction(x: np.ndarray, scale: float) -> float:
    """Share of the values a symmetric INT8 quantizer with this scale saturates (|x / scale| beyond 127.5)."""
    return float((np.abs(x / scale) > 127.5).mean())


def channel_absmax(x: np.ndarray) -> np.ndarray:
    return np.abs(x.reshape(-1, x.shape[-1])).max(0).astype(np.float32)


# Decoder layers whose probes one ONNX Runtime pass marks and fetches: every probe of a window comes back at once
# (SmolLM2: ~0.7 GB per graph for all 30 layers), so the diff runs in passes of a few layers. 10: SmolLM2's passes of
# 15 peaked at 1,356 MiB (verify's graph process), over 2.5x the FP32 model (measured before passes ran cut graphs).
LAYERS_PER_PASS = 10


@dataclass
class _Accumulated:
    """What the passes add up, per module and per block, in execution order."""

    local: dict[str, TensorError] = field(default_factory=dict)
    accumulated: dict[str, TensorError] = field(default_factory=dict)
    clipped: dict[str, list[float]] = field(default_factory=dict)
    channels: dict[str, np.ndarray] = field(default_factory=dict)
    blocks: dict[str, TensorError] = field(default_factory=dict)


def layer_passes(modules: list[str], layers_per_pass: int) -> list[list[str]]:
    """The modules grouped so that each pass holds whole decoder layers."""
    layers = list(dict.fromkeys(layer_of(m) for m in modules))
    return [[m for m in modules if layer_of(m) in layers[i : i + layers_per_pass]]
            for i in range(0, len(layers), layers_per_pass)]


def _diff_pass(reference: _GraphProbes, quantized: _GraphProbes, modules: list[str], windows: np.ndarray,
               float_weights: Mapping[str, np.ndarray], output_factors: dict[str, np.ndarray],
               acc: _Accumulated, saved: MutableMapping,
               starts: tuple[Start | None, Start | None]) -> tuple[Start, Start]:
    """One session at a time: the reference's probes of every window wait in `saved` (SavedArrays, on disk) while
    the Q/DQ graph runs; two sessions side by side would hold both graphs' weights and arenas at once.
    starts: where each graph's pass begins (None: from the token ids); returns where the next pass begins."""
    ref_probes, q_probes = reference.probes.subset(modules), quantized.probes.subset(modules)
    ref_last, q_last = (list(p.block_outputs.values())[-1] for p in (ref_probes, q_probes))
    ref_start, q_start = starts
    q_ends = []
    for m in q_probes.gemm_outputs:  # execution order
        acc.local[m], acc.accumulated[m], acc.clipped[m] = TensorError(), TensorError(), []
        acc.channels[f"{m}/weight_before"] = reference.weight_absmax[m]
        acc.channels[f"{m}/weight_after"] = quantized.weight_absmax[m]
    acc.blocks.update({layer: TensorError() for layer in q_probes.block_outputs})
    ref_names = ref_probes.names()
    label = f"layer-wise diff ({len(modules)} GEMMs)"
    with reference.mark(ref_probes, ref_start) as graph:
        for i, window in enumerate(tqdm(windows, desc=f"{label}, reference", unit="window")):
            for j, values in enumerate(fetch(graph, window, ref_names, ref_start and ref_start.feed(i)).values()):
                saved[f"{i}-{j}"] = values
    position = {name: j for j, name in enumerate(ref_names)}

    def ref_probe(i: int, name: str) -> np.ndarray:  # read when used: a pass's probes are ~0.35 GB (SmolLM2)
        return saved[f"{i}-{position[name]}"]

    with quantized.mark(q_probes, q_start) as graph:
        for i, window in enumerate(tqdm(windows, desc=label, unit="window")):
            got = fetch(graph, window, q_probes.names(), q_start and q_start.feed(i))
            q_ends.append(got[q_last])
            for m in q_probes.gemm_outputs:
                y_q, x = got[q_probes.gemm_outputs[m]], got[q_probes.gemm_inputs[m]]
                factor = output_factors.get(m)
                acc.accumulated[m].add(ref_probe(i, ref_probes.gemm_outputs[m]),
                                       y_q * factor if factor is not None else y_q)
                acc.local[m].add(x.astype(np.float32) @ float_weights[m], y_q)
                if m in q_probes.input_scales:
                    acc.clipped[m].append(clipped_fraction(x, q_probes.input_scales[m]))
                for key, value in ((f"{m}/activation_before", ref_probe(i, ref_probes.gemm_inputs[m])),
                                   (f"{m}/activation_after", x)):
                    acc.channels[key] = np.maximum(acc.channels.get(key, 0.0), channel_absmax(value))
            for layer in q_probes.block_outputs:
                acc.blocks[layer].add(ref_probe(i, ref_probes.block_outputs[layer]), got[q_probes.block_outputs[layer]])
            del got  # the next window's probes need the room
    ref_ends = [ref_probe(i, ref_last) for i in range(len(windows))]
    saved.clear()  # a later pass with fewer probes would leave this one's extra files behind
    return Start(ref_last, ref_ends), Start(q_last, q_ends)


def layerwise_diff(reference: Path, quantized: Path, windows: np.ndarray, float_weights: Mapping[str, np.ndarray],
                   output_factors: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    """float_weights: each quantized module's smoothed float weight in MatMul layout [in, out];
    output_factors: the smoothing factor dividing a producer module's output rows (absent for the others).

    Returns the per-GEMM and per-block errors, and per module the input-channel absmax of its activation and
    weight in the reference graph ("before") and in the Q/DQ graph ("after": smoothed; weights dequantized),
    measured on the same windows, for the outlier analysis."""
    acc, modules = _Accumulated(), list(float_weights)
    graphs = [_GraphProbes(path, modules) for path in (reference, quantized)]
    # Scratch beside the graphs: the saved probes are graph-sized, more than a RAM /tmp holds.
    with tempfile.TemporaryDirectory(dir=quantized.parent, prefix=".layerwise-") as tmp:
        saved, starts = SavedArrays(Path(tmp) / "probes"), (None, None)
        for pass_modules in layer_passes(modules, LAYERS_PER_PASS):
            starts = _diff_pass(*graphs, pass_modules, windows, float_weights, output_factors, acc, saved, starts)
    gemms = [{"module": m, "layer": layer_of(m), "local_snr_db": acc.local[m].snr_db(),
              "output_snr_db": acc.accumulated[m].snr_db(), "output_cosine": float(acc.accumulated[m].cosine()),
              "input_clipped_fraction": float(np.mean(acc.clipped[m])) if acc.clipped[m] else None}
             for m in acc.local]
    return {"windows": len(windows), "gemms": gemms, "blocks": block_rows(acc.blocks), **findings(gemms)}, acc.channels


def block_rows(blocks: dict[str, TensorError]) -> list[dict]:
    rows, previous = [], None
    for layer, error in blocks.items():
        snr = error.snr_db()
        drop = None if snr is None or previous is None else previous - snr
        rows.append({"layer": layer, "snr_db": snr, "cosine": float(error.cosine()), "snr_drop_db": drop})
        previous = snr if snr is not None else previous
    return rows


def findings(gemms: list[dict]) -> dict:
    """The first GEMM (in execution order) whose local error is large, the worst local GEMM, and the threshold."""
    measured = [g for g in gemms if g["local_snr_db"] is not None]
    if not measured:
        return {"large_error_threshold_db": None, "first_large_error": None, "worst_local_error": None}
    threshold = float(np.median([g["local_snr_db"] for g in measured])) - LARGE_ERROR_DB
    first = next((g["module"] for g in measured if g["local_snr_db"] < threshold), None)
    worst = min(measured, key=lambda g: g["local_snr_db"])["module"]
    return {"large_error_threshold_db": threshold, "first_large_error": first, "worst_local_error": worst}
