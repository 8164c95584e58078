"""Everything that differs between TensorRT 10 and 11, and the lazy import (shared/docs/TENSORRT.md)."""

from __future__ import annotations

import importlib

from trt_builder import BuildError


def import_tensorrt():
    try:
        return importlib.import_module("tensorrt")
    except ImportError as e:
        raise BuildError(f"TensorRT is not importable ({e}); install the 'gpu' extra on a machine with an NVIDIA GPU") from None


def unavailable_reason() -> str | None:
    """Why a plan cannot be built here, or None when TensorRT and a CUDA GPU are both present."""
    try:
        import_tensorrt()
    except BuildError as e:
        return str(e)
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to this process (torch.cuda.is_available() is False)"
    return None


def network_flags(trt) -> int:
    """Strongly typed: the Q/DQ and FP16 dtypes of the ONNX decide precision (TensorRT 11 has no other mode;
    on 10.x the flag exists and the precision BuilderFlags are deprecated)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def gpu_compute_capability() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"
