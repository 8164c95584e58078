"""Layer-by-layer GPTQ: decoder layer i is calibrated on the outputs of layers 0..i-1 already quantized, so each
layer corrects for the error of the ones before it; only one layer's inputs are held at a time.

Within a layer the linears are quantized in the order the architecture table lists its smoothing groups
(q/k/v, then o, then gate/up, then down), each group on inputs produced by the groups quantized before it
("true sequential" in the GPTQ reference code). The linears of a group read the same activation, so they share
one set of input statistics.

With float_target (default), an unquantized copy of each layer runs beside it on the float model's hidden
states, and each linear is fitted to the float model's output rather than to its own (gptq.float_target).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from calibration import CalibrationError
from calibration.architectures import ArchitectureSpec
from calibration.gptq import GptqResult, HessianAccumulator, float_target, gptq, output_error, rtn
from calibration.stats import decoder_layers, run_windows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GptqSettings:
    bits: int
    group_size: int
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    fp16_scales: bool = True
    float_target: bool = True


@dataclass(frozen=True)
class LinearOutcome:
    result: GptqResult
    output_error: float  # ||W X_f - Q X||^2 / ||W X_f||^2 on the calibration rows (X_f: the float model's input)
    rtn_output_error: float  # the same for round-to-nearest at the same bits and groups


class _Captured(Exception):
    pass


def _first_layer_inputs(model: torch.nn.Module, first_layer: torch.nn.Module, windows: np.ndarray,
                        batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments (rotary embeddings, mask) the model hands its first decoder layer."""
    captured = []

    def stop(_module, args, kwargs):
        captured.append((args[0].detach(), kwargs))
        raise _Captured

    handle = first_layer.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for start in range(0, len(windows), batch_size):
            try:
                run_windows(model, windows[start : start + batch_size])
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _quantization_order(spec: ArchitectureSpec) -> list[tuple[str, ...]]:
    """Groups of linears sharing one input, in forward order; a linear outside every group is its own group."""
    ordered = [g.consumers for g in spec.groups]
    return ordered + [(n,) for n in spec.linears if not any(n in g for g in ordered)]


def _run_layer(layer: torch.nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    return [(layer(hidden, **kwargs), kwargs) for hidden, kwargs in inputs]


def _group_statistics(layer, reference, first: str, inputs, float_inputs) -> HessianAccumulator:
    """Input sums of the linear `first` over every calibration batch, with the float model's inputs beside."""
    captured = {}
    linear = layer.get_submodule(first)
    handles = [linear.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0]))]
    if reference is not None:
        handles.append(reference.get_submodule(first).register_forward_pre_hook(
            lambda _m, args: captured.__setitem__("float_x", args[0])))
    stats = HessianAccumulator(linear.in_features)
    try:
        for i, (hidden, kwargs) in enumerate(inputs):
            layer(hidden, **kwargs)
            if reference is not None:
                reference(float_inputs[i][0], **float_inputs[i][1])
            stats.add(captured["x"], captured.get("float_x"))
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def gptq_sequential(model: torch.nn.Module, spec: ArchitectureSpec, selected: set[str], windows: np.ndarray,
                    batch_size: int, settings: GptqSettings,
                    float_windows: np.ndarray | None = None) -> dict[str, LinearOutcome]:
    """Quantize the selected linears of `model` in place (weights replaced by their dequantized values); return
    each one's codes, scales and output error next to RTN's.

    `windows` are token ids, or the first held layer's input hidden states (a layer window); float_windows are
    the float model's hidden states there when they differ (upstream layers already quantized)."""
    layers = decoder_layers(model, spec)
    inputs = _first_layer_inputs(model, layers[0][1], windows, batch_size)
    float_inputs = None
    if settings.float_target:
        float_inputs = list(inputs) if float_windows is None else \
            _first_layer_inputs(model, layers[0][1], float_windows, batch_size)
    outcomes: dict[str, LinearOutcome] = {}
    for index, layer in tqdm(layers, desc=f"GPTQ W{settings.bits} g{settings.group_size}", unit="layer"):
        prefix = f"{spec.layers}.{index}"
        reference = copy.deepcopy(layer) if settings.float_target else None
        for group in _quantization_order(spec):
            names = [n for n in group if f"{prefix}.{n}" in selected]
            if not names:
                continue
            stats = _group_statistics(layer, reference, names[0], inputs, float_inputs)
            for n in names:
                outcomes[f"{prefix}.{n}"] = _quantize_linear(f"{prefix}.{n}", layer.get_submodule(n), stats, settings)
        inputs = _run_layer(layer, inputs)
        if reference is not None:
            float_inputs = _run_layer(reference, float_inputs)
    return outcomes


def _quantize_linear(name: str, linear: torch.nn.Linear, stats: HessianAccumulator, s: GptqSettings) -> LinearOutcome:
    hessian = stats.hessian()
    if not torch.isfinite(hessian).all():
        raise CalibrationError(f"NaN/Inf inputs reached {name} during GPTQ: the model or the calibration text "
                               "produces non-finite activations; run the model in float32 and check its weights")
    target = float_target(linear.weight, stats) if stats.sum_dxt is not None else linear.weight
    result = gptq(target, hessian, s.bits, s.group_size, s.damp, s.act_order, s.block_size, s.fp16_scales)
    baseline = rtn(linear.weight, s.bits, s.group_size, s.fp16_scales)
    outcome = LinearOutcome(result, output_error(linear.weight, result.weight, stats),
                            output_error(linear.weight, baseline, stats))
    linear.weight.copy_(result.weight.dequantize().to(linear.weight.dtype))
    return outcome
