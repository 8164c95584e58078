"""report.md: every section of the report as Markdown tables and lines (report.html renders the same text)."""

from __future__ import annotations

from pipeline.accuracy_target import PERPLEXITY_BOUND as BOUND
from pipeline.report import FAITHFUL_WORDS

FIGURES = "report_figures"


def _db(x: float | None) -> str:
    return "exact" if x is None else f"{x:.1f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _metric_row(label: str, s: dict) -> str:
    return (f"| {label} | {s['windows']} | {s['cosine_min']:.6f} | {s['max_abs_error']:.4g} | "
            f"{s['mean_abs_error']:.4g} | {_db(s['snr_db'])} | {100 * s['top1_agreement']:.2f}% | "
            f"{100 * s['top5_agreement']:.2f}% | {s['kl_mean']:.3g} |")


METRIC_HEADER = ["| comparison | windows | cosine min | max abs err | mean abs err | SNR dB | top-1 | top-5 | KL mean |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]


def render_markdown(r: dict, images: list[str]) -> str:
    a, f, h = r["accuracy"], r["export_faithfulness"], r["tensorrt_fp16_graph_on_onnxruntime"]
    floors = r["precision_floors"]
    lines = [
        f"# smoothtrt report: {r['model']}",
        "",
        f"Recipe: {r['recipe']}; SmoothQuant {'on, alpha ' + str(r['alpha']) if r['smoothing'] else 'off'}; "
        f"{r['modules']['quantized']} linears quantized, {r['modules']['skipped']} skipped, "
        f"{r['modules']['float']} modules float; KV cache {r['kv_cache']}"
        f"{' (per-tensor scales, past/present INT8)' if r['kv_cache'] == 'int8' else ''}; attention matmuls "
        f"{r.get('attention_matmuls', 'float')}.",
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
        f"| next-token top-1 / top-5 agreement (teacher-forced) | {100 * a['next_token_top1_agreement']:.2f}% / "
        f"{100 * a['next_token_top5_agreement']:.2f}% |",
        f"| next-token KL(reference \\|\\| Q/DQ), mean / max (nats) | {a['next_token_kl_mean']:.4g} / "
        f"{a['next_token_kl_max']:.4g} |",
        f"| logits cosine, mean / min over windows | {a['logits_cosine_mean']:.5f} / {a['logits_cosine_min']:.5f} |",
        f"| logits SNR | {_db(a['logits_snr_db'])} dB |",
        f"| logits max / mean abs error | {a['logits_max_abs_error']:.4f} / {a['logits_mean_abs_error']:.4f} |",
        "",
        *_generation_lines(r["generation"]),
        "## Precision floors and tolerances",
        "",
        "Measured, not assumed: what arithmetic precision alone changes on the same windows. A float "
        "implementation is held to the float floor, a W8A8 one to the quantized floor (a Q/DQ graph is "
        "discontinuous: one FP16 rounding can flip an INT8 rounding).",
        "",
        *METRIC_HEADER,
        _metric_row("float floor: FP16 reference vs FP32 reference", floors["float"]),
        _metric_row("quantized floor: FP16 Q/DQ vs FP32 Q/DQ", floors["quantized"]),
        _metric_row("FP16 Q/DQ (the graph TensorRT builds) vs FP32 reference", h),
        "",
        f"FP16 Q/DQ graph perplexity {h['perplexity_candidate']:.4f} vs reference {h['perplexity_reference']:.4f} "
        f"({h['perplexity_delta_percent']:+.2f}%) on {h['windows']} windows.",
        "",
        "## Export faithfulness",
        "",
        *METRIC_HEADER,
        _metric_row("reference ONNX vs PyTorch FP32", f["reference_onnx_vs_pytorch_fp32"]),
        _metric_row("Q/DQ ONNX vs PyTorch fake-quant", f["quantized_onnx_vs_pytorch_fake_quant"]),
        _metric_row("noise floor: PyTorch fake-quant, SDPA vs eager attention",
                    f["quantized_onnx_vs_pytorch_fake_quant"]["noise_floor"]),
        *_layer_by_layer_lines(f["quantized_onnx_vs_pytorch_fake_quant"].get("layer_by_layer")),
        "",
        f"Reference ONNX within the float tolerance: {'yes' if f['reference_within_float_tolerance'] else 'NO'}. "
        f"Q/DQ faithful ({_faithfulness_rule(f)}): {FAITHFUL_WORDS[f['faithful']]}.",
        "",
        *_layerwise_lines(r["layerwise"]),
        *_outlier_lines(r["outliers"], images),
        *_bisect_lines(r["bisect"]),
        *_tensorrt_lines(r),
    ]
    if r["not_verified"]:
        lines += ["", "## Not verified", ""] + [f"- {item}" for item in r["not_verified"]]
    return "\n".join(lines) + "\n"


def _faithfulness_rule(f: dict) -> str:
    end_to_end = (f"cosine min >= {f['threshold_cosine']}"
                  f"{', or mean deviation within twice the noise floor' if f['noise_floor_allowance'] else ''}")
    if "threshold_layer_snr_db" not in f:  # a verification.json from before the layer-by-layer check
        return end_to_end
    return (f"layer by layer: every layer's update and the logits at cosine >= {f['threshold_cosine']} and SNR >= "
            f"{f['threshold_layer_snr_db']:.1f} dB; end to end: {end_to_end}")


def _layer_by_layer_lines(lbl: dict | None) -> list[str]:
    """The Q/DQ graph against the simulation with every simulated layer fed the graph's input to it (absent from
    an older verification.json)."""
    if lbl is None:
        return []
    return [
        _metric_row("Q/DQ ONNX vs PyTorch fake-quant, layer by layer: logits", lbl["logits"]),
        "",
        f"Layer by layer ({lbl['windows']} windows): each simulated decoder layer reads the graph's output of the "
        "previous block, so an error (a rounding flipped by float summation order) stays in the layer where it arose. "
        f"Update (block output minus input) cosine min {lbl['update_cosine_min']:.6f}, "
        f"SNR min {_db(lbl['update_snr_db_min'])} dB ({lbl['least_faithful_layer']}); {lbl['identical_layers']} of "
        f"{len(lbl['layers'])} layers identical.",
    ]


def _layerwise_lines(lw: dict) -> list[str]:
    first = lw["first_large_error"]
    lines = [
        f"## Layer-wise diff ({lw['windows']} evaluation windows, ONNX Runtime)",
        "",
        "Local SNR: each GEMM's output against the float GEMM on the same input (the error it adds). Output SNR: "
        "against the reference graph's same tensor (the error accumulated there).",
        "",
        f"First large error (local SNR below {_db(lw['large_error_threshold_db'])} dB, the median minus 20 dB): "
        f"{first or 'none'}. Worst local error: {lw['worst_local_error']}.",
        "",
        f"![error by layer]({FIGURES}/error_by_layer.png)",
        "",
        "| block | residual SNR dB | cosine | SNR drop from previous block dB |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {b['layer']} | {_db(b['snr_db'])} | {b['cosine']:.6f} | "
              f"{'-' if b['snr_drop_db'] is None else format(b['snr_drop_db'], '+.2f')} |" for b in lw["blocks"]]
    lines += ["", "| GEMM | local SNR dB | output SNR dB | output cosine | input clipped |", "| --- | --- | --- | --- | --- |"]
    for g in lw["gemms"]:
        clipped = "-" if g["input_clipped_fraction"] is None else f"{100 * g['input_clipped_fraction']:.3f}%"
        mark = " **first large error**" if g["module"] == first else ""
        lines.append(f"| {g['module']}{mark} | {_db(g['local_snr_db'])} | {_db(g['output_snr_db'])} | "
                     f"{g['output_cosine']:.6f} | {clipped} |")
    return lines + [""]


def _outlier_lines(o: dict, images: list[str]) -> list[str]:
    if not o["modules"]:
        return []
    lines = ["## Outliers and scales (before / after smoothing)", "",
             "Channel absmax of each linear's input activation and weight columns, max over median: how much range "
             "a per-tensor INT8 scale must cover. Smoothing moves it from activations into weights; a rotated input "
             "(down_proj's, `--rotate-block`) is also spread over its block, so its \"after\" channels are the "
             "rotated ones.", ""]
    lines += [f"![{name}]({FIGURES}/{name})" for name in images if name != "error_by_layer.png"]
    lines += ["", "| linear | activation max/median before -> after | weight max/median before -> after | "
                  "activation absmax before -> after | top outlier channels (absmax before) |",
              "| --- | --- | --- | --- | --- |"]
    for m in o["modules"]:
        top = ", ".join(f"{c['channel']} ({c['before']:.3g})" for c in m["top_channels"])
        lines.append(f"| {m['module']} | {m['activation_max_median_before']:.1f} -> {m['activation_max_median_after']:.1f} "
                     f"| {m['weight_max_median_before']:.1f} -> {m['weight_max_median_after']:.1f} | "
                     f"{m['activation_absmax_before']:.4g} -> {m['activation_absmax_after']:.4g} | {top} |")
    return lines + [""]


def _bisect_lines(b: dict | None) -> list[str]:
    if b is None:
        return []
    lines = ["## Bisect: the fewest linears to keep float", "",
             f"Target: {b['target']['metric']} <= {b['target']['value']} on {b['windows']} evaluation windows. "
             f"All quantized: {b['all_quantized']:.4g}. Result: {len(b['exclusions'])} linears float -> "
             f"{b['result']:.4g} ({'met' if b['met'] else 'NOT met'}); exclusion list {b['exclusion_file']}.", "",
             "| linears float | " + b["target"]["metric"] + " |", "| --- | --- |"]
    lines += [f"| {s['count']} | {s['value']:.4g} |" for s in b["steps"]]
    return lines + [""]


def _tensorrt_lines(r: dict) -> list[str]:
    plan, layers = r["tensorrt_plan"], r["tensorrt_layers"]
    lines = ["## TensorRT plan", "",
             f"Status: {plan.get('status')}" + (f" ({plan['reason']})" if plan.get("reason") else "") + "."]
    checks = [(label, r[key]) for label, key in (
        ("INT8 plan vs ONNX Runtime, same FP16 Q/DQ graph (quantized tolerance)", "tensorrt_plan_vs_onnxruntime"),
        ("FP16 reference plan vs ONNX Runtime, same graph (float tolerance)", "tensorrt_fp16_plan_vs_onnxruntime"))
        if r.get(key) is not None]
    if checks:
        lines += ["", *METRIC_HEADER, *[_metric_row(label, check) for label, check in checks], ""]
        lines += [f"{label}: within tolerance {'yes' if check['within_tolerance'] else 'NO'}." for label, check in checks]
    if layers is None:
        return lines + ["", "No plan in OUT, so no per-layer precision from TensorRT's engine inspector."]
    lines += ["", "| quantized GEMM | TensorRT layer | precision | INT8 |", "| --- | --- | --- | --- |"]
    lines += [f"| {g['module']} | {_cell(g['layer'] or 'not found')} | {g['precision'] or '-'} | "
              f"{'yes' if g['int8'] else 'NO'} |" for g in layers["gemms"]]
    if layers["not_int8"]:
        lines += ["", f"WARNING: {len(layers['not_int8'])} quantized GEMMs did not run INT8: "
                      + ", ".join(layers["not_int8"])]
    return lines


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
        before, after = b["all_quantized"], b["final"]
        line += (f" Accuracy budget {b['target']} on {b['holdout_windows']} holdout windows: {len(b['kept_float'])} "
                 f"activation groups kept float ({', '.join(b['kept_float']) or 'none'}); holdout perplexity "
                 f"{before['perplexity']:.4f} -> {after['perplexity']:.4f} vs float {b['reference_perplexity']:.4f}, "
                 f"mean KL {before['kl_mean']:.4f} -> {after['kl_mean']:.4f}"
                 + (f", perplexity delta 95% upper bound {before[BOUND]:+.2f}% -> {after[BOUND]:+.2f}%"
                    if BOUND in after else "")  # an OUT quantized before the bound was recorded has none
                 + ("" if b["met"] else " (budget NOT met)") + ".")
    return line


