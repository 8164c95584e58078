"""Which precision each quantized GEMM actually runs at in a built plan, from TensorRT's engine inspector.

Written against the TensorRT 10 Python API (IEngineInspector.get_engine_information with LayerInformationFormat.JSON;
the plan is built with ProfilingVerbosity.DETAILED so every layer lists its inputs and their format/datatype).
NOT run here: TensorRT cannot be installed on these machines.

TensorRT names a fused layer after the ONNX nodes it absorbed ("/lm/model/layers.0/mlp/down_proj/MatMul + ..."),
so a quantized GEMM is found by its MatMul node name (exporters/naming.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from exporters.naming import matmul_node_name
from trt_builder.compat import import_tensorrt


def engine_layers(plan: Path) -> list[dict]:
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan.read_bytes())
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    return [layer if isinstance(layer, dict) else {"Name": layer} for layer in info.get("Layers", [])]


def _input_precision(layer: dict) -> str | None:
    """'Format/Datatype' of the layer's first input (e.g. 'Row major linear Int8 format'), if the plan says."""
    inputs = layer.get("Inputs") or []
    return inputs[0].get("Format/Datatype") if inputs and isinstance(inputs[0], dict) else None


def gemm_precisions(plan: Path, modules: list[str]) -> dict:
    layers = engine_layers(plan)
    rows = []
    for module in modules:
        node = matmul_node_name(module)
        layer = next((entry for entry in layers if node in str(entry.get("Name", ""))), None)
        precision = _input_precision(layer) if layer else None
        rows.append({"module": module, "layer": layer.get("Name") if layer else None, "precision": precision,
                     "int8": precision is not None and "int8" in precision.lower()})
    return {"gemms": rows, "not_int8": [r["module"] for r in rows if not r["int8"]]}
