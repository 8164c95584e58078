"""The decoder graph's interface, shared by the exporter, both runtimes and the TensorRT profiles.

One graph serves prefill (past_sequence = 0) and decode (sequence = 1):
  inputs   input_ids [batch, sequence] int64, attention_mask [batch, total_sequence] int64 (past + new tokens),
           position_ids [batch, sequence] int64, past_key_values.{i}.key/value [batch, kv_heads, past_sequence, head_dim]
  outputs  logits [batch, sequence, vocab], present.{i}.key/value [batch, kv_heads, total_sequence, head_dim]
Dimension names are shared wherever two tensors must agree, so a TensorRT profile can be checked for consistency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IDS, MASK, POSITIONS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
BATCH, SEQUENCE, PAST, TOTAL = "batch", "sequence", "past_sequence", "total_sequence"
KV = ("key", "value")


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> "DecoderShape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, kv_heads, head_dim)

    @classmethod
    def from_inputs(cls, shapes: dict[str, list]) -> "DecoderShape":
        """From a graph's input shapes (name -> dims); refuses a graph without the KV-cache inputs."""
        layers = sum(1 for name in shapes if name.startswith("past_key_values.") and name.endswith(".key"))
        if layers == 0 or past_name(0, "key") not in shapes:
            raise ValueError("the graph has no past_key_values inputs: it is not a smoothtrt decoder graph; re-run "
                             "`python -m pipeline export`")
        _, kv_heads, _, head_dim = shapes[past_name(0, "key")]
        return cls(layers, int(kv_heads), int(head_dim))

    @classmethod
    def from_session(cls, session) -> "DecoderShape":
        """From an ONNX Runtime session's declared inputs."""
        return cls.from_inputs({i.name: i.shape for i in session.get_inputs()})

    @classmethod
    def from_onnx_file(cls, path) -> "DecoderShape":
        """From a graph file's declared inputs, without loading its weights."""
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        return cls.from_inputs({i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
                                for i in graph.input})

    @property
    def past_names(self) -> list[str]:
        return [past_name(i, kind) for i in range(self.layers) for kind in KV]

    @property
    def present_names(self) -> list[str]:
        return [present_name(i, kind) for i in range(self.layers) for kind in KV]

    @property
    def input_names(self) -> list[str]:
        return [IDS, MASK, POSITIONS, *self.past_names]

    @property
    def output_names(self) -> list[str]:
        return [LOGITS, *self.present_names]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {IDS: {0: BATCH, 1: SEQUENCE}, MASK: {0: BATCH, 1: TOTAL}, POSITIONS: {0: BATCH, 1: SEQUENCE},
                LOGITS: {0: BATCH, 1: SEQUENCE}}
        axes.update({name: {0: BATCH, 2: PAST} for name in self.past_names})
        axes.update({name: {0: BATCH, 2: TOTAL} for name in self.present_names})
        return axes

    def kv_shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        return (batch, self.kv_heads, length, self.head_dim)

    def prefill_feed(self, input_ids: np.ndarray, dtype=np.float32, reserved_slots: int = 0) -> dict[str, np.ndarray]:
        """Inputs for a whole unpadded window with no past: the logits-only use of the graph (verification).
        `reserved_slots`: that many masked, empty past slots first (what a TensorRT plan's prefill profile needs)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        empty = np.zeros(self.kv_shape(ids.shape[0], reserved_slots), dtype=dtype)
        positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
        mask = np.concatenate([np.zeros((ids.shape[0], reserved_slots), np.int64), np.ones_like(ids)], axis=1)
        return {IDS: ids, MASK: mask, POSITIONS: np.ascontiguousarray(positions),
                **{name: empty for name in self.past_names}}


def observe_absmax(session, names: list[str], windows: np.ndarray) -> dict[str, float]:
    """Absmax of the named outputs of an ONNX Runtime decoder session over calibration windows (one prefill each,
    no past): the ranges static per-tensor scales are cut from."""
    shape = DecoderShape.from_session(session)
    absmax = dict.fromkeys(names, 0.0)
    for window in windows:
        for name, value in zip(names, session.run(names, shape.prefill_feed(window[None, :]))):
            absmax[name] = max(absmax[name], float(np.abs(value).max()))
    return absmax
