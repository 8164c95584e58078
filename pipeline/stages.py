"""The stages of `make engine`, each re-runnable alone from the artifacts the previous ones saved in OUT.

A stage is skipped when its record in OUT/stages/ has the same key (hash of its inputs: model content, config,
upstream keys) and its outputs still hash the same; otherwise it runs and overwrites them atomically.

The graph side (onnx-ir, ONNX, ONNX Runtime, Polygraphy, matplotlib) is imported inside the functions of the
export and verify stages: calibrate and quantize, the stages --low-memory streams, then never load it (55 MB of
resident memory on SmolLM2, a tenth of what --low-memory may use).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from calibration.data import build_windows
from calibration.data_check import check_windows
from calibration.gptq import QuantizedWeight, load_quantized, save_quantized
from calibration.layer_stream import streamed_input_absmax
from calibration.quant import QuantPlan, check_patterns, fake_quantized
from calibration.recipe import Smoothed, apply_rotations, smooth_and_plan
from calibration.smoothing import apply_factors
from calibration.stats import collect_input_absmax, load_stats, quantizable_linears, save_stats
from exporters.gptq_checkpoint import quantization_config, write_checkpoint
from pipeline import PipelineError, models, report, tuning
from pipeline.accuracy_target import Target
from pipeline.budget import fit_budget
from pipeline.artifacts import (TOKENIZER, SavedArrays, StageRecords, atomic_folder, atomic_path, prepare_out,
                                machine, read_json, scratch_folder, versions, write_json)
from pipeline.config import RunConfig, digest
from pipeline.memory import (STREAMED_STAGES, WEIGHT_COPIES, ModelShape, available_bytes, describe_peaks,
                             estimate_peaks, release_memory)
from pipeline.streamed import streamed_quantize
from pipeline.weights import FLOAT_MODULES, clips_weights, integer_weights
from trt_builder import BuildError

if TYPE_CHECKING:
    import onnx_ir as ir

    from exporters.qdq import LinearQuantization

log = logging.getLogger(__name__)

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

    def update_manifest(self, stage: str, status: str, **extra) -> None:
        path = self.path("manifest.json")
        manifest = read_json(path) if path.exists() else {}
        manifest.update({
            "config": self.config.to_json(),
            "model": {"spec": self.source.spec, "kind": self.source.kind, "fingerprint": self.fingerprint()},
            "versions": versions(),
        })
        manifest.setdefault("stages", {})[stage] = {"status": status, "machine": machine(), **extra}
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


def _whole_model_notice(run: Run, stage: str) -> None:
    if run.config.low_memory:
        log.warning("%s: loads the whole model: --low-memory streams calibrate and quantize only (%s needs every "
                    "layer at once)", stage, "tracing the ONNX graph" if stage == "export" else "checking the graphs "
                    "against PyTorch")


def _up_to_date(run: Run, stage: str, key: str) -> bool:
    if run.records.is_current(stage, key):
        log.info("%s: up to date in %s, skipped", stage, run.out)
        return True
    return False


def calibrate(run: Run) -> None:
    cfg = run.config.calibration
    key = digest("calibrate", run.fingerprint(), cfg)
    if _up_to_date(run, "calibrate", key):
        return
    if run.config.low_memory:  # synthetic calibration (which samples from the model) is refused by RunConfig
        model, tokenizer, spec = None, models.load_tokenizer(run.source), models.architecture(run.source)
        config = run.weight_reader().config
    else:
        model, tokenizer, spec = run.model()
        config = model.config
    windows = build_windows(model, tokenizer, cfg.source, cfg.eval_source, cfg.windows, cfg.holdout_windows,
                            cfg.eval_windows, cfg.seq_len, cfg.seed, cfg.chat_template)
    data_check = check_windows(windows.calibration, windows.holdout, windows.evaluation, config.vocab_size)
    for warning in data_check.warnings:
        log.warning("calibration data: %s", warning)
    if model is None:
        with scratch_folder(run.path(STATS).with_suffix(".hidden")) as scratch:
            absmax = streamed_input_absmax(run.weight_reader(), spec, windows.calibration, cfg.batch_size, scratch)
    else:
        absmax = collect_input_absmax(model, quantizable_linears(model, spec), windows.calibration, cfg.batch_size)
    details = {"calibration_origin": windows.calibration_origin, "evaluation_origin": windows.evaluation_origin,
               "windows_sha256": windows.digest(), "seed": cfg.seed, "data_check": data_check.to_json()}
    with atomic_path(run.path(WINDOWS)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, calibration=windows.calibration, holdout=windows.holdout, evaluation=windows.evaluation)
    with atomic_path(run.path(STATS)) as tmp:
        save_stats(absmax, tmp, {"windows_sha256": windows.digest()})
    run.records.complete("calibrate", key, [WINDOWS, STATS], details)
    run.update_manifest("calibrate", "done", **details)
    log.info("calibrate: %d windows x %d tokens (%s), sha256 %s; %d distinct tokens (%.1f%% of the vocabulary), "
             "%d duplicate windows", cfg.windows, cfg.seq_len, windows.calibration_origin, windows.digest()[:16],
             data_check.distinct_tokens, 100 * data_check.vocabulary_coverage, data_check.duplicate_windows)


def quantize(run: Run) -> QuantPlan:
    cfg = run.config.quant
    key = digest("quantize", run.records.key("calibrate"), cfg, WEIGHTS_LAYOUT)
    if _up_to_date(run, "quantize", key):
        return QuantPlan.from_json(read_json(run.path(PLAN)))
    windows = np.load(run.path(WINDOWS))
    outputs = [FACTORS, PLAN, ALPHA_CHOICE, WEIGHTS] + ([BUDGET] if cfg.accuracy_budget is not None else [])
    if run.config.low_memory:  # RunConfig refuses --accuracy-budget with it
        reader, spec = run.weight_reader(), models.architecture(run.source)
        check_patterns(spec.linear_names(reader.config.num_hidden_layers), cfg.include, cfg.skip)
        with scratch_folder(run.path(WEIGHTS).with_suffix(".layers")) as scratch:
            factors, plan, choice, weights = streamed_quantize(reader, spec, cfg, load_stats(run.path(STATS)),
                                                               windows["calibration"],
                                                               run.config.calibration.batch_size, scratch)
    else:
        factors, plan, choice, weights = _quantize_in_memory(run, windows)
    with atomic_path(run.path(FACTORS)) as tmp:
        save_file({k: v.contiguous() for k, v in factors.items()}, str(tmp))
    with atomic_path(run.path(WEIGHTS)) as tmp:
        save_quantized(weights, tmp)
    write_json(run.path(PLAN), plan.to_json())
    write_json(run.path(ALPHA_CHOICE), choice)
    run.records.complete("quantize", key, outputs)
    run.update_manifest("quantize", "done", scheme=cfg.scheme, quantized=len(plan.quantized()),
                        alpha_mode=choice["mode"], range_estimator=cfg.range_estimator)
    report.print_plan(plan)
    return plan


def _quantize_in_memory(run: Run, windows) -> tuple[dict, QuantPlan, dict, dict[str, QuantizedWeight]]:
    """(smoothing factors, plan, alpha choice, integer weights) with the whole model loaded."""
    cfg = run.config.quant
    model, _, spec = run.model()
    check_patterns(list(quantizable_linears(model, spec)), cfg.include, cfg.skip)
    if cfg.recipe.int8_activations:
        smoothed, choice = _smoothquant(run, model, spec, windows)
        factors, plan, power = smoothed.factors, smoothed.plan, smoothed.input_power
    else:
        factors, plan, power, choice = {}, None, None, tuning.weight_only_choice(cfg)
    float_weights = _linear_weights(model, spec) if cfg.accuracy_budget is not None else None
    weights, plan = integer_weights(model, spec, plan, cfg, windows["calibration"],
                                    run.config.calibration.batch_size, _imported_weights(run, model, spec),
                                    input_power=power)
    if cfg.accuracy_budget is not None:
        plan = _fit_budget(run, model, spec, plan, weights, float_weights, windows["holdout"])
        weights = {m.name: weights[m.name] for m in plan.quantized()}
    return factors, plan, choice, weights


def _smoothquant(run: Run, model, spec, windows) -> tuple[Smoothed, dict]:
    """Smooth `model` in place and plan the W8A8 activations: the factors, plan and input power (Smoothed), and
    the alpha choice."""
    cfg = run.config.quant
    absmax = load_stats(run.path(STATS))
    batch = run.config.calibration.batch_size
    alphas, choice = tuning.choose_alphas(model, lambda: run.model()[0], spec, absmax, cfg, windows["calibration"],
                                          windows["holdout"], batch, FLOAT_MODULES)
    smoothed = smooth_and_plan(model, spec, absmax, tuning.recipe_for(cfg, alphas, cfg.alpha),
                               windows["calibration"][: cfg.search_windows], batch, FLOAT_MODULES, clips_weights(cfg))
    return smoothed, choice


def _linear_weights(model, spec) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in quantizable_linears(model, spec).items()}


def _fit_budget(run: Run, model, spec, plan: QuantPlan, weights: dict[str, QuantizedWeight],
                float_weights: dict[str, torch.Tensor], holdout: np.ndarray) -> QuantPlan:
    """Keep activation groups float until the holdout meets --accuracy-budget, judging each candidate with the
    integer weights it would export (GPTQ replaced the model's weights in place: the float ones come back first,
    as a group kept float ships them)."""
    target = Target.parse(run.config.quant.accuracy_budget, "--accuracy-budget")
    with torch.no_grad():
        for name, weight in float_weights.items():
            model.get_submodule(name).weight.copy_(weight)
    plan, evidence = fit_budget(model, spec, plan, holdout, run.config.calibration.batch_size, target, weights)
    if not evidence["met"]:
        log.warning("quantize: accuracy budget %s NOT met on the holdout (%s); the plan keeps %d groups float",
                    target, target.describe(evidence["final"][evidence["judged_by"]]), len(evidence["kept_float"]))
    write_json(run.path(BUDGET), evidence)
    return plan


def _imported_weights(run: Run, model, spec) -> dict[str, QuantizedWeight] | None:
    """A GPTQ checkpoint given as MODEL: its integer weights are exported as they are, never re-quantized."""
    config = models.gptq_config(run.source)
    if config is None:
        return None
    scheme = run.config.quant.recipe
    if scheme.int8_activations or scheme.weight_bits != int(config["bits"]):
        raise PipelineError(f"MODEL is a {config['bits']}-bit GPTQ checkpoint but QUANT={run.config.quant.scheme}: "
                            f"use QUANT=w{config['bits']}a16-gptq to export its weights as they are")
    return models.imported_gptq_weights(run.source, model, spec)[0]


def smoothed_model(run: Run):
    """The float model as the Q/DQ graph holds it: smoothing factors folded, kept-float weight matrices rounded to
    the FP16 the graph stores them in (quantized linears get their integer weights from the quantize stage)."""
    from exporters.qdq import round_kept_float_weights

    model, tokenizer, spec = run.model()
    apply_factors(model, spec, load_file(str(run.path(FACTORS))))
    plan = QuantPlan.from_json(read_json(run.path(PLAN)))
    apply_rotations(model, plan)
    round_kept_float_weights(model, {m.name for m in plan.quantized()})
    return model, spec


def linear_quantizations(plan: QuantPlan, weights: dict[str, QuantizedWeight]) -> list[LinearQuantization]:
    from exporters.qdq import grouped_linear

    return [grouped_linear(e.name, weights[e.name].codes.numpy(), weights[e.name].scales.numpy(),
                           weights[e.name].group_size, e.input_scale, weights[e.name].bits) for e in plan.quantized()]


def save_onnx(graph: ir.Model, path: Path, threshold: int) -> list[str]:
    """Write the graph (with `<name>.data` beside it when its tensors exceed `threshold` bytes, ExportConfig) into
    a temporary folder, check it, then move the data and finally the graph into place, so a crash or a full disk
    never leaves a graph, or data, that is half written. Returns the file names written."""
    import onnx_ir as ir

    from exporters.lint import check_onnx_file

    size = sum(v.const_value.nbytes for v in graph.graph.initializers.values() if v.const_value is not None)
    external = path.name + ".data" if size > threshold else None
    with scratch_folder(path) as tmp:
        ir.save(graph, tmp / path.name, external_data=external)
        check_onnx_file(tmp / path.name)
        if external:
            os.replace(tmp / external, path.with_name(external))
        else:
            path.with_name(path.name + ".data").unlink(missing_ok=True)  # an older export's data
        os.replace(tmp / path.name, path)
    return [path.name] + ([external] if external else [])


def _graph_ranges(run: Run, graph: ir.Model, observe, saved_as: str, what: str) -> dict[str, float]:
    """Ranges observed on the FP32 Q/DQ graph over the first calibration windows, saved in OUT."""
    windows = np.load(run.path(WINDOWS))["calibration"][:GRAPH_RANGE_WINDOWS]
    log.info("export: %s, observing ranges on %d calibration windows", what, len(windows))
    ranges = observe(graph, windows)
    write_json(run.path(saved_as), ranges)
    return ranges


def export(run: Run) -> None:
    from exporters.attention_qdq import quantize_attention
    from exporters.kv_quant import quantize_kv_cache
    from exporters.lint import lint_or_raise
    from exporters.onnx_export import drop_weights, export_model
    from exporters.qdq import insert_qdq, module_node_map, store_float_weights_fp16
    from pipeline.graph_ranges import attention_ranges, kv_cache_scales

    cfg = run.config.export
    # The graph list and layout are part of the key: a version that writes other graphs re-exports an older OUT.
    key = digest("export", run.records.key("quantize"), cfg, [REFERENCE, REFERENCE_FP16, QUANTIZED, QUANTIZED_FP16],
                 GRAPH_LAYOUT)
    if _up_to_date(run, "export", key):
        return
    plan = QuantPlan.from_json(read_json(run.path(PLAN)))
    _whole_model_notice(run, "export")
    model, tokenizer, spec = run.model()
    with atomic_folder(run.path(TOKENIZER)) as tmp:  # a service loading OUT needs nothing else
        tokenizer.save_pretrained(tmp)
    names = list(quantizable_linears(model, spec))
    outputs = [f"{TOKENIZER}/{p.name}" for p in sorted(run.path(TOKENIZER).iterdir())]
    quant = run.config.quant
    if not quant.recipe.int8_activations:
        log.info("export: %s/ (Hugging Face GPTQ layout of the same integer weights)", CHECKPOINT)
        write_checkpoint(run.path(CHECKPOINT), model, tokenizer, load_quantized(run.path(WEIGHTS)),
                         quantization_config(quant.recipe.weight_bits, quant.group_size, quant.act_order, quant.damp))
        outputs += [f"{CHECKPOINT}/{p.name}" for p in sorted(run.path(CHECKPOINT).iterdir())]
    for dtype, name in ((torch.float32, REFERENCE), (torch.float16, REFERENCE_FP16)):
        log.info("export: %s (reference %s decoder graph with KV cache)", name, dtype)
        model.to(dtype)  # in place: the FP16 graph comes after the FP32 one is written, so one copy of the weights
        outputs += save_onnx(export_model(model, dtype, cfg.opset, names), run.path(name), cfg.external_data_threshold)
        release_memory()
    del model
    model, _ = smoothed_model(run)
    linears = linear_quantizations(plan, load_quantized(run.path(WEIGHTS)))
    integer = [lq.module for lq in linears]
    drop_weights(model, integer)  # the Q/DQ graphs take these from their integer codes
    kv_scales_found = attention_found = None
    for dtype, scale_dtype, name in ((torch.float32, np.float32, QUANTIZED), (torch.float16, np.float16, QUANTIZED_FP16)):
        log.info("export: %s (%s graph, %d quantized linears)", name, dtype, len(linears))
        model.to(dtype)  # in place, as for the reference graphs
        graph = export_model(model, dtype, cfg.opset, names, weightless=integer)
        insert_qdq(graph, linears, scale_dtype)
        if dtype == torch.float32:
            log.info("export: %s stores its float weight matrices in FP16 (%.1f MB saved)", name,
                     store_float_weights_fp16(graph) / 1e6)
        if cfg.kv_cache_int8:
            kv_scales_found = kv_scales_found or _graph_ranges(run, graph, kv_cache_scales, KV_SCALES,
                                                               "INT8 KV cache")
            quantize_kv_cache(graph, kv_scales_found, scale_dtype)
        if cfg.int8_attention:
            attention_found = attention_found or _graph_ranges(run, graph, attention_ranges, ATTENTION_RANGES,
                                                               "INT8 attention matmuls")
            quantize_attention(graph, attention_found, scale_dtype)
        lint_or_raise(graph, name)
        if name == QUANTIZED:
            write_json(run.path(MODULE_MAP), module_node_map(graph))
        outputs += save_onnx(graph, run.path(name), cfg.external_data_threshold)
        del graph
        release_memory()
    if cfg.kv_cache_int8:
        outputs.append(KV_SCALES)
    if cfg.int8_attention:
        outputs.append(ATTENTION_RANGES)
    run.records.complete("export", key, outputs + [MODULE_MAP])
    run.update_manifest("export", "done", opset=cfg.opset, files=outputs + [MODULE_MAP])


def build(run: Run) -> None:
    from trt_builder.build import BuildSettings, build_plan, write_manifest
    from trt_builder.compat import unavailable_reason

    cfg = run.config.build
    reason = unavailable_reason()
    if reason is not None:
        if cfg.require_plan:
            raise BuildError(f"REQUIRE_PLAN=1 but the TensorRT plan cannot be built here: {reason}")
        log.warning("build: TensorRT plan SKIPPED (not built): %s; the verified ONNX is in %s", reason, run.out)
        run.update_manifest("build", "skipped", reason=reason)
        return
    key = digest("build", run.records.key("export"), cfg)
    if _up_to_date(run, "build", key):
        return
    settings = BuildSettings(cfg.limits(), cfg.workspace_gib << 30, cfg.optimization_level)
    manifest = build_plan(run.path(QUANTIZED_FP16), run.path(ENGINE), settings, run.path("timing.cache"))
    write_manifest(manifest, run.path(ENGINE + ".json"))
    log.info("build: %s, the float plan verify holds the INT8 one against", REFERENCE_ENGINE)
    build_plan(run.path(REFERENCE_FP16), run.path(REFERENCE_ENGINE), settings, run.path("timing.cache"))
    run.records.complete("build", key, [ENGINE, ENGINE + ".json", REFERENCE_ENGINE])
    run.update_manifest("build", "done", **manifest)


def generation_check(side: TorchSide, reference: list[list[int]], quantized: list[list[int]]) -> dict:
    """Greedy tokens of PyTorch's generate() (made before the model was freed) vs the reference graph's KV-cache
    loop (exactness of the export), and the Q/DQ graph's tokens vs the reference's (what quantization changes in
    generated text)."""
    from pipeline import verify

    decode = side.tokenizer.decode
    return {"new_tokens": verify.GENERATED_TOKENS, "prompts": list(verify.GENERATION_PROMPTS),
            "reference_onnx_vs_pytorch_generate": verify.generation_agreement(side.greedy_tokens, reference),
            "quantized_vs_reference_onnx": verify.generation_agreement(reference, quantized),
            "samples": [{"prompt": text, "reference": decode(r, skip_special_tokens=True),
                         "quantized": decode(q, skip_special_tokens=True)}
                        for text, r, q in zip(verify.GENERATION_PROMPTS, reference, quantized)]}


def layerwise_inputs(run: Run, model, plan: QuantPlan, folder: Path) -> tuple[SavedArrays, dict[str, np.ndarray]]:
    """What the layer-wise diff needs besides the graphs (`model`: the smoothed float model): each quantized
    linear's float weight in MatMul layout, saved in `folder` and read back one at a time (the whole model can then
    be freed), and the smoothing factor on the output rows of those that produce another linear's input."""
    float_weights = SavedArrays(folder)
    for m in plan.quantized():
        float_weights[m.name] = model.get_submodule(m.name).weight.detach().numpy().T
    factors = {k: v.numpy() for k, v in load_file(str(run.path(FACTORS))).items() if k in float_weights}
    return float_weights, factors


def layerwise_check(run: Run, float_weights: SavedArrays, factors: dict[str, np.ndarray],
                    windows: np.ndarray) -> dict:
    """Layer-wise diff of the reference and Q/DQ graphs (inputs: layerwise_inputs), saved in OUT with its channel
    statistics."""
    from pipeline.layerwise import layerwise_diff

    result, channels = layerwise_diff(run.path(REFERENCE), run.path(QUANTIZED), windows, float_weights, factors)
    with atomic_path(run.path(LAYERWISE_CHANNELS)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **channels)
    write_json(run.path(LAYERWISE), result)
    return result


@dataclass
class TorchSide:
    """What verify computes with the PyTorch models, saved before any ONNX Runtime session opens, so that a model
    and a graph's session never share memory: the logits of the faithfulness windows (float<i>, and simulated<i>
    from the fake-quant model), the layer-wise diff's inputs, the simulation's noise floor, its comparison with
    the Q/DQ graph layer by layer (pipeline/layer_faithfulness.py), generate()'s tokens."""

    logits: SavedArrays
    layerwise: tuple[SavedArrays, dict[str, np.ndarray]]
    noise_floor: dict
    layer_by_layer: dict
    tokenizer: object
    prompts: list[list[int]]
    greedy_tokens: list[list[int]]
    stops: tuple[int, ...]


def pytorch_side(run: Run, plan: QuantPlan, windows: np.ndarray, folder: Path, graph_states: SavedArrays,
                 layers: list[str]) -> TorchSide:
    """The float model, then the smoothed one as the fake-quant simulation, one at a time; arrays kept in `folder`.
    graph_states: the Q/DQ graph's, for the layer-by-layer comparison of `layers` (layer_faithfulness.simulate)."""
    from exporters.onnx_export import drop_weights
    from pipeline import layer_faithfulness, verify

    logits = SavedArrays(folder / "logits")
    model, tokenizer, _ = run.model()
    verify.save_torch_logits(model, windows, logits, "float", "PyTorch FP32 logits")
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in verify.GENERATION_PROMPTS]
    greedy_tokens = verify.torch_greedy(model, prompts, verify.GENERATED_TOKENS)
    stops = verify.stop_tokens(model)
    del model
    release_memory()
    model, _ = smoothed_model(run)
    layerwise = layerwise_inputs(run, model, plan, folder / "weights")  # the float weights, before they are replaced
    # The simulation computes from the integer codes: the float weights they replace (SmolLM2: 425 MB) go first.
    drop_weights(model, [m.name for m in plan.quantized()])
    with fake_quantized(model, plan, load_quantized(run.path(WEIGHTS))):
        noise_floor = verify.save_simulation_logits(model, windows, logits, "simulated")
        layer_by_layer = layer_faithfulness.simulate(model, layers, windows[:LAYER_FAITHFULNESS_WINDOWS], graph_states)
    graph_states.clear()
    return TorchSide(logits, layerwise, noise_floor, layer_by_layer, tokenizer, prompts, greedy_tokens, stops)


def verify_stage(run: Run) -> dict:
    from exporters.probes import layer_of
    from pipeline import layer_faithfulness, report_files, verify

    build = read_json(run.path("manifest.json"))["stages"].get("build") or {}
    key = digest("verify", run.records.key("export"), run.records.details("calibrate"),
                 {k: v for k, v in build.items() if k != "machine"},  # a plan built or not, not where build ran
                 VERIFY_CHECKS)
    if _up_to_date(run, "verify", key):
        return read_json(run.path(VERIFICATION))
    plan = QuantPlan.from_json(read_json(run.path(PLAN)))
    evaluation = np.load(run.path(WINDOWS))["evaluation"]
    faithful_windows = evaluation[:FAITHFULNESS_WINDOWS]
    _whole_model_notice(run, "verify")
    # Every decoder layer, whether or not it has a quantized linear.
    layers = list(dict.fromkeys(layer_of(m.name) for m in plan.modules if m.status != "float"))
    with scratch_folder(run.path(VERIFICATION).with_suffix(".arrays")) as folder:
        graph_states = SavedArrays(folder / "graph_states")  # the Q/DQ graph's, before any PyTorch model loads
        layer_faithfulness.save_graph_states(run.path(QUANTIZED), layers, evaluation[:LAYER_FAITHFULNESS_WINDOWS],
                                             graph_states)
        side = pytorch_side(run, plan, faithful_windows, folder, graph_states, layers)
        release_memory()  # the models are gone before the first session opens
        graph_outputs = SavedArrays(folder / "graphs")  # the reference's logits while the Q/DQ graph runs
        # Each FP32 graph runs once, in one session, for all its checks: PyTorch on the first windows, accuracy on
        # all of them, the precision floors' FP32 side on the first few, and the greedy generation loop.
        with verify.OpenGraph(run.path(REFERENCE)) as reference:
            verify.save_reference_logits(reference, evaluation, graph_outputs, f"{REFERENCE} (vs PyTorch; accuracy)")
            reference_tokens = verify.onnx_greedy(reference, side.prompts, verify.GENERATED_TOKENS, side.stops)
        faithful = len(faithful_windows)
        reference_vs_torch = verify.faithfulness(side.logits.numbered("float", faithful),
                                                 graph_outputs.numbered("reference", faithful))
        with verify.OpenGraph(run.path(QUANTIZED)) as quantized:
            quantized_vs_sim, accuracy = verify.check_quantized(quantized, evaluation,
                                                                side.logits.numbered("simulated", faithful),
                                                                graph_outputs, FP16_GRAPH_WINDOWS,
                                                                f"{QUANTIZED} (vs PyTorch fake-quant; accuracy)")
            quantized_tokens = verify.onnx_greedy(quantized, side.prompts, verify.GENERATED_TOKENS, side.stops)
        quantized_vs_sim["noise_floor"] = side.noise_floor
        quantized_vs_sim["layer_by_layer"] = side.layer_by_layer
        side.logits.clear()
        generation = generation_check(side, reference_tokens, quantized_tokens)
        floors = verify.precision_floors(run.path(REFERENCE_FP16), run.path(QUANTIZED_FP16),
                                         evaluation[:FP16_GRAPH_WINDOWS], graph_outputs)
        layerwise_check(run, *side.layerwise, evaluation[:LAYERWISE_WINDOWS])
    manifest = read_json(run.path("manifest.json"))
    if manifest["stages"].get("build", {}).get("status") == "done":  # same code path as ONNX Runtime's, via Polygraphy
        for measured, engine, graph in (("tensorrt_plan_vs_onnxruntime", ENGINE, QUANTIZED_FP16),
                                        ("tensorrt_fp16_plan_vs_onnxruntime", REFERENCE_ENGINE, REFERENCE_FP16)):
            windows = evaluation[:FP16_GRAPH_WINDOWS, : run.config.build.max_input_len]  # the prefill profile's limit
            floors[measured] = verify.compare_plan(run.path(engine), run.path(graph), windows, f"{engine} vs ONNX Runtime")
    budget = read_json(run.path(BUDGET)) if run.config.quant.accuracy_budget is not None else None
    tuning_summary = report.tuning_summary(plan, read_json(run.path(ALPHA_CHOICE)), budget)
    result = report.build_report(run.config, manifest, plan, accuracy, reference_vs_torch, quantized_vs_sim, floors,
                                 tuning_summary, generation)
    write_json(run.path(VERIFICATION), result)
    run.records.complete("verify", key, [VERIFICATION, LAYERWISE, LAYERWISE_CHANNELS])
    run.update_manifest("verify", "done", perplexity_delta_percent=accuracy["perplexity_delta_percent"])
    report.print_headline(result, report_files.write_reports(run.out))
    return result


STAGES = {"calibrate": calibrate, "quantize": quantize, "export": export, "build": build, "verify": verify_stage}
