"""Per-group automatic SmoothQuant alpha: for each smoothing group pick the migration strength whose W8A8
simulation best reproduces the group's float outputs on real calibration inputs.

The SmoothQuant paper tunes one alpha per model (sec. 4, "migration strength"); follow-ups (Neural Compressor's
auto-alpha, SmoothQuant+) show that the best value differs per layer. The objective here is local and cheap:
sum over the group's linears of ||X W^T - Q(X / s) Q(W diag(s))^T||^2 / ||X W^T||^2, with the per-tensor
activation scale taken from the full calibration statistics (the scale the exported graph will carry).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from calibration.architectures import ArchitectureSpec
from calibration.gptq import rtn
from calibration.quant import activation_codes, activation_scale, integer_matmul
from calibration.smoothing import consumer_factor, group_absmax, layer_groups, smoothing_factors
from calibration.stats import run_windows

DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(6, 21))  # 0.30 .. 1.00


@torch.no_grad()
def quantized_output_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, act_absmax: torch.Tensor,
                           targets: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> float:
    """Relative squared error of the group's outputs under W8A8 after smoothing with consumer-side factor s.

    x: [tokens, in] float inputs; weights: the consumers' unsmoothed [out, in] weights; act_absmax: per-channel
    calibration absmax of x (fixes the per-tensor scale of X / s); targets: (x @ w.T, its squared norm) per weight
    when already known (they do not depend on s: a search takes them once, from the consumers' own forward).

    The quantized product is computed as the exported MatMulInteger computes it (integer_matmul). This GEMM is the
    search's whole cost, and on CPU the integer one runs ~4x faster than the float GEMM of the dequantized
    operands.
    """
    if targets is None:
        targets = with_energy([x @ w.T for w in weights])
    x_scale = activation_scale(float((act_absmax / s).max()))
    x_codes = activation_codes(x / s, x_scale).to(torch.int8)
    error = 0.0
    for w, (y, energy) in zip(weights, targets):
        w_q = rtn(w * s[None, :], 8, -1, fp16_scales=False)  # per output channel: scales [out, 1]
        y_q = integer_matmul(x_codes, w_q.codes.T, w_q.scales[:, 0] * x_scale)
        error += float(y_q.sub_(y).square_().sum() / energy)  # in place: y_q is the largest temporary here
    return error


def with_energy(outputs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(y, y.square().sum().clamp(min=1e-30)) for y in outputs]


@dataclass(frozen=True)
class GroupChoice:
    alpha: float
    error: float
    error_at: dict[float, float]  # alpha -> objective where it was evaluated (coarse_to_fine), for the report


@torch.no_grad()
def best_alpha(x: torch.Tensor, outputs: list[torch.Tensor], model: torch.nn.Module, prefix: str, group,
               absmax: dict[str, torch.Tensor], grid: tuple[float, ...]) -> GroupChoice:
    """x: the group's input [tokens, in]; outputs: each consumer's float output on it [tokens, out]."""
    weights = [model.get_submodule(f"{prefix}.{c}").weight.float() for c in group.consumers]
    act_per_input = torch.stack([absmax[f"{prefix}.{c}"] for c in group.consumers]).amax(dim=0)
    act, weight = group_absmax(model, prefix, group, absmax)
    x = x.float()
    targets = with_energy([y.float() for y in outputs])

    def objective(alpha: float) -> float:
        s = consumer_factor(model, group, smoothing_factors(act, weight, alpha))
        return quantized_output_error(x, weights, s, act_per_input, targets)

    errors = coarse_to_fine(grid, objective)
    chosen = lowest(errors)
    return GroupChoice(chosen, errors[chosen], errors)


def lowest(errors: dict[float, float]) -> float:
    """The alpha with the lowest objective; on a tie the larger alpha (more of the difficulty moved to weights)."""
    return min(errors, key=lambda a: (errors[a], -a))


def coarse_to_fine(grid: tuple[float, ...], objective) -> dict[float, float]:
    """alpha -> objective at every other grid point (both ends included), then at the grid neighbours of the best
    of those. Where the objective has one minimum along the grid, the best coarse point is that minimum or one of
    its neighbours, so the result is the exhaustive argmin with ~10 evaluations of 15 (the objective is the alpha
    search's whole cost: a GEMM per consumer per alpha). On SmolLM2 the full grid's choice was found in all 120
    groups (one curve of the 120 had a second, shallower minimum)."""
    points = sorted(grid)
    errors = {a: objective(a) for a in sorted(set(points[::2]) | {points[-1]})}
    best = points.index(lowest(errors))
    for alpha in points[max(best - 1, 0): best + 2]:
        if alpha not in errors:
            errors[alpha] = objective(alpha)
    return dict(sorted(errors.items()))


@torch.no_grad()
def search_alphas(model: torch.nn.Module, spec: ArchitectureSpec, absmax: dict[str, torch.Tensor],
                  windows: np.ndarray, grid: tuple[float, ...] = DEFAULT_GRID) -> dict[str, GroupChoice]:
    """Group key -> chosen alpha, from one forward pass of `windows` over the unsmoothed model.

    Each group is searched inside a forward hook, once all its consumers have run on their common input (its
    producer's output): their outputs are the float targets the search reproduces (computing them again cost a
    float GEMM per consumer: 4.7 s of SmolLM2's search under a profiler, ~3 s measured without). The model then
    drops that input and those outputs as it goes on: memory holds one group's activations, not the whole
    model's. `windows` go in as one batch so the hook sees every search token at once.
    """
    choices: dict[str, GroupChoice] = {}
    groups = list(layer_groups(model, spec))
    progress = tqdm(total=len(groups), desc="searching alpha per group", unit="group")

    ran: dict[str, torch.Tensor] = {}  # consumer -> its output, until its group's last consumer has run

    def make_hook(prefix, group, key, consumer):
        names = [f"{prefix}.{c}" for c in group.consumers]

        def hook(_module, args, output):
            ran[consumer] = output.reshape(-1, output.shape[-1])
            if all(n in ran for n in names):
                x = args[0].reshape(-1, args[0].shape[-1])
                choices[key] = best_alpha(x, [ran.pop(n) for n in names], model, prefix, group, absmax, grid)
                progress.update(1)
        return hook

    handles = [model.get_submodule(name).register_forward_hook(make_hook(prefix, group, key, name))
               for prefix, group, key in groups for name in (f"{prefix}.{c}" for c in group.consumers)]
    try:
        run_windows(model, windows, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
        progress.close()
    return choices
