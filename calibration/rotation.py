"""Online block-Hadamard rotation of the linears whose input no offline transform reaches (down_proj: its input is
act(gate) * up, so smoothing through up_proj's rows is the only fold available).

For an orthogonal R, x W^T = (x R)(W R)^T (QuaRot, Ashkboos et al. 2024, sec. 3): the model stores W R (quantized)
and multiplies the activation by R before its Q node, so an outlier channel is spread over the channels it is
mixed with and the per-tensor INT8 range shrinks. R = diag(signs) . blockdiag(H_b / sqrt(b), ...), with H_b the
Sylvester Hadamard matrix and random signs: computed as a sign flip, a reshape to [..., n / b, b] and one
[b, b] MatMul, which costs b / out_features of the linear itself (64 / 576 = 11% for SmolLM2's down_proj).
b must be a power of 4: then 1 / sqrt(b) is a power of two and R is exact in FP16 (the TensorRT graph).
"""

from __future__ import annotations

import torch

from calibration import CalibrationError

SIGN_SEED = 0  # the random signs are part of the transform: fixed, so every stage rebuilds the same R
# SmolLM2 W8A8, ONNX Runtime, 16 x 512 WikiText-2 windows: +1.24% perplexity with blocks of 64 against +2.60%
# without rotation (docs/TUNING.md).
DEFAULT_BLOCK = 64


def hadamard(block: int) -> torch.Tensor:
    """[block, block] normalised Sylvester Hadamard matrix (orthogonal, symmetric)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / block ** 0.5).float()


def random_signs(channels: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SIGN_SEED)
    return (torch.randint(0, 2, (channels,), generator=generator) * 2 - 1).float()


def rotated(x: torch.Tensor, signs: torch.Tensor, hadamard_block: torch.Tensor) -> torch.Tensor:
    """x R for row vectors x, without forming R: a sign flip, then H_b on each block of b channels."""
    blocks = (x * signs).unflatten(-1, (-1, hadamard_block.shape[0]))
    return (blocks @ hadamard_block).flatten(-2)


class BlockRotation(torch.nn.Module):
    """x -> x R, R = diag(signs) . blockdiag(H_b / sqrt(b)); a child module of the rotated linear, so its graph
    nodes get their own scope and the linear keeps its own MatMul name."""

    def __init__(self, channels: int, block: int):
        super().__init__()
        self.register_buffer("signs", random_signs(channels))
        self.register_buffer("hadamard", hadamard(block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rotated(x, self.signs, self.hadamard)


class RotatedLinear(torch.nn.Linear):
    """y = (x R) (W R)^T + b: the same function as the original linear, with its weight stored rotated."""

    def __init__(self, linear: torch.nn.Linear, block: int):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.rotation = BlockRotation(linear.in_features, block).to(linear.weight.dtype)
        with torch.no_grad():  # W R: each row of W rotated like an input, in float64, then rounded once
            self.weight.copy_(rotated(linear.weight.double(), self.rotation.signs.double(),
                                      self.rotation.hadamard.double()))
            if linear.bias is not None:
                self.bias.copy_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.rotation(x), self.weight, self.bias)


def resolved_block(requested: int | None, channels: list[int]) -> int:
    """The block size to rotate with: the one asked for; by default (None) DEFAULT_BLOCK where it divides the input
    channels of every rotatable linear, else 0 (no rotation: a model it does not fit still quantizes)."""
    if requested is not None:
        return requested
    return DEFAULT_BLOCK if channels and all(c % DEFAULT_BLOCK == 0 for c in channels) else 0


def linear_input(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the linear's weight multiplies: its input, rotated when the linear is rotated (statistics hooks see
    the input before the module runs)."""
    rotation = getattr(module, "rotation", None)
    return x if rotation is None else rotation(x)


def rotate_inputs(model: torch.nn.Module, names: list[str], block: int) -> None:
    """Replace each named linear by its RotatedLinear (in place; the float model computes the same function)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if isinstance(linear, RotatedLinear):
            continue
        if linear.in_features % block:
            raise CalibrationError(f"--rotate-block {block} does not divide the {linear.in_features} input channels "
                                   f"of {name}: pick a power of 4 that divides it")
        setattr(parent, child, RotatedLinear(linear, block))
