"""`load(path)`: an engine for a TensorRT `.plan` or an `.onnx` decoder graph, with one interface:
`new_cache(batch, max_length)`, `step(input_ids, attention_mask, position_ids, cache) -> (logits, cache)` and
`generate(prompt, ...)`. A service needs only the output folder: graph or plan, its manifest, and tokenizer/."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from exporters.decoder_io import IDS, MASK, POSITIONS, LOGITS, DecoderShape
from pipeline import PipelineError
from pipeline.artifacts import TOKENIZER
from pipeline.generation import TextGeneration

log = logging.getLogger(__name__)

KV_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}  # int8: --kv-cache-int8


def kv_dtype(session: ort.InferenceSession, shape: DecoderShape):
    """The numpy dtype of a decoder session's past key/value inputs."""
    return KV_DTYPES[next(i.type for i in session.get_inputs() if i.name == shape.past_names[0])]


class KVCache:
    """Past keys and values of one batch, in two buffers per tensor allocated once at the full length.

    A step reads its past from one buffer and writes its present into the other (a graph input and output may not
    share memory in ONNX Runtime or TensorRT), then the roles swap. Each buffer is flat, so the contiguous
    [batch, kv_heads, length, head_dim] view of any length up to the maximum lies at its start.

    `reserved_slots` leading slots hold no token and are always masked out: the TensorRT engine starts prefill
    from one such slot instead of a zero-length past, whose support in optimisation profiles is unconfirmed."""

    def __init__(self, shape: DecoderShape, batch: int, max_length: int, zeros, reserved_slots: int = 0):
        self.shape, self.batch, self.reserved = shape, batch, reserved_slots
        self.capacity = max_length + reserved_slots
        size = int(np.prod(shape.kv_shape(batch, self.capacity)))
        self._buffers = [zeros((len(shape.past_names), size)), zeros((len(shape.past_names), size))]
        self._current = 0
        self.length = reserved_slots  # slots filled, reserved ones included

    @property
    def tokens(self) -> int:
        return self.length - self.reserved

    def _views(self, buffer, length: int) -> list:
        dims = self.shape.kv_shape(self.batch, length)
        return [row[: int(np.prod(dims))].reshape(dims) for row in buffer]

    def past(self) -> dict:
        return dict(zip(self.shape.past_names, self._views(self._buffers[self._current], self.length)))

    def present(self, new_tokens: int) -> dict:
        """Output views for this step; refuses to run past the length the buffers were allocated for."""
        total = self.length + new_tokens
        if total > self.capacity or new_tokens < 1:
            raise PipelineError(f"a step of {new_tokens} tokens after {self.tokens} exceeds the KV cache of "
                                f"{self.capacity - self.reserved}: allocate new_cache with a larger max_length")
        return dict(zip(self.shape.present_names, self._views(self._buffers[1 - self._current], total)))

    def graph_mask(self, attention_mask: np.ndarray) -> np.ndarray:
        """The caller's mask (past + new tokens) with the reserved slots prepended as masked."""
        if not self.reserved:
            return attention_mask
        return np.concatenate([np.zeros((self.batch, self.reserved), dtype=np.int64), attention_mask], axis=1)

    def advance(self, new_tokens: int) -> None:
        self._current, self.length = 1 - self._current, self.length + new_tokens


def check_step_inputs(cache: KVCache, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray):
    batch, new = input_ids.shape
    if batch != cache.batch or position_ids.shape != input_ids.shape or attention_mask.shape != (batch, cache.tokens + new):
        raise PipelineError(f"step inputs disagree: input_ids {input_ids.shape}, position_ids {position_ids.shape}, "
                            f"attention_mask {attention_mask.shape} with {cache.tokens} cached tokens of batch "
                            f"{cache.batch}: the mask must cover past + new tokens")


class OnnxDecoder(TextGeneration):
    """The decoder graph in ONNX Runtime (CPU by default). KV tensors are bound in place with IOBinding, so a
    decode step copies nothing but the logits."""

    backend = "onnxruntime"

    def __init__(self, path: Path, providers: list[str] | None = None, reserved_slots: int = 0,
                 disabled_optimizers: tuple[str, ...] = (), session: ort.InferenceSession | None = None,
                 threads: int | None = None):
        """`session`: one already open on `path` (verify runs its logits checks and this loop in one).
        `threads`: ONNX Runtime's intra-op threads, e.g. 1 for a service that runs one worker process per core."""
        from pipeline.verify import onnx_session  # the same session options as verification

        self.path, self.reserved_slots = Path(path), reserved_slots
        try:
            self.session = session if session is not None else onnx_session(self.path, providers,
                                                                             disabled_optimizers, threads)
        except Exception as e:  # ONNX Runtime raises its own exception types for unreadable models
            raise PipelineError(f"cannot load {self.path.name} in ONNX Runtime: {diagnose_onnx(self.path, e)}") from None
        self.shape = DecoderShape.from_session(self.session)
        self.kv_dtype = kv_dtype(self.session, self.shape)

    def new_cache(self, batch: int, max_length: int) -> KVCache:
        return KVCache(self.shape, batch, max_length, lambda dims: np.zeros(dims, dtype=self.kv_dtype),
                       self.reserved_slots)

    def step(self, input_ids, attention_mask, position_ids, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        check_step_inputs(cache, input_ids, attention_mask, position_ids)
        binding = self.session.io_binding()
        for name, array in ((IDS, input_ids), (MASK, cache.graph_mask(attention_mask)), (POSITIONS, position_ids)):
            binding.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
        for name, view in cache.past().items():
            binding.bind_cpu_input(name, view)
        binding.bind_output(LOGITS)  # first: copy_outputs_to_cpu returns outputs in binding order
        for name, view in cache.present(input_ids.shape[1]).items():
            binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(view))
        self.session.run_with_iobinding(binding)
        logits = binding.copy_outputs_to_cpu()[0]
        cache.advance(input_ids.shape[1])
        return logits.astype(np.float32, copy=False), cache

    def prefill_logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Teacher-forced logits of whole unpadded windows (no cache kept)."""
        return self.session.run([LOGITS], self.shape.prefill_feed(input_ids, self.kv_dtype))[0]


def diagnose_onnx(path: Path, error: Exception) -> str:
    """Why a graph would not load, in words a user can act on: missing external data, a corrupt file, or the
    runtime's own first line."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return "the file is not a readable ONNX model (truncated or corrupt): re-run `python -m pipeline export`"
    missing = sorted({entry.value for t in model.graph.initializer if uses_external_data(t)
                      for entry in t.external_data if entry.key == "location" and not (path.parent / entry.value).exists()})
    if missing:
        return f"its external data {', '.join(missing)} is missing next to it: copy it beside {path.name}"
    return str(error).strip().splitlines()[0]


def load_tokenizer(folder: Path):
    if not (folder / TOKENIZER).is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder / TOKENIZER))


def load(path: str | Path, providers: list[str] | None = None):
    """An engine for `path`: a `.plan` (TensorRT, needs the GPU extra) or an `.onnx` decoder graph (ONNX Runtime)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"no engine at {path}: pass OUT/model.plan or OUT/quantized.onnx from `make engine`")
    if path.suffix == ".plan":
        from trt_builder.runtime import TrtDecoder

        return TrtDecoder(path)
    if path.suffix == ".onnx":
        return OnnxDecoder(path, providers)
    raise PipelineError(f"{path.name}: unknown engine type '{path.suffix}'; expected .plan (TensorRT) or .onnx")
