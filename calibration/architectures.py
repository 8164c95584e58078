"""Architecture knowledge as data: which producer feeds which linears, and how a smoothing factor is folded.

SmoothQuant (Xiao et al., 2022, eq. 3) divides activation channel j by s_j and multiplies weight column j by s_j.
The division must be absorbed by whatever produced the activation so the float model is unchanged:
- NORM: an RMSNorm/LayerNorm weight (its output channel j is scaled by weight_j).
- LINEAR_ROWS: a preceding linear whose output row j becomes the consumer's input channel j, either directly
  (v_proj -> attention -> o_proj: softmax(QK^T) mixes positions, not channels) or through an elementwise product
  (down_proj's input is act(gate) * up, so scaling up's row j scales down's input channel j).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from calibration import CalibrationError


class Producer(enum.Enum):
    NORM = "norm"
    LINEAR_ROWS = "linear_rows"


@dataclass(frozen=True)
class SmoothingGroup:
    """Linears that read the same activation, and the module that produced that activation."""

    producer: str
    kind: Producer
    consumers: tuple[str, ...]
    # With grouped-query attention one v_proj row feeds the same channel of every query head of its KV group,
    # so o_proj's factor must be shared by those heads (one factor per kv_head x head_dim).
    shared_by_query_heads: bool = False


@dataclass(frozen=True)
class ArchitectureSpec:
    model_types: tuple[str, ...]
    layers: str
    linears: tuple[str, ...]
    groups: tuple[SmoothingGroup, ...]
    embedding: str  # token embedding: the first thing a layer-streamed pass computes (calibration/layer_stream.py)
    final_norm: str  # after the last layer; a layer window replaces it (and the head) by identities
    head: str
    # Linears whose input no offline transform reaches, rotated online with --rotate-block (calibration/rotation.py)
    rotatable: tuple[str, ...] = ()

    def linear_names(self, num_layers: int) -> list[str]:
        """Every quantizable linear's full module name, in layer order (what stats.quantizable_linears finds)."""
        return [f"{self.layers}.{i}.{rel}" for i in range(num_layers) for rel in self.linears]


LLAMA_FAMILY = ArchitectureSpec(
    model_types=("llama", "mistral", "qwen2"),
    layers="model.layers",
    linears=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
    groups=(
        SmoothingGroup("input_layernorm", Producer.NORM, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        SmoothingGroup("self_attn.v_proj", Producer.LINEAR_ROWS, ("self_attn.o_proj",), shared_by_query_heads=True),
        SmoothingGroup("post_attention_layernorm", Producer.NORM, ("mlp.gate_proj", "mlp.up_proj")),
        SmoothingGroup("mlp.up_proj", Producer.LINEAR_ROWS, ("mlp.down_proj",)),
    ),
    embedding="model.embed_tokens",
    final_norm="model.norm",
    head="lm_head",
    rotatable=("mlp.down_proj",),
)

ARCHITECTURES: tuple[ArchitectureSpec, ...] = (LLAMA_FAMILY,)


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCHITECTURES for t in spec.model_types)


def spec_for_model_type(model_type: str) -> ArchitectureSpec:
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise CalibrationError(
        f"unsupported architecture '{model_type}': supported model types are {', '.join(supported_model_types())}"
    )
