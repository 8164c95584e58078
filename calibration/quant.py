"""The W8A8 recipe TensorRT can execute: INT8 symmetric weights per output channel, INT8 symmetric per-tensor
static activations (TensorRT explicit quantization allows per-channel scales only on constant weights).

Also the PyTorch fake-quant simulation of exactly that recipe, used to check the exported graph is faithful.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import replace

import torch

from calibration import CalibrationError
from calibration.gptq import QuantizedWeight, rtn
from calibration.plan import ModuleEntry, QuantPlan

QMAX = 127  # symmetric: activation scales map absmax to 127
QMIN_ACT = -128  # ONNX QuantizeLinear saturates to [-128, 127]; the simulation must do the same


def activation_scale(absmax: float) -> float:
    if not absmax > 0:
        return 1.0
    return float(absmax) / QMAX


def activation_codes(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Q, as ONNX QuantizeLinear computes it (round half to even, saturate), as floats holding the integer codes."""
    return torch.div(x, scale).round_().clamp_(QMIN_ACT, QMAX)  # in place on one new tensor


def fake_quant_activation(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Q then DQ."""
    return activation_codes(x, scale).mul_(scale)


def integer_matmul(x_codes: torch.Tensor, weight_codes_t: torch.Tensor, output_scales: torch.Tensor) -> torch.Tensor:
    """int8 codes [tokens, in] times int8 codes [in, out], accumulated exactly in int32, times the per-output scales
    (input scale x weight scale), as float32 [tokens, out]: what ONNX Runtime's MatMulIntegerToFloat computes, in a
    third of the float GEMM's time on CPU (torch._int_mm: PyTorch's int8 GEMM, private but the only one it has;
    torch is pinned)."""
    return torch._int_mm(x_codes, weight_codes_t).float().mul_(output_scales)


def check_patterns(names: list[str], include: tuple[str, ...], skip: tuple[str, ...]) -> None:
    """A pattern that matches no quantizable module of the whole model is an error (a typo would silently
    quantize everything)."""
    for label, patterns in (("--include", include), ("--skip", skip)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise CalibrationError(
                    f"{label} pattern '{pattern}' matches no quantizable module (e.g. {names[0]}): fix the pattern"
                )


def select_modules(names: list[str], include: tuple[str, ...], skip: tuple[str, ...]) -> dict[str, str]:
    """Name -> reason it is skipped ('' when quantized). `names` may be one layer's (a layer window): the
    patterns are checked against the whole model once, by check_patterns."""
    reasons = {}
    for n in names:
        if include and not any(fnmatch.fnmatchcase(n, p) for p in include):
            reasons[n] = "not matched by --include"
        elif any(fnmatch.fnmatchcase(n, p) for p in skip):
            reasons[n] = "matched by --skip"
        else:
            reasons[n] = ""
    return reasons


def build_plan(linears: dict[str, torch.nn.Linear], input_ranges: dict[str, float],
               input_factors: dict[str, torch.Tensor], alphas: dict[str, float], alpha_label: float | str,
               range_estimator: str, include: tuple[str, ...], skip: tuple[str, ...],
               float_modules: dict[str, str]) -> QuantPlan:
    """`linears` hold smoothed weights; `input_ranges` the absmax each smoothed input's INT8 scale maps to 127;
    `alphas` the alpha of each smoothed linear; `float_modules` extra modules kept float, with the reason."""
    reasons = select_modules(list(linears), include, skip)
    entries = []
    for name, linear in linears.items():
        smoothed = name in input_factors
        common = dict(name=name, smoothed=smoothed, alpha=alphas.get(name) if smoothed else None,
                      smoothing_factor_max=float(input_factors[name].max()) if smoothed else None)
        if reasons[name]:
            entries.append(ModuleEntry(status="skipped", reason=reasons[name], **common))
            continue
        # Weight fields (scales, bits, method) are filled when the integer weights are made (pipeline.weights).
        entries.append(ModuleEntry(status="quantized", reason="", input_absmax=input_ranges[name],
                                   input_scale=activation_scale(input_ranges[name]), **common))
    for name, reason in float_modules.items():
        entries.append(ModuleEntry(name=name, status="float", reason=reason, smoothed=False, alpha=None))
    return QuantPlan(recipe="w8a8: int8 per-channel weights, int8 per-tensor static activations",
                     alpha=alpha_label, range_estimator=range_estimator, modules=tuple(entries))


def keep_float(plan: QuantPlan, reasons: dict[str, str]) -> QuantPlan:
    """The plan with the named quantized modules turned back to float (no Q/DQ, no integer weights), each with its
    reason; their smoothing stays (it is folded into the float weights either way)."""
    modules = tuple(ModuleEntry(name=m.name, status="skipped", reason=reasons[m.name], smoothed=m.smoothed,
                                alpha=m.alpha, smoothing_factor_max=m.smoothing_factor_max,
                                rotation_block=m.rotation_block)
                    if m.name in reasons else m for m in plan.modules)
    return replace(plan, modules=modules)


class FakeQuantLinear(torch.nn.Module):
    """A Linear computing what the exported Q/DQ MatMul computes.

    W8A8 (input_scale given): Q(x) times the per-channel INT8 weight codes (integer_matmul: ONNX Runtime's
    MatMulIntegerToFloat). Weight-only (input_scale None): the float activation times DQ(W_q), which may be
    group-wise.
    weight: the integer weight stored by the quantize stage (clipped, GPTQ); default: per-channel INT8
    round-to-nearest of the linear's weight."""

    def __init__(self, linear: torch.nn.Linear, input_scale: float | None, weight: QuantizedWeight | None = None):
        super().__init__()
        weight = rtn(linear.weight, 8, -1, fp16_scales=False) if weight is None else weight
        self.bias = linear.bias
        self.input_scale = input_scale
        self.rotation = getattr(linear, "rotation", None)  # a RotatedLinear's: Q/DQ applies to the rotated input
        if input_scale is None:
            self.register_buffer("weight", weight.dequantize().to(linear.weight.dtype))
            return
        if weight.group_size != weight.codes.shape[1]:
            raise CalibrationError(f"INT8 activations need per-channel weight scales (got group size "
                                   f"{weight.group_size}): quantize W8A8 weights per output channel")
        self.register_buffer("codes_t", weight.codes.T)  # [in, out]: MatMul layout
        self.register_buffer("output_scales", weight.scales[:, 0] * input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            x = self.rotation(x)
        if self.input_scale is None:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        codes = activation_codes(x.reshape(-1, x.shape[-1]), self.input_scale).to(torch.int8)
        y = integer_matmul(codes, self.codes_t, self.output_scales).to(x.dtype)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y.add_(self.bias)


@contextlib.contextmanager
def fake_quantized(model: torch.nn.Module, plan: QuantPlan, weights: dict[str, QuantizedWeight] | None = None):
    """Swap each quantized Linear for a FakeQuantLinear (with the stored integer weights where given); always
    restore the originals."""
    swapped = []
    weights = weights or {}
    try:
        for entry in plan.quantized():
            parent_name, _, child = entry.name.rpartition(".")
            parent = model.get_submodule(parent_name)
            original = getattr(parent, child)
            setattr(parent, child, FakeQuantLinear(original, entry.input_scale, weights.get(entry.name)))
            swapped.append((parent, child, original))
        yield model
    finally:
        for parent, child, original in reversed(swapped):
            setattr(parent, child, original)


def weight_only_plan(reasons: dict[str, str], recipe: str, entries: dict[str, dict],
                     float_modules: dict[str, str]) -> QuantPlan:
    """Plan of a weight-only recipe (activations float). reasons: select_modules' answer; entries: the weight
    fields of each quantized linear."""
    modules = [ModuleEntry(name=n, status="skipped" if r else "quantized", reason=r, smoothed=False, alpha=None,
                           **({} if r else entries[n])) for n, r in reasons.items()]
    modules += [ModuleEntry(name=n, status="float", reason=r, smoothed=False, alpha=None)
                for n, r in float_modules.items()]
    return QuantPlan(recipe=recipe, alpha=None, range_estimator=None, modules=tuple(modules))
