"""Frozen run configuration, written into manifest.json next to the artifacts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from calibration.rotation_blocks import valid_block
from calibration.sources import SYNTHETIC
from pipeline import PipelineError
from pipeline.accuracy_target import Target

SAMPLING_DTYPES = ("auto", "bfloat16", "float32")  # synthetic calibration's sampler (calibration.data.SAMPLING_BATCH)

EXTERNAL_DATA_BYTES = 64 << 20


@dataclass(frozen=True)
class CalibrationConfig:
    source: str = SYNTHETIC
    eval_source: str | None = None
    windows: int = 64
    holdout_windows: int = 4  # from the calibration source, for scoring tuning choices (alpha grid, budget)
    eval_windows: int = 16
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 4
    chat_template: bool = False  # render the calibration records with the model's chat template
    sampling_dtype: str = "auto"  # CALIB=synthetic: "auto" (calibration.data.sampling_dtype) or a torch dtype name

    def __post_init__(self):
        for name in ("windows", "holdout_windows", "eval_windows", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise PipelineError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.chat_template and self.source == SYNTHETIC:
            raise PipelineError("--chat-template renders a calibration file or dataset, and CALIB is synthetic: pass "
                                "CALIB=<.txt | .jsonl | hf:dataset> or drop --chat-template")
        if self.sampling_dtype not in SAMPLING_DTYPES:
            raise PipelineError(f"unknown --sampling-dtype '{self.sampling_dtype}': use one of "
                                f"{', '.join(SAMPLING_DTYPES)}")
        if self.sampling_dtype != "auto" and self.source != SYNTHETIC:
            raise PipelineError(f"--sampling-dtype {self.sampling_dtype} applies to CALIB=synthetic, and CALIB is "
                                f"{self.source}: drop --sampling-dtype")


@dataclass(frozen=True)
class Scheme:
    weight_bits: int
    int8_activations: bool  # False: weight-only, activations stay float (FP16 in TensorRT)
    weight_method: str  # "rtn" | "gptq"


SCHEMES = {
    "w8a8": Scheme(8, True, "rtn"),  # SmoothQuant + round-to-nearest INT8 weights
    "w8a8-gptq": Scheme(8, True, "gptq"),  # SmoothQuant first, then GPTQ for the INT8 per-channel weights
    "w4a16-gptq": Scheme(4, False, "gptq"),
    "w4a16-rtn": Scheme(4, False, "rtn"),
    "w3a16-gptq": Scheme(3, False, "gptq"),  # 3-bit codes in INT4 containers
    "w3a16-rtn": Scheme(3, False, "rtn"),
}
ALPHA_MODES = ("auto", "grid")
RANGE_ESTIMATORS = ("max", "percentile", "mse")
WEIGHT_CLIPS = ("none", "mse")  # calibration/weight_clip.py


@dataclass(frozen=True)
class QuantConfig:
    # A number in [0, 1] for every group; "auto": per-group search on calibration inputs; "grid": the global
    # value of alpha_grid with the lowest fake-quant perplexity on the holdout windows.
    alpha: float | str = "auto"
    smooth: bool = True
    include: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    range_estimator: str = "max"
    percentile: float = 99.99
    search_windows: int = 8  # calibration windows seen by the per-group search and the range estimators
    alpha_grid: tuple[float, ...] = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    accuracy_budget: str | None = None  # holdout target "ppl:<percent>" | "kl:<nats>"; None: quantize every linear
    scheme: str = "w8a8"
    group_size: int = 128  # weight-only schemes: input columns per scale; -1 per output channel
    damp: float = 0.01  # GPTQ dampening, a fraction of the Hessian's mean diagonal
    act_order: bool = True  # GPTQ visits columns by decreasing Hessian diagonal (static groups)
    float_target: bool = True  # GPTQ fits each layer to the float model's output, compensating upstream error
    # "mse": per-row INT8 weight clipping weighted by input power (RTN W8A8 only); None: the scheme's default, mse
    # for w8a8 (docs/TUNING.md: +2.62% against +2.79% unclipped on SmolLM2), none elsewhere.
    weight_clip: str | None = None
    # Block-Hadamard rotation of the down_proj inputs (calibration/rotation.py); 0: off; None: the default, blocks
    # of 64 for SmoothQuant W8A8 where 64 divides down_proj's inputs (+1.24% against +2.60% on SmolLM2), else off.
    rotation_block: int | None = None

    @property
    def recipe(self) -> Scheme:
        return SCHEMES[self.scheme]

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise PipelineError(f"unknown QUANT '{self.scheme}': choose one of {', '.join(SCHEMES)}")
        if self.group_size != -1 and self.group_size < 1:
            raise PipelineError(f"group size must be -1 (per channel) or positive (got {self.group_size}): e.g. 128")
        if not 0.0 < self.damp < 1.0:
            raise PipelineError(f"GPTQ damp must be within (0, 1) (got {self.damp}): the default is 0.01")
        if self.accuracy_budget is not None and not self.recipe.int8_activations:
            raise PipelineError(f"--accuracy-budget applies to W8A8 activation groups, not to {self.scheme}: drop it")
        if isinstance(self.alpha, str) and self.alpha not in ALPHA_MODES:
            raise PipelineError(f"ALPHA must be a number within [0, 1], 'auto' or 'grid' (got '{self.alpha}')")
        if not isinstance(self.alpha, str) and not 0.0 <= self.alpha <= 1.0:
            raise PipelineError(f"ALPHA must be within [0, 1] (got {self.alpha}), or 'auto' to search it per layer")
        if self.range_estimator not in RANGE_ESTIMATORS:
            raise PipelineError(f"unknown range estimator '{self.range_estimator}': choose one of "
                                f"{', '.join(RANGE_ESTIMATORS)}")
        if not 0.0 < self.percentile <= 100.0:
            raise PipelineError(f"percentile must be within (0, 100] (got {self.percentile}): try 99.99")
        if self.accuracy_budget is not None:  # normalised ("1" -> "ppl:1"), so equal targets give equal stage keys
            object.__setattr__(self, "accuracy_budget", str(Target.parse(self.accuracy_budget, "--accuracy-budget")))
        if self.weight_clip is None:
            object.__setattr__(self, "weight_clip", "mse" if self.scheme == "w8a8" else "none")
        if self.weight_clip not in WEIGHT_CLIPS:
            raise PipelineError(f"unknown weight clipping '{self.weight_clip}': choose one of {', '.join(WEIGHT_CLIPS)}")
        if self.weight_clip != "none" and self.scheme != "w8a8":
            raise PipelineError(f"--weight-clip {self.weight_clip} applies to the round-to-nearest INT8 weights of "
                                f"QUANT=w8a8, not {self.scheme} (GPTQ chooses its own rounding): drop it")
        if self.search_windows < 1:
            raise PipelineError(f"search_windows must be at least 1 (got {self.search_windows})")
        if self.rotation_block is None and (self.scheme != "w8a8" or not self.smooth):
            object.__setattr__(self, "rotation_block", 0)  # --no-smooth is the naive comparison; GPTQ: not rotated
        if self.rotation_block and not valid_block(self.rotation_block):
            raise PipelineError(f"--rotate-block must be 0 (off) or a power of 4 such as 16, 64 or 256 (so 1/sqrt(block) "
                                f"is exact in FP16), got {self.rotation_block}")
        if self.rotation_block and self.scheme != "w8a8":
            raise PipelineError(f"--rotate-block applies to QUANT=w8a8 (round-to-nearest INT8 weights), not "
                                f"{self.scheme}: drop it")


@dataclass(frozen=True)
class ExportConfig:
    # 21: FP16 scales on DequantizeLinear need >= 19, INT4 blocked DQ needs 21; TensorRT 10.x parses 9-24.
    opset: int = 21
    # Graphs whose weights exceed this keep them in `<graph>.data` beside the graph: above 2 GiB protobuf requires
    # it, and well below that serialising the weights inline costs two more copies of them in memory at save time
    # (SmolLM2's FP32 graph: +2.3 GB peak RSS inline, nothing with external data).
    external_data_threshold: int = EXTERNAL_DATA_BYTES
    # INT8 past/present with calibrated per-tensor scales (exporters/kv_quant.py); off: the cache stays float.
    kv_cache_int8: bool = False
    # Q/DQ on both inputs of Q K^T and P V (SmoothQuant O3; exporters/attention_qdq.py); off: attention stays float.
    int8_attention: bool = False


@dataclass(frozen=True)
class BuildConfig:
    """TensorRT build settings; the three limits shape the prefill and decode profiles (trt_builder/profiles.py)."""

    max_batch: int = 4
    max_input_len: int = 512  # longest prompt prefilled in one step
    max_seq_len: int = 1024  # prompt + generated tokens
    workspace_gib: int = 4
    optimization_level: int = 3
    require_plan: bool = False

    def limits(self):
        """The profile limits, validated (a BuildError names a bad combination)."""
        from trt_builder.profiles import Limits

        return Limits(self.max_batch, self.max_input_len, self.max_seq_len)


@dataclass(frozen=True)
class RunConfig:
    model: str
    out: str
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    # Calibrate and quantize one decoder layer at a time (calibration/layer_stream.py). How the stages run, not
    # what they compute: the same statistics and weights, so it is not part of any stage key.
    low_memory: bool = False

    def __post_init__(self):
        if not self.low_memory:
            return
        whole_model = {"CALIB=synthetic samples text from the whole model": self.calibration.source == SYNTHETIC,
                       "ALPHA=grid scores the whole model's perplexity": self.quant.alpha == "grid",
                       "--accuracy-budget scores the whole model's perplexity": self.quant.accuracy_budget is not None}
        for reason, present in whole_model.items():
            if present:
                raise PipelineError(f"--low-memory runs one layer at a time, but {reason}: drop --low-memory or "
                                    "that option (a calibration text and ALPHA=auto or a number work layer by layer)")

    def to_json(self) -> dict:
        return asdict(self)


def digest(*parts) -> str:
    """Stable hash of JSON-able parts (dataclasses are turned into dicts)."""
    payload = [asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
