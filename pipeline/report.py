"""report.json / report.md: what was measured, on what, and what could not run."""

from __future__ import annotations

import sys
from pathlib import Path

from calibration.quant import QuantPlan
from pipeline.config import RunConfig

FAITHFUL_COSINE = 0.999  # the Q/DQ graph must reproduce the PyTorch simulation of the same recipe
# A weight-only graph is a continuous function of its input (no activation rounding), so ONNX Runtime must match
# the dequantized PyTorch model to float precision.
FAITHFUL_COSINE_WEIGHT_ONLY = 0.9999


FAITHFUL_WORDS = {True: "yes", False: "NO", None: "not judged (INT8 KV cache: the PyTorch simulation keeps a float "
                                                   "cache, so the difference includes the cache's rounding)"}


def faithful(quantized_vs_sim: dict, weight_only: bool = False) -> bool:
    """W8A8: cosine >= 0.999, or a deviation no larger than twice the simulation's own noise floor (SDPA vs eager
    attention in PyTorch), since no implementation can match a discontinuous model more closely than that.
    Weight-only: cosine >= 0.9999 on every window, no allowance."""
    if weight_only:
        return quantized_vs_sim["cosine_min"] >= FAITHFUL_COSINE_WEIGHT_ONLY
    deviation = 1.0 - quantized_vs_sim["cosine_mean"]
    floor = 1.0 - quantized_vs_sim["noise_floor"]["cosine_mean"]
    return quantized_vs_sim["cosine_min"] >= FAITHFUL_COSINE or deviation <= 2.0 * floor


def tuning_summary(plan: QuantPlan, alpha_choice: dict, budget: dict | None) -> dict:
    alphas = [m.alpha for m in plan.modules if m.alpha is not None]
    summary = {"alpha_mode": alpha_choice.get("mode"), "range_estimator": plan.range_estimator,
               "alpha_min": min(alphas, default=None), "alpha_max": max(alphas, default=None),
               "alpha_mean": sum(alphas) / len(alphas) if alphas else None}
    if "holdout_perplexity" in alpha_choice:
        summary["grid_holdout_perplexity"] = alpha_choice["holdout_perplexity"]
    if budget is not None:
        summary["accuracy_budget"] = {k: budget.get(k) for k in ("budget_percent", "reference_perplexity",
                                      "all_quantized_perplexity", "final_perplexity", "kept_float", "met")}
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


def build_report(config: RunConfig, manifest: dict, plan: QuantPlan, accuracy: dict, reference_vs_torch: dict,
                 quantized_vs_sim: dict, fp16_graph: dict, tuning: dict, generation: dict) -> dict:
    weight_only = not config.quant.recipe.int8_activations
    stages = manifest.get("stages", {})
    calib = stages.get("calibrate", {})
    build = stages.get("build", {"status": "not run"})
    quantized = plan.quantized()
    return {
        "model": config.model,
        "scheme": config.quant.scheme,
        "kv_cache": "int8" if config.export.kv_cache_int8 else "float",
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
        },
        "export_faithfulness": {
            "reference_onnx_vs_pytorch_fp32": reference_vs_torch,
            "quantized_onnx_vs_pytorch_fake_quant": quantized_vs_sim,
            "threshold_cosine": FAITHFUL_COSINE_WEIGHT_ONLY if weight_only else FAITHFUL_COSINE,
            "noise_floor_allowance": not weight_only,
            # The PyTorch simulation has no INT8 KV cache: with one, the comparison also holds the cache's own
            # rounding, so no verdict on the export is possible from it.
            "faithful": None if config.export.kv_cache_int8 else faithful(quantized_vs_sim, weight_only),
        },
        "tensorrt_fp16_graph_on_onnxruntime": fp16_graph,
        "generation": generation,
        "tensorrt_plan": build,
        "not_verified": [] if build.get("status") == "done" else [
            "TensorRT engine: no plan was built here, so nothing ran in TensorRT ("
            + build.get("reason", build.get("status", "")) + ")"],
    }


def render_markdown(r: dict) -> str:
    a, f, h = r["accuracy"], r["export_faithfulness"], r["tensorrt_fp16_graph_on_onnxruntime"]
    plan = r["tensorrt_plan"]
    lines = [
        f"# smoothtrt report: {r['model']}",
        "",
        f"Recipe: {r['recipe']}; SmoothQuant {'on, alpha ' + str(r['alpha']) if r['smoothing'] else 'off'}; "
        f"{r['modules']['quantized']} linears quantized, {r['modules']['skipped']} skipped, "
        f"{r['modules']['float']} modules float; KV cache {r['kv_cache']}"
        f"{' (per-tensor scales, past/present INT8)' if r['kv_cache'] == 'int8' else ''}.",
        "",
        _tuning_line(r["tuning"]),
        "",
        _weights_line(r["weights"]),
        "",
        f"Calibration: {r['calibration']['origin']} ({r['calibration']['windows']} x {r['calibration']['seq_len']} "
        f"tokens, sha256 {str(r['calibration']['windows_sha256'])[:16]}).",
        f"Evaluation: {r['evaluation']['origin']} ({r['evaluation']['predicted_tokens']} predicted tokens).",
        "",
        f"## Accuracy ({a['runtime']})",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| perplexity, reference FP32 ONNX | {a['perplexity_reference_fp32_onnx']:.4f} |",
        f"| perplexity, Q/DQ FP32 ONNX | {a['perplexity_quantized_fp32_onnx']:.4f} |",
        f"| perplexity delta | {a['perplexity_delta_percent']:+.2f}% |",
        f"| next-token top-1 agreement (teacher-forced) | {100 * a['next_token_top1_agreement']:.2f}% |",
        f"| logits cosine, mean / min over windows | {a['logits_cosine_mean']:.5f} / {a['logits_cosine_min']:.5f} |",
        f"| logits max abs error | {a['logits_max_abs_error']:.4f} |",
        "",
        "## Export faithfulness",
        "",
        "| comparison | windows | cosine min | max abs error | top-1 agreement |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, key in (("reference ONNX vs PyTorch FP32", "reference_onnx_vs_pytorch_fp32"),
                       ("Q/DQ ONNX vs PyTorch fake-quant", "quantized_onnx_vs_pytorch_fake_quant")):
        s = f[key]
        lines.append(f"| {label} | {s['windows']} | {s['cosine_min']:.6f} | {s['max_abs_error']:.4g} | "
                     f"{100 * s['top1_agreement']:.2f}% |")
    floor = f["quantized_onnx_vs_pytorch_fake_quant"]["noise_floor"]
    lines.append(f"| noise floor: PyTorch fake-quant, SDPA vs eager attention | {floor['windows']} | "
                 f"{floor['cosine_min']:.6f} | {floor['max_abs_error']:.4g} | {100 * floor['top1_agreement']:.2f}% |")
    lines += [
        "",
        f"Faithful (cosine min >= {f['threshold_cosine']}"
        f"{', or mean deviation within twice the noise floor' if f['noise_floor_allowance'] else ''}): "
        f"{FAITHFUL_WORDS[f['faithful']]}.",
        "",
        "## FP16 Q/DQ graph (the one TensorRT builds), run in ONNX Runtime CPU",
        "",
        f"{h['windows']} windows: perplexity {h['perplexity_candidate']:.4f} vs reference "
        f"{h['perplexity_reference']:.4f} ({h['perplexity_delta_percent']:+.2f}%), top-1 agreement "
        f"{100 * h['top1_agreement']:.2f}%, cosine min {h['cosine_min']:.5f}.",
        "",
        *_generation_lines(r["generation"]),
        "## TensorRT plan",
        "",
        f"Status: {plan.get('status')}" + (f" ({plan['reason']})" if plan.get("reason") else "") + ".",
    ]
    if r["not_verified"]:
        lines += ["", "## Not verified", ""] + [f"- {item}" for item in r["not_verified"]]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _generation_lines(g: dict) -> list[str]:
    exact, q = g["reference_onnx_vs_pytorch_generate"], g["quantized_vs_reference_onnx"]
    lines = [
        f"## Greedy generation with KV cache ({g['new_tokens']} new tokens, {exact['prompts']} prompts, ONNX Runtime)",
        "",
        f"Reference FP32 ONNX vs PyTorch generate(): {exact['identical']}/{exact['prompts']} prompts identical, "
        f"token agreement {100 * exact['token_agreement']:.1f}%.",
        f"Q/DQ ONNX vs reference ONNX: {q['identical']}/{q['prompts']} prompts identical, token agreement "
        f"{100 * q['token_agreement']:.1f}%, common prefix {q['common_prefix_lengths']} tokens "
        f"(mean {q['mean_common_prefix']:.1f}).",
        "",
        "| prompt | reference | Q/DQ |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {_cell(s['prompt'])} | {_cell(s['reference'])} | {_cell(s['quantized'])} |" for s in g["samples"]]
    return lines + [""]


def _weights_line(w: dict) -> str:
    line = (f"Weights: {'/'.join(w['methods'])}, {'/'.join(map(str, w['bits']))} bits, "
            f"group size {'/'.join(map(str, w['group_sizes']))} input columns.")
    if "output_error_mean" in w:
        line += (f" GPTQ layer output error (||W X_f - Q X||^2/||W X_f||^2 on the calibration rows, X_f the float "
                 f"model's input) mean "
                 f"{w['output_error_mean']:.3g} vs RTN {w['rtn_output_error_mean']:.3g}; lower than RTN on "
                 f"{w['linears_better_than_rtn']}/{w['linears_measured']} linears; damping raised on "
                 f"{len(w['damping_raised'])}.")
    return line


def _tuning_line(t: dict) -> str:
    if t["alpha_mode"] == "none":
        return "Activations: float (weight-only recipe): no smoothing, no activation ranges."
    line = f"Tuning: alpha {t['alpha_mode']}"
    if t["alpha_min"] is not None:
        line += f" (per module {t['alpha_min']:.2f}..{t['alpha_max']:.2f}, mean {t['alpha_mean']:.3f})"
    line += f"; activation ranges: {t['range_estimator']}."
    b = t.get("accuracy_budget")
    if b:
        line += (f" Accuracy budget {b['budget_percent']}% of holdout perplexity: {len(b['kept_float'])} activation "
                 f"groups kept float ({', '.join(b['kept_float']) or 'none'}); holdout perplexity "
                 f"{b['all_quantized_perplexity']:.4f} -> {b['final_perplexity']:.4f} vs float "
                 f"{b['reference_perplexity']:.4f}" + ("" if b.get("met", True) else " (budget NOT met)") + ".")
    return line


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
