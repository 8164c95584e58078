"""Group-wise symmetric weight quantization: round-to-nearest and GPTQ (Frantar et al., 2022, Algorithm 1).

A weight W [N out, K in] is cut into groups of `group_size` consecutive input columns (-1: one group per row);
each (row, group) has one scale. When group_size does not divide K the last group is shorter (SmolLM2's 576 = 4 x
128 + 64), as in the GPTQ checkpoint layout (g_idx = k // group_size). Groups stay contiguous along K in every mode, including act-order, because
TensorRT's blocked DequantizeLinear can only express contiguous blocks (shared/docs/TENSORRT.md, INT4 rules).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from calibration import CalibrationError

log = logging.getLogger(__name__)

# Half the integer range a scale maps |w|max to. 4 and 3 bits use the whole signed range [-2^(b-1), 2^(b-1)-1]
# (|w|max lands half a step beyond the top code, the GPTQ/AutoGPTQ convention that the HF checkpoint layout stores);
# 8 bits keeps the W8A8 recipe's absmax/127 so GPTQ-INT8 and RTN-INT8 weights share one scale rule.
SCALE_DIVISOR = {8: 127.0, 4: 7.5, 3: 3.5}


def code_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes [N, K] (int8 container for every width), scales [N, groups], and how they were cut."""

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int  # columns per group; K when the layout is per output channel

    def column_scales(self) -> torch.Tensor:
        """[N, K]: the scale of every weight element."""
        return self.scales[:, group_index(self.codes.shape[1], self.group_size)]

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.column_scales()


def effective_group_size(in_features: int, group_size: int) -> int:
    if group_size == -1 or group_size >= in_features:
        return in_features
    if group_size < 1:
        raise CalibrationError(f"group size must be -1 (per channel) or positive (got {group_size}): e.g. 128")
    return group_size


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """g_idx of the GPTQ checkpoint layout: the group of every input column."""
    return torch.arange(in_features) // effective_group_size(in_features, group_size)


def group_scales(weight: torch.Tensor, bits: int, group_size: int, fp16_scales: bool) -> torch.Tensor:
    """[N, groups] scales of absmax / SCALE_DIVISOR; an all-zero group gets 1 (any positive scale is exact).

    fp16_scales: round to FP16 before quantizing, so the integers are exact for the FP16 scales that TensorRT's
    graph and the GPTQ checkpoint store."""
    size = effective_group_size(weight.shape[1], group_size)
    groups = -(-weight.shape[1] // size)
    padded = torch.nn.functional.pad(weight.float().abs(), (0, groups * size - weight.shape[1]))  # zeros: no effect
    absmax = padded.reshape(weight.shape[0], groups, size).amax(dim=2)
    scales = torch.where(absmax > 0, absmax / SCALE_DIVISOR[bits], torch.ones_like(absmax))
    if fp16_scales:
        scales = scales.half().float()
    return scales


def quantize_columns(columns: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = code_range(bits)
    return torch.clamp(torch.round(columns / scales), lo, hi)


@torch.no_grad()
def rtn(weight: torch.Tensor, bits: int, group_size: int, fp16_scales: bool) -> QuantizedWeight:
    """Round-to-nearest, the baseline GPTQ must beat."""
    w = weight.float()
    size = effective_group_size(w.shape[1], group_size)
    scales = group_scales(w, bits, size, fp16_scales)
    codes = quantize_columns(w, scales[:, group_index(w.shape[1], size)], bits)
    return QuantizedWeight(codes.to(torch.int8), scales, bits, size)


# Damping of the float-target solve below, a fraction of mean diag H. Measured on SmolLM2 W4 g128 (8 windows):
# 0.01 over-fits the correction (perplexity 36.89, worse than plain GPTQ's 36.46), 0.1 gives 35.01.
FLOAT_TARGET_DAMP = 0.1


@dataclass
class HessianAccumulator:
    """Sums over the n rows a linear saw: x x^T of its inputs in the model being quantized and, when the float
    model's inputs for the same tokens are given, (x_float - x) x^T and x_float x_float^T.

    H = 2/n sum x x^T is GPTQ eq. 2's Hessian of ||WX - QX||^2."""

    in_features: int
    sum_xxt: torch.Tensor | None = None
    sum_dxt: torch.Tensor | None = None
    sum_fft: torch.Tensor | None = None
    rows: int = 0

    def add(self, x: torch.Tensor, float_x: torch.Tensor | None = None) -> None:
        x = x.detach().reshape(-1, self.in_features).double()
        if self.sum_xxt is None:
            self.sum_xxt = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
        self.sum_xxt += x.T @ x
        if float_x is not None:
            f = float_x.detach().reshape(-1, self.in_features).double()
            if self.sum_dxt is None:
                self.sum_dxt, self.sum_fft = torch.zeros_like(self.sum_xxt), torch.zeros_like(self.sum_xxt)
            self.sum_dxt += (f - x).T @ x
            self.sum_fft += f.T @ f
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.sum_xxt is None or self.rows == 0:
            raise CalibrationError("GPTQ saw no calibration inputs for a linear: calibration windows are empty")
        return 2.0 * self.sum_xxt / self.rows


def float_target(weight: torch.Tensor, stats: HessianAccumulator) -> torch.Tensor:
    """The weight W' that best maps this layer's inputs X (after the quantized layers before it) to the float
    model's output W X_f: argmin ||W X_f - W' X||^2 = W X_f X^T (X X^T)^-1 = W + W (X_f - X) X^T (X X^T)^-1.

    GPTQ then quantizes W' instead of W, so each layer also compensates the error its inputs carry (the
    asymmetric calibration of GPTAQ, Li et al., 2025, here in closed form before the GPTQ pass)."""
    h = stats.sum_xxt
    damped = h + FLOAT_TARGET_DAMP * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    correction = torch.linalg.solve(damped, stats.sum_dxt.T).T  # (X_f - X) X^T (X X^T + lambda I)^-1
    w = weight.double()
    return (w + w @ correction).to(weight.dtype)


def output_error(weight: torch.Tensor, quantized: QuantizedWeight, stats: HessianAccumulator) -> float:
    """||W X_f - Q X||^2 / ||W X_f||^2 over the calibration rows, from the sums alone: the error against the float
    model's output (X_f = X when no float inputs were recorded)."""
    w, q = weight.double(), quantized.dequantize().double()
    h = stats.sum_xxt
    fq = h if stats.sum_dxt is None else h + stats.sum_dxt  # sum x_f x^T
    ff = h if stats.sum_fft is None else stats.sum_fft
    target = torch.einsum("nk,kl,nl->", w, ff, w)
    error = target - 2 * torch.einsum("nk,kl,nl->", w, fq, q) + torch.einsum("nk,kl,nl->", q, h, q)
    return float(error / target)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + lambda I)^-1 with lambda = damp * mean(diag H) (GPTQ section 4, step 3).

    An H that is not positive definite after damping (too few distinct calibration rows) gets 10x more damping
    until it is; the damping finally used is returned so it can be reported."""
    mean_diag = float(hessian.diagonal().mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    for attempt in range(8):
        used = damp * 10**attempt
        chol, info = torch.linalg.cholesky_ex(hessian + used * mean_diag * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper, used
    raise CalibrationError("GPTQ Hessian is not positive definite even with 10^7x damping: the calibration inputs "
                           "of this layer are degenerate (NaN or constant); check the calibration text")


@dataclass(frozen=True)
class GptqResult:
    weight: QuantizedWeight
    damp_used: float


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, damp: float = 0.01,
         act_order: bool = True, block_size: int = 128, fp16_scales: bool = True) -> GptqResult:
    """Quantize W [N, K] column by column, spreading each column's rounding error over the columns not yet
    quantized through the inverse Hessian (GPTQ eq. 3), in lazy blocks of `block_size` columns (section 4, step 2).

    act_order visits columns by decreasing Hessian diagonal (the most sensitive first). Its scales are "static
    groups": fixed from the unquantized W before the permuted pass, so group g is still columns [g*gs, (g+1)*gs).
    In natural order each group's scale is taken from the error-updated columns when the pass reaches it, as in
    the reference implementation."""
    w = weight.detach().double().clone()
    h = hessian.double().clone()
    n_cols = w.shape[1]
    dead = h.diagonal() == 0  # a feature never active: its column cannot affect the output, quantize it to 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    size = effective_group_size(n_cols, group_size)
    scales = group_scales(w, bits, size, fp16_scales).double()
    lazy_scales = not act_order and block_size % size == 0
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(n_cols)
    w, h = w[:, order], h[order][:, order]
    h_inv, damp_used = inverse_hessian_factor(h, damp)
    codes = torch.zeros_like(w)
    for start in range(0, n_cols, block_size):
        end = min(start + block_size, n_cols)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        for i in range(end - start):
            column = int(order[start + i])
            group = column // size
            if lazy_scales and column % size == 0:
                scales[:, group] = group_scales(block[:, i : i + size], bits, -1, fp16_scales)[:, 0].double()
            q = quantize_columns(block[:, i], scales[:, group], bits)
            codes[:, start + i] = q
            error = (block[:, i] - q * scales[:, group]) / h_inv[start + i, start + i]
            block[:, i:] -= error[:, None] * h_inv[start + i, start + i : end][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    codes = codes[:, torch.argsort(order)]
    if damp_used != damp:
        log.warning("GPTQ: Hessian needed damping %.3g (asked %.3g) to be positive definite", damp_used, damp)
    return GptqResult(QuantizedWeight(codes.to(torch.int8), scales.float(), bits, size), damp_used)


# The bits and group size of every module, as one JSON metadata entry sorted by name: safetensors writes a
# metadata map in hash order, which differs from process to process, so one entry per module made the file's bytes
# differ between two runs that computed the same weights.
LAYOUTS = "layouts"


def save_quantized(weights: dict[str, QuantizedWeight], path) -> None:
    """Codes (int8 container) and scales of every quantized linear, with bits and group size per module."""
    tensors, layouts = {}, {}
    for name, q in weights.items():
        tensors[f"{name}.codes"] = q.codes.contiguous()
        tensors[f"{name}.scales"] = q.scales.float().contiguous()
        layouts[name] = [q.bits, q.group_size]
    save_file(tensors, str(path), metadata={LAYOUTS: json.dumps(layouts, sort_keys=True)})


def load_quantized(path) -> dict[str, QuantizedWeight]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if LAYOUTS not in metadata:
            raise CalibrationError(f"{path} has no '{LAYOUTS}' entry: it was written by an older smoothtrt or another "
                                   "tool; run the quantize stage again")
        layouts = json.loads(metadata[LAYOUTS])
        result = {name: QuantizedWeight(f.get_tensor(f"{name}.codes"), f.get_tensor(f"{name}.scales"), bits, group_size)
                  for name, (bits, group_size) in layouts.items()}
    return result
