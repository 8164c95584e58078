"""Layer-by-layer GPTQ: decoder layer i is calibrated on the outputs of layers 0..i-1 already quantized, so each
layer corrects for the error of the ones before it; only one layer's inputs are held at a time.

Within a layer the linears are quantized in the order the architecture table lists its smoothing groups
(q/k/v, then o, then gate/up, then down), each group on inputs produced by the groups quantized before it
("true sequential" in the GPTQ reference code).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from calibration import CalibrationError
from calibration.architectures import ArchitectureSpec
from calibration.gptq import GptqResult, HessianAccumulator, gptq, layer_output_error, rtn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GptqSettings:
    bits: int
    group_size: int
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    fp16_scales: bool = True


@dataclass(frozen=True)
class LinearOutcome:
    result: GptqResult
    output_error: float  # ||(W - Q)X||^2 / ||WX||^2 on this linear's calibration inputs
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
        ids = torch.from_numpy(windows)
        for start in range(0, len(ids), batch_size):
            try:
                model(input_ids=ids[start : start + batch_size], use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _quantization_order(spec: ArchitectureSpec) -> list[tuple[str, ...]]:
    ordered = [g.consumers for g in spec.groups]
    rest = tuple(n for n in spec.linears if not any(n in g for g in ordered))
    return ordered + ([rest] if rest else [])


def _run_layer(layer: torch.nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
    return [layer(hidden, **kwargs) for hidden, kwargs in inputs]


@torch.no_grad()
def gptq_sequential(model: torch.nn.Module, spec: ArchitectureSpec, selected: set[str], windows: np.ndarray,
                    batch_size: int, settings: GptqSettings) -> dict[str, LinearOutcome]:
    """Quantize the selected linears of `model` in place (weights replaced by their dequantized values); return
    each one's codes, scales and output error next to RTN's."""
    layers = model.get_submodule(spec.layers)
    inputs = _first_layer_inputs(model, layers[0], windows, batch_size)
    outcomes: dict[str, LinearOutcome] = {}
    for index, layer in enumerate(tqdm(layers, desc=f"GPTQ W{settings.bits} g{settings.group_size}", unit="layer")):
        prefix = f"{spec.layers}.{index}"
        for group in _quantization_order(spec):
            names = [n for n in group if f"{prefix}.{n}" in selected]
            if not names:
                continue
            linears = {f"{prefix}.{n}": layer.get_submodule(n) for n in names}
            accumulators = {name: HessianAccumulator(m.in_features) for name, m in linears.items()}
            handles = [m.register_forward_pre_hook(lambda _m, args, acc=accumulators[name]: acc.add(args[0]))
                       for name, m in linears.items()]
            try:
                _run_layer(layer, inputs)
            finally:
                for h in handles:
                    h.remove()
            for name, linear in linears.items():
                outcomes[name] = _quantize_linear(name, linear, accumulators[name].hessian(), settings)
        inputs = [(out, kwargs) for out, (_, kwargs) in zip(_run_layer(layer, inputs), inputs)]
    return outcomes


def _quantize_linear(name: str, linear: torch.nn.Linear, hessian: torch.Tensor, s: GptqSettings) -> LinearOutcome:
    if not torch.isfinite(hessian).all():
        raise CalibrationError(f"NaN/Inf inputs reached {name} during GPTQ: the model or the calibration text "
                               "produces non-finite activations; run the model in float32 and check its weights")
    result = gptq(linear.weight, hessian, s.bits, s.group_size, s.damp, s.act_order, s.block_size, s.fp16_scales)
    baseline = rtn(linear.weight, s.bits, s.group_size, s.fp16_scales)
    outcome = LinearOutcome(result, layer_output_error(linear.weight, result.weight, hessian),
                            layer_output_error(linear.weight, baseline, hessian))
    linear.weight.copy_(result.weight.dequantize().to(linear.weight.dtype))
    return outcome

