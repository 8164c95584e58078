"""Build a strongly typed TensorRT plan from the FP16 Q/DQ ONNX (INT8 W8A8 or INT4 weight-only), with a sidecar manifest."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path


from exporters.decoder_io import DecoderShape
from trt_builder import BuildError
from trt_builder.profiles import Limits, decoder_profiles
from trt_builder.compat import gpu_compute_capability, import_tensorrt, network_flags

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildSettings:
    limits: Limits = Limits()
    workspace_bytes: int = 4 << 30
    optimization_level: int = 3


def graph_decoder_shape(onnx_path: Path) -> DecoderShape:
    """The decoder's KV layout from the graph's declared inputs (weights are not loaded)."""
    try:
        return DecoderShape.from_onnx_file(onnx_path)
    except ValueError as e:
        raise BuildError(f"{onnx_path.name}: {e}") from None


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
    decoder = graph_decoder_shape(onnx_path)
    profiles = decoder_profiles(decoder, settings.limits)
    for shapes in profiles.values():  # order matters: the runtime binds profile i to the i-th name
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
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
        "decoder": asdict(decoder),
        "profiles": {name: {tensor: [list(d) for d in dims] for tensor, dims in shapes.items()}
                     for name, shapes in profiles.items()},
        "settings": asdict(settings),
        "onnx": onnx_path.name,
    }


def write_manifest(manifest: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
