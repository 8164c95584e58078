"""Peak memory of each stage, estimated from the model config before anything is loaded.

The model's own sizes come from its config (parameters counted on the meta device: exact). How many copies of
the weights a stage holds at its peak was measured on SmolLM2-135M (each stage its own process, docs/RESULTS.md
"Hidden states on disk, verify one session at a time, and the benches at 2ae8d9a and 9e176b2"): the model
(calibrate, quantize), the smoothed model beside the heap the reference graphs left (export), one ONNX Runtime
session at a time (verify; the FP16 reference's on CPU is the largest, ~1 GB for SmolLM2). --low-memory holds one
decoder layer (two with GPTQ's float twin) and a batch of the calibration windows' hidden states instead (the others
wait on disk).
An estimate, not a bound: the bench prints it next to the measured peak RSS.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

from calibration.heap import glibc, trim_heap
from calibration.sources import SYNTHETIC
from pipeline.config import RunConfig

GB = 1e9
RUNTIME_BYTES = 0.45e9  # Python, torch, transformers, onnx (importing the pipeline: 0.35 GB), the tokenized text
# Copies of the FP32 weights each in-memory stage holds at its peak, beyond the runtime and the activations (SmolLM2,
# 0.54 GB of weights, each stage its own process; `make bench` at 6e1be48, 7528780, 2ae8d9a, 9e176b2, 6e2828d,
# 5bc5148, b535a85 and fa3e7c5, and single stages on the machine of 6e2828d: calibrate 1.09-2.19 GB, quantize
# 1.17-2.65 GB before its passes trimmed glibc's heap per linear and 1.13-1.38 GB since (1.38 in one run of eight).
# Calibrate's spread was its absmax observer's running results, allocated during the pass among the forward's
# temporaries; with its buffers allocated before the pass (2026-12-06): 1.12-1.15 GB in four runs, 1.19 GB in
# `make bench` at 59f52fb. The estimate takes the upper end of each spread with a margin, since it exists to warn
# before memory runs out.
# Export: 1.16 GB (59f52fb: alone and in `make bench`), its peak the FP32 reference's trace, since the smoothed model
# drops the float weights the Q/DQ graphs replace by integer codes before rounding the kept ones (1.36-1.50 GB
# before). Verify: 1.26 GB for its two processes together (`make bench` at d95a96e; 1.72-1.88 GB in one process
# before): the PyTorch side (one model at a time, 1.19-1.22 GB alone) while the stage's process waits without torch
# (0.1 GB), then the ONNX Runtime sessions in that process (1.12 GB; the layer-wise diff's passes run cut graphs).
WEIGHT_COPIES = {"calibrate": 1.4, "quantize": 1.2, "export": 1.3, "verify": 1.4}
# In-memory GPTQ's quantize, beside the layer inputs it holds: SmolLM2 w4a16-gptq quantize alone peaked at 1,874 MB
# (9243b83, measured once, not broken down; its layer loop is not trimmed like the RTN passes).
GPTQ_QUANTIZE_COPIES = 2.2
STREAMED_STAGES = ("calibrate", "quantize")  # the stages --low-memory runs layer by layer


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    layer_parameters: int  # the largest decoder layer
    hidden: int
    intermediate: int
    heads: int
    kv_bytes_per_token: int  # FP32 keys and values of one token in every layer

    @classmethod
    def from_config(cls, config, layers_path: str) -> "ModelShape":
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights():  # shapes only, no memory
            model = AutoModelForCausalLM.from_config(config)
        model.tie_weights()  # a tied head shares the embedding's parameter: count it once
        layers = model.get_submodule(layers_path)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(sum(p.numel() for p in model.parameters()),
                   max(sum(p.numel() for p in layer.parameters()) for layer in layers),
                   config.hidden_size, config.intermediate_size, config.num_attention_heads,
                   4 * 2 * len(layers) * kv_heads * head_dim)

    @classmethod
    def of_model(cls, source) -> "ModelShape":
        """The shape of a resolved MODEL (pipeline.models.ModelSource), from its config alone."""
        from pipeline import models

        return cls.from_config(models.model_config(source), models.architecture(source).layers)

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.parameters


def activation_bytes(shape: ModelShape, windows: int, seq_len: int) -> float:
    """One decoder layer's forward over `windows` at once, FP32: attention scores and their softmax, the MLP's
    three intermediate-width tensors, a few hidden-width ones."""
    tokens = windows * seq_len
    return 4 * tokens * (2 * shape.heads * seq_len + 3 * shape.intermediate + 6 * shape.hidden)


def hidden_state_bytes(shape: ModelShape, windows: int, seq_len: int) -> float:
    """The FP32 hidden states of `windows` at one layer boundary."""
    return 4 * windows * seq_len * shape.hidden


KV_GROWTH = 1.5  # RSS of a sampled sequence's KV cache per byte it holds at full length (data.SAMPLING_BATCH)


def sampling_bytes(shape: ModelShape, seq_len: int, dtype) -> float:
    """Synthetic calibration's sampling (calibration.data.sampling_dtype, torch `dtype`), in a model of its own: its
    weights and the KV cache of a batch of windows at full length; a bfloat16 model is converted while it loads,
    the FP32 checkpoint mapped beside it. SmolLM2, 512 tokens: 1,224 MB measured loading in bfloat16 (1.26 GB
    estimated), 1,192 MB sampling 8 windows at once in float32 (1.27 GB estimated)."""
    from calibration.data import SAMPLING_BATCH

    weights = shape.fp32_bytes * dtype.itemsize / 4
    kv_cache = KV_GROWTH * SAMPLING_BATCH[dtype] * seq_len * shape.kv_bytes_per_token * dtype.itemsize / 4
    loading = shape.fp32_bytes + weights if dtype.itemsize < 4 else 0.0
    return RUNTIME_BYTES + max(loading, weights + kv_cache)


def estimate_peaks(shape: ModelShape, config: RunConfig) -> dict[str, float]:
    """Stage -> estimated peak bytes, for the stages as this config runs them."""
    cal, quant = config.calibration, config.quant
    batch = activation_bytes(shape, cal.batch_size, cal.seq_len)
    searched = quant.recipe.int8_activations and quant.smooth and quant.alpha == "auto"  # its windows in one batch
    active = {stage: batch for stage in WEIGHT_COPIES}
    active["quantize"] = activation_bytes(shape, quant.search_windows, cal.seq_len) if searched else batch
    gptq = quant.recipe.weight_method == "gptq"
    copies = {**WEIGHT_COPIES, "quantize": GPTQ_QUANTIZE_COPIES} if gptq else WEIGHT_COPIES
    peaks = {stage: RUNTIME_BYTES + n * shape.fp32_bytes + active[stage] for stage, n in copies.items()}
    if gptq:  # beside the model: one layer's inputs for every calibration window, quantized and float
        peaks["quantize"] += hidden_state_bytes(shape, 2 * cal.windows, cal.seq_len)
    if cal.source == SYNTHETIC:  # sampled before the statistics' FP32 model loads
        from calibration.data import sampling_dtype  # torch: not at import (verify's graph process has none)

        sampler = sampling_dtype(cal.sampling_dtype)
        peaks["calibrate"] = max(peaks["calibrate"], sampling_bytes(shape, cal.seq_len, sampler))
    if config.low_memory:
        # The hidden states wait on disk; in memory: one batch of them, the search's windows, and with GPTQ its
        # layer's inputs, quantized and float, as batch lists.
        held = {"calibrate": cal.batch_size,
                "quantize": 2 * cal.windows if gptq else max(cal.batch_size, quant.search_windows)}
        layer = 4 * shape.layer_parameters * (2 if gptq else 1)
        peaks.update({stage: RUNTIME_BYTES + layer + hidden_state_bytes(shape, held[stage], cal.seq_len) + active[stage]
                      for stage in STREAMED_STAGES})
    return peaks


def describe_peaks(shape: ModelShape, peaks: dict[str, float], low_memory: bool) -> str:
    stages = ", ".join(f"{stage} {value / GB:.1f} GB" for stage, value in peaks.items())
    streamed = " (--low-memory: calibrate and quantize one layer at a time)" if low_memory else ""
    return (f"memory estimate: FP32 model {shape.fp32_bytes / GB:.2f} GB, one layer "
            f"{4 * shape.layer_parameters / GB:.2f} GB; peak per stage {stages}{streamed}")


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
LARGE_BLOCK_BYTES = 1 << 20


def map_large_blocks() -> None:
    """Serve every allocation of 1 MB and more (activations, logits, weight temporaries) with its own mapping, given
    back to the operating system when freed: what --low-memory runs under. glibc's default threshold rises after
    each such free, up to 32 MB, and larger-than-1 MB tensors then come from the heap, where fragmentation can keep
    what they freed: --low-memory calibrate on SmolLM2 peaked anywhere from 738 to 1,540 MB across 8 runs, and at
    689 MB with the threshold fixed. The price is a page fault per page of every large buffer (SmolLM2 quantize
    86 s instead of 51 s), so in-memory runs keep glibc's default and trim its heap per linear in the passes that
    fragmented it (calibration/heap.py; docs/RESULTS.md). A user's own MALLOC_MMAP_THRESHOLD_ wins; not glibc:
    no-op."""
    libc = glibc()
    if libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES)


def release_memory() -> None:
    """Hand freed memory back to the operating system between large steps (one ONNX graph and the next): a
    graph's protobuf buffers are freed in pieces glibc keeps for reuse, so without this each graph's peak would
    stack on the previous one's."""
    gc.collect()
    trim_heap()
