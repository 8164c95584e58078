"""One run of the pipeline on one OUT folder: its configuration, the names of what it saves there, its stage
records and manifest, and the model it is about. Without torch: verify's graph checks run in a process that
never imports it (pipeline/verify_stage.py); the stages that load the model import it themselves.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import models
from pipeline.artifacts import StageRecords, machine, prepare_out, read_json, versions, write_json
from pipeline.config import RunConfig
from pipeline.memory import STREAMED_STAGES, WEIGHT_COPIES, ModelShape, available_bytes, describe_peaks, estimate_peaks

log = logging.getLogger(__name__)

# The function of each stage, as module:function, imported when the stage runs: verify's module never imports torch
# (its PyTorch side runs in a process of its own).
STAGE_FUNCTIONS = {"calibrate": "pipeline.stages:calibrate", "quantize": "pipeline.stages:quantize",
                   "export": "pipeline.stages:export", "build": "pipeline.stages:build",
                   "verify": "pipeline.verify_stage:verify_stage"}

WINDOWS = "windows.npz"
STATS = "calibration_stats.safetensors"
FACTORS = "smoothing_factors.safetensors"
WEIGHTS = "quantized_weights.safetensors"  # integer codes + scales of every quantized linear
PLAN = "quant_plan.json"
REFERENCE = "reference.onnx"
REFERENCE_FP16 = "reference.fp16.onnx"  # the float floor: what FP16 arithmetic alone changes
QUANTIZED = "quantized.onnx"  # FP32 graph + INT8 Q/DQ, for ONNX Runtime on CPU
QUANTIZED_FP16 = "quantized.fp16.onnx"  # FP16 graph + INT8 Q/DQ with FP16 scales, for TensorRT
MODULE_MAP = "module_map.json"
CHECKPOINT = "gptq_checkpoint"  # weight-only schemes: the Hugging Face GPTQ layout of the same integer weights
ENGINE = "model.plan"
REFERENCE_ENGINE = "reference.fp16.plan"  # FP16 plan of the float model: TensorRT's own float floor
ALPHA_CHOICE = "alpha_choice.json"
BUDGET = "accuracy_budget.json"
KV_SCALES = "kv_cache_scales.json"
ATTENTION_RANGES = "attention_ranges.json"
GRAPH_LAYOUT = "float weight matrices stored FP16 in quantized.onnx"
WEIGHTS_LAYOUT = "bits and group sizes as one sorted JSON metadata entry"  # in the key: older OUTs re-quantize
VERIFICATION = "verification.json"  # everything verify measured; the report adds analysis of saved artifacts
VERIFY_CHECKS = "layer-by-layer faithfulness"  # in the key: an older OUT's verification re-runs
LAYERWISE = "layerwise.json"
LAYERWISE_CHANNELS = "layerwise_channels.npz"  # per-module channel absmax before/after smoothing
GRAPH_RANGE_WINDOWS = 8  # calibration windows the INT8 KV cache and attention ranges are observed on
FAITHFULNESS_WINDOWS = 4
FP16_GRAPH_WINDOWS = 2
LAYERWISE_WINDOWS = 2
LAYER_FAITHFULNESS_WINDOWS = 2  # the first faithfulness windows (FAITHFULNESS_WINDOWS)


class Run:
    def __init__(self, config: RunConfig):
        self.config = config
        self.out = prepare_out(Path(config.out))
        self.records = StageRecords(self.out)
        self.source = models.resolve(config.model)
        self._fingerprint: str | None = None
        self._reader = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.source.fingerprint()
        return self._fingerprint

    def model(self):
        """A freshly loaded FP32 model (stages mutate it by smoothing), its tokenizer and architecture spec.
        Loaded again on every call rather than copied from a kept one: safetensors weights (the GGUF cache's, a
        Hugging Face folder's) are memory-mapped, so a reload takes ~0.3 s on SmolLM2 where a deep copy touches
        both copies (+1 GB of RSS measured) and a kept model would sit beside every stage's working copy."""
        return models.load(self.source)

    def weight_reader(self):
        """--low-memory: the checkpoint read one module at a time, never the whole model."""
        if self._reader is None:
            self._reader = models.weight_reader(self.source)
        return self._reader

    def path(self, name: str) -> Path:
        return self.out / name

    def update_manifest(self, stage: str, status: str, ran_on: dict | None = None, **extra) -> None:
        """`ran_on`: the machine record (artifacts.machine) of the process that ran the stage's PyTorch work, where
        that was not this one (verify's PyTorch side)."""
        path = self.path("manifest.json")
        manifest = read_json(path) if path.exists() else {}
        manifest.update({
            "config": self.config.to_json(),
            "model": {"spec": self.source.spec, "kind": self.source.kind, "fingerprint": self.fingerprint()},
            "versions": versions(),
        })
        manifest.setdefault("stages", {})[stage] = {"status": status, "machine": ran_on or machine(), **extra}
        write_json(path, manifest)


def announce_memory(run: Run, stages: tuple[str, ...]) -> None:
    """Before any weight is read: the estimated peak of the stages about to run, and a warning when it exceeds
    the memory available now (build has no estimate: it never loads the model, so it never reads its config)."""
    if not set(stages) & set(WEIGHT_COPIES):
        return
    shape = ModelShape.of_model(run.source)
    peaks = {s: v for s, v in estimate_peaks(shape, run.config).items() if s in stages}
    log.info(describe_peaks(shape, peaks, run.config.low_memory))
    available, (stage, peak) = available_bytes(), max(peaks.items(), key=lambda kv: kv[1])
    if available is not None and peak > available:
        advice = ("try --low-memory" if stage in STREAMED_STAGES and not run.config.low_memory else
                  f"{stage} holds the whole model: run it on a machine with more memory")
        log.warning("memory: %s is estimated to peak at %.1f GB but %.1f GB is available: %s", stage, peak / 1e9,
                    available / 1e9, advice)


def whole_model_notice(run: Run, stage: str) -> None:
    if run.config.low_memory:
        log.warning("%s: loads the whole model: --low-memory streams calibrate and quantize only (%s needs every "
                    "layer at once)", stage, "tracing the ONNX graph" if stage == "export" else "checking the graphs "
                    "against PyTorch")


def up_to_date(run: Run, stage: str, key: str) -> bool:
    if run.records.is_current(stage, key):
        log.info("%s: up to date in %s, skipped", stage, run.out)
        return True
    return False
