"""A Triton Inference Server model repository for the decoder: config.pbtxt written from the plan's manifest (or,
for Triton's ONNX Runtime backend, from the graph), and the model file in version folder 1.

The decoder step is stateless (the client sends past keys/values and gets presents back), so Triton's dynamic
batcher may merge concurrent requests, but only requests whose shapes agree (same new-token and past lengths).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx

from exporters.decoder_io import DecoderShape
from trt_builder import BuildError
from trt_builder.build import graph_decoder_shape

PLAN, ONNX_GRAPH = "model.plan", "quantized.onnx"
BACKENDS = {"tensorrt": ("tensorrt_plan", PLAN, "KIND_GPU"), "onnxruntime": ("onnxruntime_onnx", ONNX_GRAPH, "KIND_CPU")}
ONNX_TO_TRITON = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32",
                  onnx.TensorProto.FLOAT16: "TYPE_FP16"}


def graph_tensors(path: Path) -> tuple[list, list]:
    """(name, Triton type, dims without batch) of each graph input and output; symbolic dims become -1."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values):
        out = []
        for v in values:
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            out.append((v.name, ONNX_TO_TRITON[v.type.tensor_type.elem_type], dims[1:]))
        return out

    return describe(graph.input), describe(graph.output)


def _tensor_block(kind: str, tensors: list) -> str:
    entries = ",\n".join(f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'
                         for name, dtype, dims in tensors)
    return f"{kind} [\n{entries}\n]\n"


def model_config(name: str, backend: str, inputs: list, outputs: list, max_batch: int, profiles: list[str]) -> str:
    """config.pbtxt text. max_batch_size > 0 makes dim 0 of every tensor Triton's batch dimension (all of ours
    have batch first), so dims list the rest. A TensorRT instance may use every profile of the plan: the backend
    picks the one that fits each request's shapes (prefill or decode)."""
    platform, _, kind = BACKENDS[backend]
    text = f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch}\n'
    text += _tensor_block("input", inputs) + _tensor_block("output", outputs)
    profile = f"\n    profile: [ {', '.join(json.dumps(p) for p in profiles)} ]" if profiles else ""
    text += f"instance_group [\n  {{\n    count: 1\n    kind: {kind}{profile}\n  }}\n]\n"
    text += "dynamic_batching {\n  max_queue_delay_microseconds: 100\n}\n"
    return text


def write_repository(out: Path, repository: Path, name: str, backend: str, max_batch: int) -> Path:
    """repository/name/{config.pbtxt, 1/<model file>}, written to a temporary folder and renamed."""
    platform, model_file, _ = BACKENDS[backend]
    source = out / model_file
    if not source.is_file():
        hint = ("TensorRT did not build a plan on this machine; build one on the GPU machine "
                "(`make build OUT=...`) or use --backend onnxruntime") if backend == "tensorrt" else "run `make engine`"
        raise BuildError(f"{source} does not exist: {hint}")
    profiles: list[str] = []
    graph = out / (ONNX_GRAPH if backend == "onnxruntime" else "quantized.fp16.onnx")
    inputs, outputs = graph_tensors(graph)
    if backend == "tensorrt":
        manifest = json.loads((out / (PLAN + ".json")).read_text())
        max_batch = manifest["settings"]["limits"]["max_batch"]
        profiles = [str(i) for i in range(len(manifest["profiles"]))]
        if DecoderShape(**manifest["decoder"]) != graph_decoder_shape(graph):
            raise BuildError(f"{PLAN}.json describes another KV layout than {graph.name}: rebuild the plan")
    final = repository / name
    tmp = repository / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "1").mkdir(parents=True)
    (tmp / "config.pbtxt").write_text(model_config(name, backend, inputs, outputs, max_batch, profiles))
    shutil.copy2(source, tmp / "1" / model_file)
    if backend == "onnxruntime" and (out / (model_file + ".data")).is_file():
        shutil.copy2(out / (model_file + ".data"), tmp / "1" / (model_file + ".data"))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final
