"""TensorRT optimisation profiles for the decoder graph, derived from the model's shape and the user's limits.

Two profiles (TensorRT picks kernels per profile, so prefill and decode each get shapes they actually run):
  prefill  batch 1..MAX_BATCH, sequence 1..MAX_INPUT_LEN, past = 1 reserved masked slot
  decode   batch 1..MAX_BATCH, sequence 1, past 1..MAX_SEQ_LEN (the reserved slot + up to MAX_SEQ_LEN - 1 tokens)
The reserved slot (pipeline/runtime.py KVCache) keeps every past input non-empty: zero-length dimensions in a
profile are unconfirmed for TensorRT (shared/docs/TENSORRT.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from exporters.decoder_io import IDS, MASK, POSITIONS, DecoderShape
from trt_builder import BuildError

RESERVED_SLOTS = 1


@dataclass(frozen=True)
class Limits:
    max_batch: int = 4
    max_input_len: int = 512
    max_seq_len: int = 1024  # prompt + generated tokens

    def __post_init__(self):
        if min(self.max_batch, self.max_input_len, self.max_seq_len) < 1:
            raise BuildError(f"profile limits must be positive: {asdict(self)}")
        if self.max_input_len > self.max_seq_len:
            raise BuildError(f"MAX_INPUT_LEN {self.max_input_len} exceeds MAX_SEQ_LEN {self.max_seq_len}: the prompt "
                             "is part of the sequence; raise MAX_SEQ_LEN or lower MAX_INPUT_LEN")


Range = tuple[int, int, int]  # min, opt, max of one dimension


def _mid(lo: int, hi: int) -> int:
    return max(lo, (lo + hi) // 2)


def _shapes(shape: DecoderShape, batch: Range, sequence: Range, past: Range) -> dict[str, list[tuple[int, ...]]]:
    """name -> [min, opt, max] shapes; total = past + sequence at each of the three points."""
    points = range(3)
    total = [past[i] + sequence[i] for i in points]
    tokens = [(batch[i], sequence[i]) for i in points]
    shapes = {IDS: tokens, POSITIONS: tokens, MASK: [(batch[i], total[i]) for i in points]}
    shapes.update({name: [shape.kv_shape(batch[i], past[i]) for i in points] for name in shape.past_names})
    return shapes


def decoder_profiles(shape: DecoderShape, limits: Limits) -> dict[str, dict[str, list[tuple[int, ...]]]]:
    batch = (1, _mid(1, limits.max_batch), limits.max_batch)
    reserved = (RESERVED_SLOTS,) * 3
    prefill = _shapes(shape, batch, (1, _mid(1, limits.max_input_len), limits.max_input_len), reserved)
    # Decode past: the reserved slot plus 0 .. MAX_SEQ_LEN - 1 tokens already cached.
    past = (RESERVED_SLOTS, _mid(RESERVED_SLOTS, limits.max_seq_len), limits.max_seq_len)
    decode = _shapes(shape, batch, (1, 1, 1), past)
    profiles = {"prefill": prefill, "decode": decode}
    for name, profile in profiles.items():
        check_consistent(shape, profile, name)
    return profiles


def check_consistent(shape: DecoderShape, profile: dict, name: str) -> None:
    """Inputs that share a dimension name get the same range, and mask length = past + sequence (else TensorRT
    rejects the profile at build time or the engine at run time)."""
    dims = {
        "batch": [(n, 0) for n in profile],
        "sequence": [(IDS, 1), (POSITIONS, 1)],
        "past_sequence": [(n, 2) for n in shape.past_names],
    }
    for dim, uses in dims.items():
        ranges = {tuple(profile[tensor][i][axis] for i in range(3)) for tensor, axis in uses}
        if len(ranges) != 1:
            raise BuildError(f"profile '{name}': inputs sharing '{dim}' disagree: {sorted(ranges)}")
    past0 = shape.past_names[0]
    for i in range(3):
        if profile[MASK][i][1] != profile[past0][i][2] + profile[IDS][i][1]:
            raise BuildError(f"profile '{name}': attention_mask length is not past + sequence at point {i}")
