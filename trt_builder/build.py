"""Build a strongly typed TensorRT plan from the FP16 Q/DQ ONNX (INT8 W8A8 or INT4 weight-only), with a sidecar manifest."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from trt_builder import BuildError
from trt_builder.compat import gpu_compute_capability, import_tensorrt, network_flags

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Profile:
    """min/opt/max for input_ids and attention_mask, both [batch, sequence]."""

    min_shape: tuple[int, int]
    opt_shape: tuple[int, int]
    max_shape: tuple[int, int]


def prefill_profile(max_batch: int, max_seq_len: int) -> Profile:
    return Profile((1, 1), (max(1, max_batch // 2), max(1, max_seq_len // 2)), (max_batch, max_seq_len))


@dataclass(frozen=True)
class BuildSettings:
    max_batch: int = 4
    max_seq_len: int = 512
    workspace_bytes: int = 4 << 30
    optimization_level: int = 3


def build_plan(onnx_path: Path, plan_path: Path, settings: BuildSettings, timing_cache: Path) -> dict:
    """Parse, configure and build; write the plan (temp name, then rename) and return the manifest."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data next to the ONNX file.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT could not parse {onnx_path.name}: {'; '.join(errors[:3])}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector reports per-layer precision
    profile = builder.create_optimization_profile()
    shape = prefill_profile(settings.max_batch, settings.max_seq_len)
    for name in ("input_ids", "attention_mask"):
        profile.set_shape(name, shape.min_shape, shape.opt_shape, shape.max_shape)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT failed to build {onnx_path.name}; see the TensorRT log above")
    tmp = plan_path.with_name(plan_path.name + ".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(plan_path)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "tensorrt_version": trt.__version__,
        "gpu_compute_capability": gpu_compute_capability(),
        "strongly_typed": True,
        "profiles": [{"input_ids": asdict(shape), "attention_mask": asdict(shape)}],
        "settings": asdict(settings),
        "onnx": onnx_path.name,
    }


def write_manifest(manifest: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
