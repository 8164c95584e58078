"""Frozen run configuration, written into manifest.json next to the artifacts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from pipeline import PipelineError

TWO_GIB = 2 << 30  # protobuf's message limit: larger models need ONNX external data


@dataclass(frozen=True)
class CalibrationConfig:
    source: str = "synthetic"
    eval_source: str | None = None
    windows: int = 64
    eval_windows: int = 16
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 4

    def __post_init__(self):
        for name in ("windows", "eval_windows", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise PipelineError(f"{name} must be at least 1 (got {getattr(self, name)})")


@dataclass(frozen=True)
class QuantConfig:
    alpha: float = 0.8
    smooth: bool = True
    include: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise PipelineError(f"ALPHA must be within [0, 1] (got {self.alpha}): 0.8 is a good start for Llama models")


@dataclass(frozen=True)
class ExportConfig:
    # 21: FP16 scales on DequantizeLinear need >= 19, INT4 blocked DQ needs 21; TensorRT 10.x parses 9-24.
    opset: int = 21
    external_data_threshold: int = TWO_GIB


@dataclass(frozen=True)
class BuildConfig:
    max_batch: int = 4
    max_seq_len: int = 512
    workspace_gib: int = 4
    optimization_level: int = 3
    require_plan: bool = False


@dataclass(frozen=True)
class RunConfig:
    model: str
    out: str
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    build: BuildConfig = field(default_factory=BuildConfig)

    def to_json(self) -> dict:
        return asdict(self)


def digest(*parts) -> str:
    """Stable hash of JSON-able parts (dataclasses are turned into dicts)."""
    payload = [asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
