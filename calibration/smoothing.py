"""SmoothQuant (Xiao et al., 2022): migrate activation outliers into the weights, keeping the float model exact.

Maths only (pure functions and in-place folds); which module feeds which comes from calibration.architectures.
"""

from __future__ import annotations

import torch

from calibration import CalibrationError
from calibration.architectures import ArchitectureSpec, Producer, SmoothingGroup
from calibration.stats import decoder_layers

# Clamp for channels that never fire (absmax 0) or zero weight columns: keeps s finite and positive.
EPS = 1e-5


@torch.no_grad()
def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 4 of the paper: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), in fp32.

    A channel whose activation or weight is all zero gets s_j = 1 (there is nothing to migrate).
    """
    act = act_absmax.float()
    weight = weight_absmax.float()
    s = act.clamp(min=EPS).pow(alpha) / weight.clamp(min=EPS).pow(1.0 - alpha)
    dead = (act == 0) | (weight == 0)
    return torch.where(dead, torch.ones_like(s), s.clamp(min=EPS))


def share_across_query_heads(per_channel: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Reduce a [num_heads * head_dim] vector to [num_kv_heads * head_dim] by max over the heads of a KV group."""
    head_dim = per_channel.numel() // num_heads
    grouped = per_channel.reshape(num_kv_heads, num_heads // num_kv_heads, head_dim)
    return grouped.amax(dim=1).reshape(-1)


def expand_to_query_heads(per_kv_channel: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Inverse layout of share_across_query_heads: repeat each KV head's factor for its query heads."""
    head_dim = per_kv_channel.numel() // num_kv_heads
    grouped = per_kv_channel.reshape(num_kv_heads, 1, head_dim)
    return grouped.expand(num_kv_heads, num_heads // num_kv_heads, head_dim).reshape(-1)


@torch.no_grad()
def fold_into_norm(norm: torch.nn.Module, s: torch.Tensor) -> None:
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))


@torch.no_grad()
def fold_into_rows(linear: torch.nn.Linear, s: torch.Tensor) -> None:
    """Divide output row j (and bias j) by s_j: the producer side of the migration."""
    linear.weight.div_(s.to(linear.weight.dtype)[:, None])
    if linear.bias is not None:
        linear.bias.div_(s.to(linear.bias.dtype))


@torch.no_grad()
def scale_input_columns(linear: torch.nn.Linear, s: torch.Tensor) -> None:
    """Multiply input column j by s_j: the consumer side (W' = diag(s) W in the paper's notation)."""
    linear.weight.mul_(s.to(linear.weight.dtype)[None, :])


def group_key(layer_prefix: str, group: SmoothingGroup) -> str:
    return f"{layer_prefix}.{group.producer}"


def layer_groups(model: torch.nn.Module, spec: ArchitectureSpec):
    """(layer prefix, group, factor key) for every smoothing group of every decoder layer, in order."""
    for i, _ in decoder_layers(model, spec):
        prefix = f"{spec.layers}.{i}"
        for group in spec.groups:
            yield prefix, group, group_key(prefix, group)


@torch.no_grad()
def group_absmax(model: torch.nn.Module, prefix: str, group: SmoothingGroup,
                 absmax: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation absmax, weight column absmax) per factor channel of one group, from the current weights.

    Several consumers read one activation, so both are maxed over the consumers; under grouped-query attention
    the o_proj vectors are reduced to one value per kv_head x head_dim (the v_proj rows a factor can scale).
    """
    names = [f"{prefix}.{c}" for c in group.consumers]
    missing = [n for n in names if n not in absmax]
    if missing:
        raise CalibrationError(f"no calibration statistics for {missing[0]}: re-run calibrate for this model")
    act = torch.stack([absmax[n] for n in names]).amax(dim=0)
    weight = torch.stack([model.get_submodule(n).weight.abs().amax(dim=0) for n in names]).amax(dim=0)
    if group.shared_by_query_heads:
        heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
        act = share_across_query_heads(act, heads, kv_heads)
        weight = share_across_query_heads(weight, heads, kv_heads)
    return act, weight


def uniform_alpha(model: torch.nn.Module, spec: ArchitectureSpec, alpha: float) -> dict[str, float]:
    return {key: alpha for _, _, key in layer_groups(model, spec)}


@torch.no_grad()
def compute_factors(model: torch.nn.Module, spec: ArchitectureSpec, absmax: dict[str, torch.Tensor],
                    alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """One factor vector per smoothing group (keyed by the producer's full name), from the unsmoothed weights.

    `alphas` maps each group key to its migration strength (uniform_alpha for one global value).
    All factors come from the original weights, so the result does not depend on folding order
    (up_proj is both a consumer of post_attention_layernorm and the producer for down_proj).
    The vector has the producer's output width (kv_heads * head_dim for v_proj under GQA).
    """
    factors = {}
    for prefix, group, key in layer_groups(model, spec):
        act, weight = group_absmax(model, prefix, group, absmax)
        factors[key] = smoothing_factors(act, weight, alphas[key])
    return factors


def consumer_factor(model: torch.nn.Module, group: SmoothingGroup, s: torch.Tensor) -> torch.Tensor:
    """The factor as seen on the consumers' input channels (expanded over query heads where shared)."""
    if group.shared_by_query_heads:
        return expand_to_query_heads(s, model.config.num_attention_heads, model.config.num_key_value_heads)
    return s


@torch.no_grad()
def apply_factors(model: torch.nn.Module, spec: ArchitectureSpec, factors: dict[str, torch.Tensor]) -> None:
    """Fold every factor into producer and consumers, in place. The float model's outputs are unchanged."""
    for prefix, group, key in layer_groups(model, spec):
        if key not in factors:
            continue
        s = factors[key]
        producer = model.get_submodule(key)
        if group.kind is Producer.NORM:
            fold_into_norm(producer, s)
        else:
            fold_into_rows(producer, s)
        for consumer in group.consumers:
            scale_input_columns(model.get_submodule(f"{prefix}.{consumer}"), consumer_factor(model, group, s))


def consumer_factors(model: torch.nn.Module, spec: ArchitectureSpec,
                     factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Linear name -> the factor dividing its input channels (absent for linears that were not smoothed)."""
    out = {}
    for prefix, group, key in layer_groups(model, spec):
        if key in factors:
            for consumer in group.consumers:
                out[f"{prefix}.{consumer}"] = consumer_factor(model, group, factors[key])
    return out
