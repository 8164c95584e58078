"""The TensorRT engine behind `pipeline.runtime.load(".plan")`: same `new_cache`/`step`/`generate` as the ONNX
Runtime engine, on CUDA with torch tensors as device buffers (TensorRT 10/11 `execute_async_v3` API).

Never run on our CPU machines (no TensorRT there); written against the documented API in shared/docs/TENSORRT.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from exporters.decoder_io import IDS, LOGITS, MASK, POSITIONS, DecoderShape
from pipeline.generation import TextGeneration
from pipeline.runtime import KVCache, check_step_inputs
from trt_builder import BuildError
from trt_builder.compat import gpu_compute_capability, import_tensorrt
from trt_builder.profiles import RESERVED_SLOTS


def check_compatible(manifest: dict, tensorrt_version: str, compute_capability: str) -> None:
    """A plan runs only on the TensorRT major.minor and GPU architecture it was built for (no version- or
    hardware-compatible build flags are set by our builder)."""
    built_trt, built_cc = manifest.get("tensorrt_version", "?"), manifest.get("gpu_compute_capability", "?")
    if built_trt.split(".")[:2] != tensorrt_version.split(".")[:2] or built_cc != compute_capability:
        raise BuildError(f"plan built for TensorRT {built_trt} on compute capability {built_cc}, but this machine has "
                         f"TensorRT {tensorrt_version} on compute capability {compute_capability}: rebuild it here "
                         "with `python -m pipeline build`")


def _on_gpu(array: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).cuda()


class TrtDecoder(TextGeneration):
    backend = "tensorrt"

    def __init__(self, path: Path):
        import torch

        self.path = Path(path)
        manifest_path = self.path.with_name(self.path.name + ".json")
        if not manifest_path.is_file():
            raise BuildError(f"no manifest {manifest_path.name} next to {self.path.name}: rebuild with "
                             "`python -m pipeline build`")
        manifest = json.loads(manifest_path.read_text())
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise BuildError("a TensorRT plan needs a CUDA GPU and none is visible; load the .onnx instead")
        check_compatible(manifest, trt.__version__, gpu_compute_capability())
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise BuildError(f"TensorRT could not deserialize {self.path.name}; see the TensorRT log above")
        self.shape = DecoderShape(**manifest["decoder"])
        # The graph decides the dtypes (strongly typed): FP16 cache and logits, or an INT8 cache (--kv-cache-int8).
        torch_dtype = {trt.DataType.HALF: torch.float16, trt.DataType.FLOAT: torch.float32, trt.DataType.INT8: torch.int8}
        self.kv_dtype = torch_dtype[self.engine.get_tensor_dtype(self.shape.past_names[0])]
        self.logits_dtype = torch_dtype[self.engine.get_tensor_dtype(LOGITS)]
        self.profiles = list(manifest["profiles"])
        self.stream = torch.cuda.Stream()
        # One execution context per profile, bound once: prefill and decode never re-select a profile.
        self.contexts = {}
        for index, name in enumerate(self.profiles):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(index, self.stream.cuda_stream)
            self.contexts[name] = context

    def new_cache(self, batch: int, max_length: int) -> KVCache:
        import torch

        return KVCache(self.shape, batch, max_length,
                       lambda dims: torch.zeros(dims, dtype=self.kv_dtype, device="cuda"), RESERVED_SLOTS)

    def step(self, input_ids, attention_mask, position_ids, cache: KVCache):
        import torch

        check_step_inputs(cache, input_ids, attention_mask, position_ids)
        batch, new = input_ids.shape
        if cache.tokens == 0:
            context = self.contexts["prefill"]
        elif new == 1:
            context = self.contexts["decode"]
        else:
            raise BuildError("the plan's profiles run a prefill from an empty cache or one token per decode step; "
                             f"got {new} tokens after {cache.tokens}")
        inputs = {IDS: _on_gpu(input_ids), MASK: _on_gpu(cache.graph_mask(attention_mask)),
                  POSITIONS: _on_gpu(position_ids), **cache.past()}
        logits = torch.empty((batch, new, self.engine.get_tensor_shape(LOGITS)[-1]), dtype=self.logits_dtype,
                             device="cuda")
        outputs = {LOGITS: logits, **cache.present(new)}
        for name, tensor in inputs.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise BuildError("TensorRT execute_async_v3 failed; see the TensorRT log above")
        self.stream.synchronize()
        cache.advance(new)
        return logits.float().cpu().numpy(), cache
