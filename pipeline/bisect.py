"""--bisect: the fewest linears to keep float so the Q/DQ graph meets an accuracy target, found with the layer-wise
numbers and checked on the exported graph.

Candidates are the quantized GEMMs ordered by local SNR, worst first (layer-wise diff: the error each one adds).
Keeping the k worst float is evaluated on the evaluation windows by removing their activation Q/DQ from
quantized.onnx (weights stay INT8), and the smallest k that meets the target is found by bisection (k = 0 and
k = all are measured first; bisection assumes that more float linears never hurt, which the steps show). The result
is an exclusion list (one module per line) for `--skip-file`; the re-run keeps those linears fully float.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from exporters.qdq import float_activations
from pipeline import PipelineError
from pipeline.accuracy_target import Target
from pipeline.artifacts import atomic_path, read_json, write_json
from pipeline.verify import graph_logits, pair_metrics

log = logging.getLogger(__name__)

EXCLUSIONS = "float_modules.txt"
RESULT = "bisect.json"


def candidates(layerwise: dict) -> list[str]:
    """Quantized-activation GEMMs, the largest local error first."""
    measured = [g for g in layerwise["gemms"] if g["input_clipped_fraction"] is not None]
    return [g["module"] for g in sorted(measured, key=lambda g: (g["local_snr_db"] is None, g["local_snr_db"] or 0))]


def bisect(out: Path, target: Target) -> dict:
    from pipeline.run import LAYERWISE, QUANTIZED, REFERENCE, WINDOWS

    if not (out / LAYERWISE).is_file():
        raise PipelineError(f"{out} has no {LAYERWISE}: run `make engine OUT={out}` (its verify stage) first")
    order = candidates(read_json(out / LAYERWISE))
    windows = np.load(out / WINDOWS)["evaluation"]
    reference = list(graph_logits(out / REFERENCE, windows, "bisect: reference"))
    measured: dict[int, dict] = {}
    most_steps = 2 + math.ceil(math.log2(max(len(order), 1)))  # both ends, then halving


    def evaluate(count: int) -> dict:
        if count not in measured:
            with tempfile.TemporaryDirectory() as tmp:
                graph = ir.load(out / QUANTIZED)
                float_activations(graph, order[:count])
                path = Path(tmp) / "candidate.onnx"
                ir.save(graph, path, external_data="candidate.onnx.data")
                del graph
                label = f"bisect step {len(measured) + 1} of at most {most_steps}: {count} linears float"
                logits = graph_logits(path, windows, label)
                measured[count] = pair_metrics(windows, reference, logits)
            log.info("bisect: %d linears float -> %s %.4g", count, target.metric, target.of(measured[count]))
        return measured[count]

    low, high = 0, len(order)
    if not target.met(evaluate(low)) and target.met(evaluate(high)):
        while high - low > 1:  # invariant: low misses the target, high meets it
            middle = (low + high) // 2
            low, high = (low, middle) if target.met(evaluate(middle)) else (middle, high)
    best = low if target.met(measured[low]) else high  # high = all candidates when even that misses the target
    result, exclusions = measured[best], order[:best]
    with atomic_path(out / EXCLUSIONS) as tmp:
        tmp.write_text("".join(f"{m}\n" for m in exclusions))
    record = {
        "target": {"metric": target.metric, "value": target.value}, "windows": len(windows),
        "candidates": order, "exclusions": exclusions, "exclusion_file": str(out / EXCLUSIONS),
        "all_quantized": target.of(measured[0]), "result": target.of(result),
        "met": target.met(result), "estimate": "activations of the excluded linears float, their weights INT8",
        "steps": [{"count": k, "value": target.of(m), "perplexity_delta_percent":
                   m["perplexity_delta_percent"], "kl_mean": m["kl_mean"]} for k, m in sorted(measured.items())],
    }
    write_json(out / RESULT, record)
    return record
