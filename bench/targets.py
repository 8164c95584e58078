"""Issue targets as ratios of one bench run, and the Markdown table of everything measured."""

from __future__ import annotations

MB = 1e6
OURS, FP32, STATIC = "smoothtrt W8A8", "reference FP32", "ORT quantize_static"


def _target(name: str, measured: float | None, limit: float, at_most: bool, unit: str = "x") -> dict:
    met = None if measured is None else (measured <= limit if at_most else measured >= limit)
    return {"target": name, "measured": measured, "limit": f"{'<=' if at_most else '>='} {limit}{unit}", "met": met}


def evaluate(r: dict) -> list[dict]:
    costs, lat, stages = r["costs"], r["latency"], r["pipeline"]
    engine_seconds = sum(s["seconds"] for s in stages.values())
    peak_rss = max(s["peak_rss_bytes"] for s in stages.values())
    rows = [
        _target("calibration statistics vs plain forwards over the same windows",
                costs["calibration_statistics_seconds"] / costs["plain_forward_calibration_seconds"], 1.2, True),
        _target("whole pipeline vs plain forwards over calibration + evaluation windows + ONNX Runtime evaluation of "
                "both graphs", engine_seconds / (costs["plain_forward_all_windows_seconds"]
                                                 + costs["onnx_evaluation_both_graphs_seconds"]), 2.0, True),
    ]
    # Best samples, with ONNX Runtime's default threads and with one: bench/latency.py's compare says why both.
    for threads, timings in (("default threads", lat), ("1 thread", r["latency_one_thread"])):
        for shape in ("prefill 1x512", "prefill 4x128"):
            best = {label: timings[label][shape]["best_ms"] for label in (FP32, OURS, STATIC)}
            rows.append(_target(f"{shape}, {threads}: INT8 speed-up over FP32 reference", best[FP32] / best[OURS],
                                1.5, False))
            rows.append(_target(f"{shape}, {threads}: INT8 speed vs quantize_static (theirs / ours)",
                                best[STATIC] / best[OURS], 1.0, False))
    rows.append(_target("INT8 Q/DQ ONNX bytes / FP32 reference bytes",
                        r["artifacts"][OURS]["bytes"] / r["artifacts"][FP32]["bytes"], 0.40, True))
    rows.append(_target("peak RSS of the pipeline / FP32 model bytes", peak_rss / costs["fp32_model_bytes"], 2.5, True))
    for synthetic in r["synthetic_calibration"]:
        rows.append(_target(f"peak RSS of calibrate with CALIB=synthetic (the default make engine), sampled in "
                            f"{synthetic['sampling_dtype']} / FP32 model bytes",
                            synthetic["peak_rss_bytes"] / costs["fp32_model_bytes"], 2.5, True))
    rows.append(_target("report.md/.html/.json from saved artifacts (make report), seconds", r["report"]["seconds"], 60,
                        True, " s"))
    low = r["low_memory"]["stages"]
    rows.append(_target("peak RSS of calibrate + quantize with --low-memory / FP32 model bytes (export and verify "
                        "still load the model)", max(s["peak_rss_bytes"] for s in low.values()) / costs["fp32_model_bytes"],
                        1.2, True))
    return rows


VERDICT = {True: "yes", False: "NO", None: "not measured"}


def _latency_table(lat: dict, threads: str) -> list[str]:
    shapes = list(lat[FP32])
    lines = ["", f"ONNX Runtime CPU, {threads}, the graphs taking turns sample by sample: best / median ms of "
             f"{', '.join(str(lat[FP32][s]['samples']) for s in shapes)} samples (ratio: FP32 time / this graph's "
             "time). The best samples are the speed a graph runs at; this machine's slow periods only add time "
             "(bench/latency.py).", "",
             "| graph | " + " | ".join(shapes) + " |", "| --- |" + " --- |" * len(shapes)]
    for label, times in lat.items():
        cells = [" / ".join(f"{times[s][k]:.1f} ({lat[FP32][s][k] / times[s][k]:.2f}x)" for k in ("best_ms", "median_ms"))
                 for s in shapes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(r: dict) -> str:
    cpu = r.get("machine", {})
    lines = [f"# smoothtrt bench: {r['model']}", "", f"Command: `{r['command']}`", "",
             f"Machine: {cpu.get('cpu', 'not recorded')}, {cpu.get('logical_cpus')} logical CPUs, PyTorch kernels "
             f"{cpu.get('torch_cpu_capability')} (float results, and so the plan, can differ on another CPU).", "",
             f"Recipe timed stage by stage: {r['recipes'][0]}. Each stage ran as its own process (model load "
             "included in each); peak RSS is that process's.", "",
             "| stage | seconds | peak RSS MB |", "| --- | --- | --- |",
             *(f"| model load alone, {label} | {r['load'][key]['seconds']:.1f} | "
               f"{r['load'][key]['peak_rss_bytes'] / MB:.0f} |"
               for key, label in (("first", "first (a GGUF model converted into the cache)"), ("cached", "cached")))]
    lines += [f"| {name} | {s['seconds']:.1f} | {s['peak_rss_bytes'] / MB:.0f} |" for name, s in r["pipeline"].items()]
    lines.append(f"| report from saved artifacts (make report) | {r['report']['seconds']:.1f} | "
                 f"{r['report']['peak_rss_bytes'] / MB:.0f} |")
    sampled = [f"in {s['sampling_dtype']}{' (the default here)' if s['default'] else ''}, {s['samples']} windows: "
               f"{s['seconds']:.1f} s, peak RSS {s['peak_rss_bytes'] / MB:.0f} MB" for s in r["synthetic_calibration"]]
    lines += ["", f"The default calibration (CALIB=synthetic), calibrate alone on one sampling batch (more batches "
              f"sample more windows, at the same peak): {'; '.join(sampled)}."]
    low, estimates = r["low_memory"], r["memory_estimates"]
    lines += ["", "Peak RSS in and out of --low-memory (each stage its own process), and the estimate printed before "
              f"the run; importing the pipeline alone peaks at {r['runtime_floor']['peak_rss_bytes'] / MB:.0f} MB. "
              f"--low-memory saved {'identical' if low['statistics_identical'] else 'DIFFERENT'} calibration "
              f"statistics; plan entries differing: {low['plan_entries_differing']} of {low['plan_entries']}; integer "
              f"weight codes differing: {low['weight_codes_differing']:,} of {low['weight_codes']:,}.", "",
              "| stage | in memory: s | MB | estimate MB | --low-memory: s | MB | estimate MB |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, streamed in low["stages"].items():
        whole = r["pipeline"][name]
        lines.append(f"| {name} | {whole['seconds']:.1f} | {whole['peak_rss_bytes'] / MB:.0f} | "
                     f"{estimates['in_memory'][name] / MB:.0f} | {streamed['seconds']:.1f} | "
                     f"{streamed['peak_rss_bytes'] / MB:.0f} | {estimates['low_memory'][name] / MB:.0f} |")
    c = r["costs"]
    lines += ["", f"Plain forwards ({c['windows']['calibration']} calibration windows): "
              f"{c['plain_forward_calibration_seconds']:.1f} s; statistics collection over them: "
              f"{c['calibration_statistics_seconds']:.1f} s; plain forwards over all windows: "
              f"{c['plain_forward_all_windows_seconds']:.1f} s; ONNX Runtime evaluation of both graphs "
              f"({c['windows']['evaluation']} windows): {c['onnx_evaluation_both_graphs_seconds']:.1f} s. "
              f"Parameters: {c['parameters']:,}.", "",
              "| artifact | MB | bytes per parameter |", "| --- | --- | --- |"]
    lines += [f"| {label} | {a['bytes'] / MB:.1f} | {a['bytes_per_parameter']:.2f} |" for label, a in r["artifacts"].items()]
    lines += _latency_table(r["latency"], "ONNX Runtime's default threads (one per physical core)")
    lines += _latency_table(r["latency_one_thread"], "one ONNX Runtime thread")
    lines += ["", "Kernels that ran the MatMuls of one prefill (ONNX Runtime profiler):", "",
              "| graph | integer MatMul kernels | float MatMul kernels | by op |", "| --- | --- | --- | --- |"]
    lines += [f"| {label} | {k['integer_matmuls']} | {k['float_matmuls']} | {k['ops']} |"
              for label, k in r["integer_kernels"].items()]
    s = r["quantize_static"]
    off = (f"; its graph measured with ONNX Runtime's {', '.join(s['disabled_optimizers'])} off (with the defaults "
           "ONNX Runtime cannot load it: microsoft/onnxruntime#25526)") if s["disabled_optimizers"] else ""
    lines += ["", f"quantize_static (QDQ, per-channel, MatMul only) took {s['seconds_to_quantize']:.1f} s on "
              f"{s['calibration_windows']} calibration windows{off}.", "", "| recipe | perplexity | reference | delta | top-1 agreement |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {a['perplexity_quantized_fp32_onnx']:.4f} | {a['perplexity_reference_fp32_onnx']:.4f} | "
              f"{a['perplexity_delta_percent']:+.2f}% | {100 * a['next_token_top1_agreement']:.2f}% |"
              for name, a in r["accuracy"].items()]
    if r.get("recipe_runs"):
        runs = [f"{name} {run['engine']['seconds']:.0f} s, {run['engine']['peak_rss_bytes'] / 1e6:,.0f} MB peak"
                + ("" if run["calibration_reused"] else " (calibration NOT reused: it ran again)")
                for name, run in r["recipe_runs"].items()]
        lines += ["", f"Recipes after {r['recipes'][0]} ran through `python -m pipeline engine` each (a process per "
                  f"stage), on {r['recipes'][0]}'s calibration windows and statistics: {'; '.join(runs)}."]
    lines += ["", "| target | measured | limit | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {t['target']} | {_number(t['measured'])} | {t['limit']} | {VERDICT[t['met']]} |" for t in r["targets"]]
    lines += ["", f"Total bench time: {r['total_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"
