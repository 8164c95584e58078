"""The stages of `make engine` that load the model (calibrate, quantize, export) and build, each re-runnable alone
from the artifacts the previous ones saved in OUT; verify is pipeline/verify_stage.py, the run and its file names
pipeline/run.py.

A stage is skipped when its record in OUT/stages/ has the same key (hash of its inputs: model content, config,
upstream keys) and its outputs still hash the same; otherwise it runs and overwrites them atomically.

The graph side (onnx-ir, ONNX, ONNX Runtime, Polygraphy, matplotlib) is imported inside the export stage's
functions: calibrate and quantize, the stages --low-memory streams, then never load it (55 MB of
resident memory on SmolLM2, a tenth of what --low-memory may use).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from calibration.data import build_windows, sampling_dtype
from calibration.data_check import check_windows
from calibration.gptq import QuantizedWeight, load_quantized, save_quantized
from calibration.layer_stream import streamed_input_absmax
from calibration.plan import QuantPlan
from calibration.quant import check_patterns
from calibration.recipe import Smoothed, apply_rotations, smooth_and_plan
from calibration.smoothing import apply_factors
from calibration.sources import SYNTHETIC
from calibration.stats import collect_input_absmax, load_stats, quantizable_linears, save_stats
from exporters.gptq_checkpoint import quantization_config, write_checkpoint
from pipeline import PipelineError, models, report, tuning
from pipeline.accuracy_target import Target
from pipeline.budget import fit_budget
from pipeline.artifacts import TOKENIZER, atomic_folder, atomic_path, read_json, scratch_folder, write_json
from pipeline.config import digest
from pipeline.memory import release_memory
from pipeline.run import (ALPHA_CHOICE, ATTENTION_RANGES, BUDGET, CHECKPOINT, ENGINE, FACTORS, GRAPH_LAYOUT,
                          GRAPH_RANGE_WINDOWS, KV_SCALES, MODULE_MAP, PLAN, QUANTIZED, QUANTIZED_FP16, REFERENCE,
                          REFERENCE_ENGINE, REFERENCE_FP16, STATS, WEIGHTS, WEIGHTS_LAYOUT, WINDOWS, Run, up_to_date,
                          whole_model_notice)
from pipeline.streamed import streamed_quantize
from pipeline.weights import FLOAT_MODULES, clips_weights, integer_weights
from trt_builder import BuildError

if TYPE_CHECKING:
    import onnx_ir as ir

    from exporters.qdq import LinearQuantization

log = logging.getLogger(__name__)

def calibrate(run: Run) -> None:
    cfg = run.config.calibration
    # The sampler's dtype, not "auto": sampled on another CPU, synthetic windows are other windows.
    sampler = sampling_dtype(cfg.sampling_dtype) if cfg.source == SYNTHETIC else None
    key = digest("calibrate", run.fingerprint(), cfg, str(sampler) if sampler is not None else None)
    if up_to_date(run, "calibrate", key):
        return
    windows = _windows(run, sampler)
    data_check = check_windows(windows.calibration, windows.holdout, windows.evaluation,
                               models.model_config(run.source).vocab_size)
    for warning in data_check.warnings:
        log.warning("calibration data: %s", warning)
    if run.config.low_memory:  # synthetic calibration (which samples from the model) is refused by RunConfig
        with scratch_folder(run.path(STATS).with_suffix(".hidden")) as scratch:
            absmax = streamed_input_absmax(run.weight_reader(), models.architecture(run.source), windows.calibration,
                                           cfg.batch_size, scratch)
    else:
        model, _, spec = run.model()
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


def _windows(run: Run, sampler_dtype: torch.dtype | None):
    """The calibration, holdout and evaluation windows. Synthetic ones (`sampler_dtype` given) are sampled from a
    model loaded in that dtype for that alone, and freed before the FP32 model of the statistics loads."""
    cfg = run.config.calibration
    sampler, tokenizer, _ = (models.load(run.source, sampler_dtype) if sampler_dtype is not None
                             else (None, models.load_tokenizer(run.source), None))
    windows = build_windows(sampler, tokenizer, cfg.source, cfg.eval_source, cfg.windows, cfg.holdout_windows,
                            cfg.eval_windows, cfg.seq_len, cfg.seed, cfg.chat_template)
    del sampler
    release_memory()
    return windows


def quantize(run: Run) -> QuantPlan:
    cfg = run.config.quant
    key = digest("quantize", run.records.key("calibrate"), cfg, WEIGHTS_LAYOUT)
    if up_to_date(run, "quantize", key):
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


def smoothed_model(run: Run, drop: Collection[str] = (), before_drop: Callable[[torch.nn.Module], None] | None = None):
    """The float model as the Q/DQ graph holds it: smoothing factors folded, kept-float weight matrices rounded to
    the FP16 the graph stores them in (quantized linears get their integer weights from the quantize stage).
    `drop`: linears whose float weights are freed (onnx_export.drop_weights) before the rounding, which then works
    on the kept weights' own copies: export's peak was the rounding and those copies beside the whole mapped model
    (SmolLM2: 1,306 MiB), and so was verify's PyTorch side's (1,201-1,306 MB). `before_drop(model)` runs first, on
    the smoothed float weights (the simulation saves them for the layer-wise diff)."""
    from exporters.onnx_export import drop_weights
    from exporters.qdq import round_kept_float_weights

    model, tokenizer, spec = run.model()
    apply_factors(model, spec, load_file(str(run.path(FACTORS))))
    plan = QuantPlan.from_json(read_json(run.path(PLAN)))
    apply_rotations(model, plan)
    if before_drop is not None:
        before_drop(model)
    if drop:
        drop_weights(model, drop)
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
    from exporters.onnx_export import export_model
    from exporters.qdq import insert_qdq, module_node_map, store_float_weights_fp16
    from pipeline.graph_ranges import attention_ranges, kv_cache_scales

    cfg = run.config.export
    # The graph list and layout are part of the key: a version that writes other graphs re-exports an older OUT.
    key = digest("export", run.records.key("quantize"), cfg, [REFERENCE, REFERENCE_FP16, QUANTIZED, QUANTIZED_FP16],
                 GRAPH_LAYOUT)
    if up_to_date(run, "export", key):
        return
    plan = QuantPlan.from_json(read_json(run.path(PLAN)))
    whole_model_notice(run, "export")
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
    release_memory()  # the FP16 weights just freed (~0.27 GB) stay in glibc's heap; the smoothed model maps new pages
    integer = [m.name for m in plan.quantized()]
    model, _ = smoothed_model(run, drop=integer)  # the Q/DQ graphs take these from their integer codes
    linears = linear_quantizations(plan, load_quantized(run.path(WEIGHTS)))
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
    if up_to_date(run, "build", key):
        return
    settings = BuildSettings(cfg.limits(), cfg.workspace_gib << 30, cfg.optimization_level)
    manifest = build_plan(run.path(QUANTIZED_FP16), run.path(ENGINE), settings, run.path("timing.cache"))
    write_manifest(manifest, run.path(ENGINE + ".json"))
    log.info("build: %s, the float plan verify holds the INT8 one against", REFERENCE_ENGINE)
    build_plan(run.path(REFERENCE_FP16), run.path(REFERENCE_ENGINE), settings, run.path("timing.cache"))
    run.records.complete("build", key, [ENGINE, ENGINE + ".json", REFERENCE_ENGINE])
    run.update_manifest("build", "done", **manifest)

