"""Group-wise symmetric weight quantization: round-to-nearest and GPTQ (Frantar et al., 2022, Algorithm 1).

A weight W [N out, K in] is cut into groups of `group_size` consecutive input columns (-1: one group per row);
each (row, group) has one scale. When group_size does not divide K the last group is shorter (SmolLM2's 576 = 4 x
128 + 64), as in the GPTQ checkpoint layout (g_idx = k // group_size). Groups stay contiguous along K in every mode, including act-order, because
TensorRT's blocked DequantizeLinear can only express contiguous blocks (shared/docs/TENSORRT.md, INT4 rules).
"""

from __future__ import annotations

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
SUPPORTED_BITS = tuple(SCALE_DIVISOR)


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


@dataclass
class HessianAccumulator:
    """H = 2/n * sum_x x x^T over the n rows a linear saw (GPTQ eq. 2's Hessian of ||WX - QX||^2)."""

    in_features: int
    sum_xxt: torch.Tensor | None = None
    rows: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.in_features).double()
        if self.sum_xxt is None:
            self.sum_xxt = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
        self.sum_xxt += x.T @ x
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.sum_xxt is None or self.rows == 0:
            raise CalibrationError("GPTQ saw no calibration inputs for a linear: calibration windows are empty")
        return 2.0 * self.sum_xxt / self.rows


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
    permuted: bool


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
    return GptqResult(QuantizedWeight(codes.to(torch.int8), scales.float(), bits, size), damp_used, act_order)


def layer_output_error(weight: torch.Tensor, quantized: QuantizedWeight, hessian: torch.Tensor) -> float:
    """||(W - Q) X||^2 / ||W X||^2 over the calibration inputs, from H alone (tr(D H D^T) = 2/n sum ||D x||^2)."""
    w = weight.double()
    delta = w - quantized.dequantize().double()
    h = hessian.double()
    return float(torch.einsum("nk,kl,nl->", delta, h, delta) / torch.einsum("nk,kl,nl->", w, h, w))


def save_quantized(weights: dict[str, QuantizedWeight], path) -> None:
    """Codes (int8 container) and scales of every quantized linear, with bits and group size per module."""
    tensors, metadata = {}, {}
    for name, q in weights.items():
        tensors[f"{name}.codes"] = q.codes.contiguous()
        tensors[f"{name}.scales"] = q.scales.float().contiguous()
        metadata[name] = f"{q.bits},{q.group_size}"
    save_file(tensors, str(path), metadata=metadata)


def load_quantized(path) -> dict[str, QuantizedWeight]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        result = {}
        for name, layout in metadata.items():
            bits, group_size = (int(v) for v in layout.split(","))
            result[name] = QuantizedWeight(f.get_tensor(f"{name}.codes"), f.get_tensor(f"{name}.scales"), bits,
                                           group_size)
    return result
