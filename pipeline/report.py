"""What verify measured, on what, and what could not run (verification.json, the core of report.json), plus the
printed plan and headline; report_files.py composes and renders the full report."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from calibration.plan import QuantPlan
from pipeline.config import RunConfig

FAITHFUL_COSINE = 0.999  # the Q/DQ graph must reproduce the PyTorch simulation of the same recipe
# A weight-only graph is a continuous function of its input (no activation rounding), so ONNX Runtime must match
# the dequantized PyTorch model to float precision.
FAITHFUL_COSINE_WEIGHT_ONLY = 0.9999


FAITHFUL_WORDS = {True: "yes", False: "NO", None: "not judged (INT8 KV cache or INT8 attention matmuls: the PyTorch "
                                                   "simulation keeps them float, so the difference includes their "
                                                   "rounding)"}


def faithful_cosine(weight_only: bool) -> float:
    return FAITHFUL_COSINE_WEIGHT_ONLY if weight_only else FAITHFUL_COSINE


def faithful_snr_db(cosine: float) -> float:
    """The SNR a cosine of `cosine` allows when the error is orthogonal to the signal (1 - cos ~ |e|^2 / 2|x|^2 for
    a small error e): 27.0 dB at 0.999, 37.0 dB at 0.9999. Held beside the cosine, it catches what a cosine is blind
    to, an error along the signal: a wrong scale on a whole GEMM."""
    return -10.0 * math.log10(2.0 * (1.0 - cosine))


def faithful(quantized_vs_sim: dict, weight_only: bool = False) -> bool:
    """Both, at the cosine threshold (0.999 W8A8, 0.9999 weight-only):
    - layer by layer (pipeline/layer_faithfulness.py): every decoder layer's update and the logits, each simulated
      layer fed the graph's input to it, with an SNR of at least faithful_snr_db(threshold) besides;
    - end to end: cosine on every window; for W8A8 a deviation no larger than twice the simulation's own noise floor
      (SDPA vs eager attention in PyTorch) also passes, since a flipped rounding travels through a discontinuous
      model and no implementation can match it end to end more closely than that. A weight-only graph is
      continuous: no allowance."""
    threshold = faithful_cosine(weight_only)
    by_layer, snr_floor = quantized_vs_sim["layer_by_layer"], faithful_snr_db(threshold)
    layer_by_layer = all(cosine >= threshold and (snr is None or snr >= snr_floor) for cosine, snr in (
        (by_layer["update_cosine_min"], by_layer["update_snr_db_min"]),
        (by_layer["logits"]["cosine_min"], by_layer["logits"]["snr_db"])))
    end_to_end = quantized_vs_sim["cosine_min"] >= threshold
    if not weight_only:
        deviation = 1.0 - quantized_vs_sim["cosine_mean"]
        end_to_end = end_to_end or deviation <= 2.0 * (1.0 - quantized_vs_sim["noise_floor"]["cosine_mean"])
    return layer_by_layer and end_to_end


def tuning_summary(plan: QuantPlan, alpha_choice: dict, budget: dict | None) -> dict:
    alphas = [m.alpha for m in plan.modules if m.alpha is not None]
    summary = {"alpha_mode": alpha_choice.get("mode"), "range_estimator": plan.range_estimator,
               "alpha_min": min(alphas, default=None), "alpha_max": max(alphas, default=None),
               "alpha_mean": sum(alphas) / len(alphas) if alphas else None}
    if "holdout_perplexity" in alpha_choice:
        summary["grid_holdout_perplexity"] = alpha_choice["holdout_perplexity"]
    if budget is not None:
        summary["accuracy_budget"] = {k: budget[k] for k in ("target", "holdout_windows", "reference_perplexity",
                                                             "all_quantized", "final", "kept_float", "met")}
    return summary


def weights_summary(plan: QuantPlan, asked_damp: float) -> dict:
    """How the integer weights were made; for GPTQ, its layer output error next to RTN's on the same inputs."""
    quantized = plan.quantized()
    errors = [(m.output_error, m.rtn_output_error) for m in quantized if m.output_error is not None]
    summary = {"bits": sorted({m.weight_bits for m in quantized if m.weight_bits}),
               "methods": sorted({m.weight_method for m in quantized if m.weight_method}),
               "group_sizes": sorted({m.group_size for m in quantized if m.group_size})}
    if errors:
        summary.update(output_error_mean=sum(e for e, _ in errors) / len(errors),
                       rtn_output_error_mean=sum(r for _, r in errors) / len(errors),
                       linears_better_than_rtn=sum(e < r for e, r in errors), linears_measured=len(errors),
                       damping_raised=[m.name for m in quantized if m.damp is not None and m.damp > asked_damp])
    return summary


TOLERANCE_METRICS = ("max_abs_error", "mean_abs_error", "cosine_min", "snr_db", "kl_mean", "kl_max", "top1_agreement")


def tolerances(floors: dict) -> dict:
    """Comparison tolerances, taken from the measured precision floors (pipeline.verify.precision_floors): a float
    implementation may deviate from the FP32 reference as much as FP16 arithmetic does; a W8A8 one as much as the
    same Q/DQ graph does between FP32 and FP16 arithmetic."""
    return {kind: {k: floors[kind][k] for k in TOLERANCE_METRICS} for kind in ("float", "quantized")}


def within(measured: dict, tolerance: dict) -> bool:
    """Every error metric no worse than the tolerance's (an exact match has snr_db None: no error at all)."""
    snr_ok = measured["snr_db"] is None or (tolerance["snr_db"] is not None and measured["snr_db"] >= tolerance["snr_db"])
    return (snr_ok and measured["max_abs_error"] <= tolerance["max_abs_error"]
            and measured["kl_mean"] <= tolerance["kl_mean"] and measured["cosine_min"] >= tolerance["cosine_min"])


def _plan_check(floors: dict, key: str, tolerance: dict) -> dict | None:
    measured = floors.get(key)
    return None if measured is None else {**measured, "within_tolerance": within(measured, tolerance)}


def build_report(config: RunConfig, manifest: dict, plan: QuantPlan, accuracy: dict, reference_vs_torch: dict,
                 quantized_vs_sim: dict, floors: dict, tuning: dict, generation: dict) -> dict:
    weight_only = not config.quant.recipe.int8_activations
    stages = manifest.get("stages", {})
    calib = stages.get("calibrate", {})
    build = stages.get("build", {"status": "not run"})
    quantized = plan.quantized()
    limits = tolerances(floors)
    return {
        "model": config.model,
        "scheme": config.quant.scheme,
        "kv_cache": "int8" if config.export.kv_cache_int8 else "float",
        "attention_matmuls": "int8" if config.export.int8_attention else "float",
        "recipe": plan.recipe,
        "alpha": plan.alpha,
        "smoothing": config.quant.smooth and not weight_only,
        "tuning": tuning,
        "weights": weights_summary(plan, config.quant.damp),
        "modules": {"quantized": len(quantized), "skipped": sum(m.status == "skipped" for m in plan.modules),
                    "float": sum(m.status == "float" for m in plan.modules)},
        "calibration": {"origin": calib.get("calibration_origin"), "windows": config.calibration.windows,
                        "seq_len": config.calibration.seq_len, "seed": calib.get("seed"),
                        "windows_sha256": calib.get("windows_sha256")},
        "evaluation": {"origin": calib.get("evaluation_origin"), "windows": accuracy["windows"],
                       "predicted_tokens": accuracy["predicted_tokens"]},
        "accuracy": {
            "runtime": "ONNX Runtime CPU (Polygraphy OnnxrtRunner)",
            "perplexity_reference_fp32_onnx": accuracy["perplexity_reference"],
            "perplexity_quantized_fp32_onnx": accuracy["perplexity_candidate"],
            "perplexity_delta_percent": accuracy["perplexity_delta_percent"],
            "next_token_top1_agreement": accuracy["top1_agreement"],
            "logits_cosine_mean": accuracy["cosine_mean"],
            "logits_cosine_min": accuracy["cosine_min"],
            "logits_max_abs_error": accuracy["max_abs_error"],
            "logits_mean_abs_error": accuracy["mean_abs_error"],
            "logits_snr_db": accuracy["snr_db"],
            "next_token_top5_agreement": accuracy["top5_agreement"],
            "next_token_kl_mean": accuracy["kl_mean"],
            "next_token_kl_max": accuracy["kl_max"],
        },
        "precision_floors": {"float": floors["float"], "quantized": floors["quantized"]},
        "tolerances": limits,
        "export_faithfulness": {
            "reference_onnx_vs_pytorch_fp32": reference_vs_torch,
            "reference_within_float_tolerance": within(reference_vs_torch, limits["float"]),
            "quantized_onnx_vs_pytorch_fake_quant": quantized_vs_sim,
            "threshold_cosine": faithful_cosine(weight_only),
            "threshold_layer_snr_db": faithful_snr_db(faithful_cosine(weight_only)),
            "noise_floor_allowance": not weight_only,
            # The PyTorch simulation has no INT8 KV cache and no INT8 attention matmuls: with either, the comparison
            # also holds their own rounding, so no verdict on the export is possible from it.
            "faithful": None if config.export.kv_cache_int8 or config.export.int8_attention
            else faithful(quantized_vs_sim, weight_only),
        },
        "tensorrt_fp16_graph_on_onnxruntime": floors["fp16_qdq_vs_reference"],
        "generation": generation,
        "tensorrt_plan": build,
        # Each plan against ONNX Runtime on the graph it was built from: the INT8 plan held to the quantized floor,
        # the FP16 reference plan to the float floor.
        "tensorrt_plan_vs_onnxruntime": _plan_check(floors, "tensorrt_plan_vs_onnxruntime", limits["quantized"]),
        "tensorrt_fp16_plan_vs_onnxruntime": _plan_check(floors, "tensorrt_fp16_plan_vs_onnxruntime", limits["float"]),
        "not_verified": [] if build.get("status") == "done" else [
            "TensorRT engine: no plan was built here, so nothing ran in TensorRT ("
            + build.get("reason", build.get("status", "")) + ")"],
    }


def print_plan(plan: QuantPlan) -> None:
    out = sys.stdout
    out.write(f"{'module':<42} {'status':<10} {'alpha':>5} {'input scale':>12} {'weight scales':>21} {'max s':>8} "
              f"{'bits/group':>10} {'err (rtn)':>18}\n")
    for m in plan.modules:
        layout = f"{m.weight_bits}/{m.group_size}" if m.weight_bits else "-"
        err = f"{m.output_error:.2e} ({m.rtn_output_error:.2e})" if m.output_error is not None else "-"
        alpha = f"{m.alpha:.2f}" if m.alpha is not None else "-"
        act = f"{m.input_scale:.4g}" if m.input_scale is not None else "-"
        w = f"{m.weight_scale_min:.2e}..{m.weight_scale_max:.2e}" if m.weight_scale_min is not None else "-"
        s = f"{m.smoothing_factor_max:.3g}" if m.smoothing_factor_max is not None else "-"
        out.write(f"{m.name:<42} {m.status:<10} {alpha:>5} {act:>12} {w:>21} {s:>8} {layout:>10} {err:>18}\n")


def print_headline(r: dict, path: Path) -> None:
    a = r["accuracy"]
    print(f"perplexity: reference {a['perplexity_reference_fp32_onnx']:.4f}, Q/DQ {a['perplexity_quantized_fp32_onnx']:.4f} "
          f"({a['perplexity_delta_percent']:+.2f}%), top-1 agreement {100 * a['next_token_top1_agreement']:.2f}%, "
          f"faithful: {FAITHFUL_WORDS[r['export_faithfulness']['faithful']]}; report: {path}")
    for item in r["not_verified"]:
        print(f"not verified: {item}")
