"""`make bench`: what the pipeline costs and what its INT8 graph buys, measured side by side in one run.

    python bench/run.py --calib ../shared/data/wikitext2/test.txt --eval ../shared/data/wikitext2/test.txt
                        [--model smollm2-135m] [--recipes w8a8,w8a8-naive,w4a16-rtn,w4a16-gptq] [--out build/bench]

- pipeline: each stage as its own process (wall time, peak RSS), fresh OUT, and the model load alone (first, when
  a GGUF model is converted into a fresh model cache, and cached);
- ratios for the targets: calibration vs the plain forward passes over the same windows, the whole run vs those
  forwards plus the ONNX Runtime evaluation of both graphs;
- artifacts: bytes of each graph and bytes per parameter;
- ONNX Runtime CPU latency of the FP32 reference, our INT8 Q/DQ graph and ONNX Runtime's own quantize_static model
  (same reference ONNX, same calibration windows): prefill 1 x 512 and 4 x 128, decode step with the KV cache,
  with ONNX Runtime's default threads and with one;
  ONNX Runtime's profiler says which kernels ran the quantized MatMuls;
- accuracy rows for each recipe (perplexity on the evaluation windows); the recipes after the first run through
  `python -m pipeline engine` each (a process per stage), on the first one's calibration.
Writes bench/results/bench.json and bench.md (or --results DIR). Ratios are the figures to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import latency, targets  # noqa: E402
from bench.quantize_static import quantize_static_model  # noqa: E402
from pipeline.artifacts import machine  # noqa: E402
from pipeline.gguf_cache import CACHE_ENV  # noqa: E402

STAGES = ("calibrate", "quantize", "export", "build", "verify")
RECIPE_ARGS = {  # recipe -> extra CLI options of `python -m pipeline`
    "w8a8": [],  # SmoothQuant, per-group auto alpha (the default)
    "w8a8-naive": ["--no-smooth"],
    "w8a8-gptq": ["--quant", "w8a8-gptq"],
    "w4a16-rtn": ["--quant", "w4a16-rtn"],
    "w4a16-gptq": ["--quant", "w4a16-gptq"],
}


def timed_process(argv: list[str]) -> dict:
    """Run Python with argv in its own process (through bench/peak.py, so the peak RSS is that process's own and
    not the bench's): wall seconds and peak RSS."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "peak.json"
        proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "peak.py"), str(report), *argv], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stderr_lines = []
        for line in proc.stderr:  # drain so the child never blocks on a full pipe; keep the tail for errors
            stderr_lines = (stderr_lines + [line.decode(errors="replace")])[-20:]
        proc.wait()
        measured = json.loads(report.read_text()) if report.is_file() else {"returncode": proc.returncode}
    if proc.returncode != 0 or measured["returncode"] != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({measured['returncode']}):\n{''.join(stderr_lines)}")
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": measured["peak_rss_bytes"]}


def pipeline_args(args, out: Path, recipe: str) -> list[str]:
    return ["--model", args.model, "--out", str(out), "--calib", args.calib, "--eval", args.eval,
            "--calib-windows", str(args.calib_windows), "--eval-windows", str(args.eval_windows),
            "--seq-len", str(args.seq_len), *RECIPE_ARGS[recipe]]


def run_pipeline(args, out: Path, recipe: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    stages = {}
    for stage in STAGES:
        print(f"bench: {recipe}: {stage}", flush=True)
        stages[stage] = timed_process(["-m", "pipeline", stage, *pipeline_args(args, out, recipe)])
    report = json.loads((out / "report.json").read_text())
    return {"stages": stages, "report": report}


# What the calibrate stage leaves in OUT (and its manifest entry). Its key hashes the model and the calibration
# options only, so another recipe's OUT seeded with these skips it (the pipeline's own resume check, file hashes
# included).
CALIBRATION_FILES = ("windows.npz", "calibration_stats.safetensors", "stages/calibrate.json")


def run_recipe(args, out: Path, recipe: str, calibrated: Path) -> dict:
    """An accuracy row: the whole pipeline (`python -m pipeline engine`: a process per stage) on the calibration the
    timed recipe saved in `calibrated`."""
    shutil.rmtree(out, ignore_errors=True)
    for name in CALIBRATION_FILES:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(calibrated / name, out / name)
    manifest = json.loads((calibrated / "manifest.json").read_text())  # without the timed recipe's later stages
    manifest["stages"] = {"calibrate": manifest["stages"]["calibrate"]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"bench: {recipe}: engine (calibration of {calibrated.name} reused)", flush=True)
    run = timed_process(["-m", "pipeline", "engine", *pipeline_args(args, out, recipe)])
    # copy2 kept the timestamp; a calibrate stage that ran would have written (renamed) a new file
    reused = (out / "windows.npz").stat().st_mtime_ns == (calibrated / "windows.npz").stat().st_mtime_ns
    return {"engine": run, "calibration_reused": reused, "report": json.loads((out / "report.json").read_text())}


def low_memory_stages(args, out: Path, recipe: str, whole: Path) -> dict:
    """calibrate and quantize again with --low-memory (own processes, fresh OUT), their peak RSS beside the
    in-memory run's, and how much of what they saved differs (layer-by-layer batching rounds differently, which
    can flip a near-tie of the alpha search)."""
    from calibration.gptq import load_quantized

    shutil.rmtree(out, ignore_errors=True)
    stages = {}
    for stage in ("calibrate", "quantize"):
        print(f"bench: {recipe} --low-memory: {stage}", flush=True)
        stages[stage] = timed_process(["-m", "pipeline", stage, *pipeline_args(args, out, recipe), "--low-memory"])
    weights, streamed = (load_quantized(o / "quantized_weights.safetensors") for o in (whole, out))
    plans = [json.loads((o / "quant_plan.json").read_text())["modules"] for o in (whole, out)]
    return {"stages": stages,
            "statistics_identical": (whole / "calibration_stats.safetensors").read_bytes()
            == (out / "calibration_stats.safetensors").read_bytes(),
            "plan_entries_differing": sum(a != b for a, b in zip(*plans)) + abs(len(plans[0]) - len(plans[1])),
            "plan_entries": len(plans[0]),
            "weight_codes_differing": sum(int((weights[n].codes != streamed[n].codes).sum()) for n in weights),
            "weight_codes": sum(weights[n].codes.numel() for n in weights)}


def memory_estimates(args, recipe: str) -> dict:
    """What the pipeline prints before a run, for both modes (compared with the measured peaks in bench.md)."""
    from pipeline import cli, models
    from pipeline.memory import ModelShape, estimate_peaks

    shape = ModelShape.of_model(models.resolve(args.model))
    argv = ["engine", *pipeline_args(args, Path("unused"), recipe)]
    return {mode: estimate_peaks(shape, cli.config_from(cli.parser().parse_args(argv + flag)))
            for mode, flag in (("in_memory", []), ("low_memory", ["--low-memory"]))}


def load_only(model: str) -> dict:
    code = f"from pipeline import models; models.load(models.resolve({model!r}))"
    return timed_process(["-c", code])


def synthetic_calibration(args, out: Path) -> list[dict]:
    """The default `make engine`'s calibrate stage (CALIB=synthetic) on one sampling batch: the windows it samples,
    and so its peak (the sampler's weights, their KV cache at full length), do not depend on how many batches run.
    In the dtype this CPU samples in by default, and in float32, what CPUs without native bfloat16 sample in. The
    WikiText pipeline above never samples."""
    import torch

    from calibration.data import SAMPLING_BATCH, sampling_dtype

    default = sampling_dtype()
    rows = []
    for dtype in dict.fromkeys((default, torch.float32)):
        name = str(dtype).removeprefix("torch.")
        samples = SAMPLING_BATCH[dtype]
        holdout = evaluation = samples // 4  # 4 and 4 of 16 (the default holdout), 2 and 2 of 8
        shutil.rmtree(out / name, ignore_errors=True)
        print(f"bench: the default calibration (synthetic), one sampling batch in {name}", flush=True)
        measured = timed_process(["-m", "pipeline", "calibrate", "--model", args.model, "--out", str(out / name),
                                  "--calib", "synthetic", "--sampling-dtype", name, "--calib-windows",
                                  str(samples - holdout - evaluation), "--holdout-windows", str(holdout),
                                  "--eval-windows", str(evaluation), "--seq-len", str(args.seq_len)])
        rows.append({**measured, "samples": samples, "sampling_dtype": name, "default": dtype == default})
    return rows


def forward_costs(args, out: Path) -> dict:
    """In one process: plain forwards over the calibration + evaluation windows, the statistics collection over
    the calibration windows (hooks), and the ONNX Runtime evaluation of both graphs (what verify must run)."""
    import torch

    from calibration.stats import collect_input_absmax, quantizable_linears
    from pipeline import models, verify

    model, _, spec = models.load(models.resolve(args.model))
    windows = np.load(out / "windows.npz")
    calibration, evaluation = windows["calibration"], windows["evaluation"]
    batch = 4  # the calibrate stage's default batch size

    def plain(ids: np.ndarray) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(ids), batch):
                model(input_ids=torch.from_numpy(ids[i:i + batch]), use_cache=False, logits_to_keep=1)
        return time.perf_counter() - start

    plain(calibration[:batch])  # warm-up
    plain_calibration = plain(calibration)
    start = time.perf_counter()
    collect_input_absmax(model, quantizable_linears(model, spec), calibration, batch)
    hooked = time.perf_counter() - start
    plain_all = plain_calibration + plain(evaluation)
    start = time.perf_counter()
    for graph in ("reference.onnx", "quantized.onnx"):  # inference only: the metrics are the pipeline's own cost
        for _ in verify.graph_logits(out / graph, evaluation, f"bench: {graph}"):
            pass
    onnx_eval = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.parameters())
    return {"plain_forward_calibration_seconds": plain_calibration, "calibration_statistics_seconds": hooked,
            "plain_forward_all_windows_seconds": plain_all, "onnx_evaluation_both_graphs_seconds": onnx_eval,
            "windows": {"calibration": len(calibration), "evaluation": len(evaluation)},
            "parameters": parameters, "fp32_model_bytes": parameters * 4}


def graph_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", required=True, help="calibration text (the shared protocol: WikiText-2 test)")
    parser.add_argument("--eval", required=True, help="evaluation text")
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--recipes", default="w8a8,w8a8-naive,w4a16-rtn,w4a16-gptq",
                        help=f"comma-separated, first one is timed stage by stage: {', '.join(RECIPE_ARGS)}")
    parser.add_argument("--out", default="build/bench")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--latency-repeats", type=int, default=10)
    args = parser.parse_args(argv)
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPE_ARGS]
    if unknown:
        raise SystemExit(f"error: unknown recipe(s) {unknown}: choose from {', '.join(RECIPE_ARGS)}")
    root = Path(args.out)
    started = time.perf_counter()
    cache = root / "model-cache"  # fresh, so the first load below pays a GGUF model's one-time conversion
    shutil.rmtree(cache, ignore_errors=True)
    os.environ[CACHE_ENV] = str(cache)  # inherited by every stage process: they load as `make engine` does
    first_load = load_only(args.model)
    main_out = root / recipes[0]
    runs = {recipes[0]: run_pipeline(args, main_out, recipes[0])}
    runs.update({recipe: run_recipe(args, root / recipe, recipe, main_out) for recipe in recipes[1:]})
    result = {"command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": args.model, "machine": machine(), "recipes": recipes,
              "load": {"first": first_load, "cached": load_only(args.model)},
              "pipeline": runs[recipes[0]]["stages"],
              "low_memory": low_memory_stages(args, root / f"{recipes[0]}-low-memory", recipes[0], main_out),
              "memory_estimates": memory_estimates(args, recipes[0]),
              "runtime_floor": timed_process(["-c", "import pipeline.stages"])}
    result["synthetic_calibration"] = synthetic_calibration(args, root / "synthetic")
    print("bench: plain forwards, statistics and ONNX Runtime evaluation", flush=True)
    result["costs"] = forward_costs(args, main_out)
    print("bench: report from saved artifacts", flush=True)
    result["report"] = timed_process(["-m", "pipeline", "report", "--out", str(main_out)])
    print("bench: ONNX Runtime quantize_static on the same reference and calibration windows", flush=True)
    static = quantize_static_model(main_out / "reference.onnx", np.load(main_out / "windows.npz"), root / "quantize_static")
    result["quantize_static"] = static
    graphs = {"reference FP32": (main_out / "reference.onnx", ()), "smoothtrt W8A8": (main_out / "quantized.onnx", ()),
              "ORT quantize_static": (Path(static["path"]), tuple(static["disabled_optimizers"]))}
    parameters = result["costs"]["parameters"]
    files = {label: path for label, (path, _) in graphs.items()}
    files["smoothtrt W8A8 FP16 (TensorRT)"] = main_out / "quantized.fp16.onnx"
    result["artifacts"] = {label: {"bytes": graph_bytes(p), "bytes_per_parameter": graph_bytes(p) / parameters}
                           for label, p in files.items()}
    print("bench: latency", flush=True)
    text_tokens = np.load(main_out / "windows.npz")["evaluation"].ravel()
    result["latency"] = latency.compare(graphs, args.latency_repeats, text_tokens)
    print("bench: latency, one ONNX Runtime thread", flush=True)  # steady on this machine: bench/latency.py
    result["latency_one_thread"] = latency.compare(graphs, max(1, args.latency_repeats // 2), text_tokens, threads=1)
    result["integer_kernels"] = {label: latency.kernel_census(path, off) for label, (path, off) in graphs.items()
                                 if label != "reference FP32"}
    result["accuracy"] = {recipe: runs[recipe]["report"]["accuracy"] for recipe in recipes}
    result["recipe_runs"] = {recipe: {k: v for k, v in runs[recipe].items() if k != "report"} for recipe in recipes[1:]}
    result["accuracy"]["ORT quantize_static"] = static["accuracy"]
    result["targets"] = targets.evaluate(result)
    result["total_seconds"] = time.perf_counter() - started
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "bench.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (results / "bench.md").write_text(targets.markdown(result))
    print(targets.markdown(result))
    return result


if __name__ == "__main__":
    main()
