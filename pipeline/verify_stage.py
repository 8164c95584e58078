"""The verify stage. Its PyTorch side (the float and fake-quant models' logits, generate(), the simulation fed the
Q/DQ graph's layer inputs) runs first, in a process of its own (pipeline/simulation.py), and saves what it computes
in the stage's scratch folder. Then this process, which never imports torch, runs every ONNX Runtime check.

Why two processes: an ONNX Runtime session of SmolLM2's reference graph is ~0.77 GB, and a process that has
imported torch and transformers holds ~0.4 GB before any model. In one process the graph checks peaked at
1.3-1.8 GB, over 2.5x the FP32 model (1.35 GB, issue 7's limit); without torch the same sessions start from
~0.1 GB. The child runs while this process holds only its imports.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Collection
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration.plan import QuantPlan
from pipeline import PipelineError, report
from pipeline.artifacts import TOKENIZER, SavedArrays, atomic_path, read_json, scratch_folder, write_json
from pipeline.config import RunConfig, digest
from pipeline.run import (ALPHA_CHOICE, BUDGET, ENGINE, FACTORS, FP16_GRAPH_WINDOWS,
                          LAYERWISE, LAYERWISE_CHANNELS, LAYERWISE_WINDOWS, PLAN, QUANTIZED, QUANTIZED_FP16,
                          REFERENCE, REFERENCE_ENGINE, REFERENCE_FP16, VERIFICATION, VERIFY_CHECKS, WINDOWS, Run,
                          up_to_date, whole_model_notice)

JOB = "job.pickle"  # in the scratch folder: the run configuration, for the PyTorch side's process
TORCH_SIDE = "torch_side.json"  # what that process computed besides its saved arrays
LOGITS, FLOAT_WEIGHTS = "logits", "weights"  # its folders of saved arrays, in the scratch folder


@dataclass
class TorchSide:
    """What the PyTorch side computed: the names of the arrays it saved in the scratch folder (in LOGITS, the float
    and the fake-quant model's logits of each faithfulness window, in window order; in FLOAT_WEIGHTS, each quantized
    linear's smoothed float weight in MatMul layout, for the layer-wise diff), the simulation's noise floor, its
    comparison with the Q/DQ graph layer by layer (pipeline/layer_faithfulness.py), the generation prompts' tokens,
    generate()'s greedy tokens, and the machine record of the process (its torch settings)."""

    float_logits: list[str]
    simulated_logits: list[str]
    float_weights: list[str]
    noise_floor: dict
    layer_by_layer: dict
    prompts: list[list[int]]
    greedy_tokens: list[list[int]]
    stops: list[int]
    machine: dict


def decoder_layers(plan: QuantPlan) -> list[str]:
    """Every decoder layer, whether or not it has a quantized linear."""
    from exporters.probes import layer_of

    return list(dict.fromkeys(layer_of(m.name) for m in plan.modules if m.status != "float"))


def pytorch_side_process(config: RunConfig, folder: Path) -> TorchSide:
    """Run `python -m pipeline.simulation` on the scratch folder and wait for it (its progress and errors print as
    they come); its memory is all returned when it exits, before the first session here opens."""
    (folder / JOB).write_bytes(pickle.dumps(config))
    code = subprocess.call([sys.executable, "-m", "pipeline.simulation", str(folder)])
    if code != 0:
        raise PipelineError(f"verify: its PyTorch side (python -m pipeline.simulation) exited with code {code}; "
                            "its error is printed above")
    return TorchSide(**read_json(folder / TORCH_SIDE))


@contextmanager
def torch_kept_out():
    """Keep torch out of this process while the graphs run, if it is not loaded already: Polygraphy's ONNX Runtime
    runner imports torch (where installed) on every infer() to check whether its inputs are torch tensors
    (polygraphy/util/array.py, is_torch), 0.23 GB of RSS for nothing. A None entry in sys.modules makes any import
    of torch raise ImportError, which Polygraphy reads as "not importable"; anything else that tried would fail
    loudly, not silently load it."""
    if "torch" in sys.modules:  # a process that already ran PyTorch stages (`engine`, tests)
        yield
        return
    sys.modules["torch"] = None
    try:
        yield
    finally:
        del sys.modules["torch"]


def decoder(out: Path):
    """token ids -> text, with OUT's tokenizer: the tokenizers library on tokenizer.json where there is one
    (transformers' AutoTokenizer imports torch), else transformers."""
    saved = out / TOKENIZER / "tokenizer.json"
    if saved.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(saved))
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    from pipeline.runtime import load_tokenizer

    tokenizer = load_tokenizer(out)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def generation_check(out: Path, side: TorchSide, reference: list[list[int]], quantized: list[list[int]]) -> dict:
    """Greedy tokens of PyTorch's generate() vs the reference graph's KV-cache loop (exactness of the export), and
    the Q/DQ graph's tokens vs the reference's (what quantization changes in generated text)."""
    from pipeline import verify

    decode = decoder(out)
    return {"new_tokens": verify.GENERATED_TOKENS, "prompts": list(verify.GENERATION_PROMPTS),
            "reference_onnx_vs_pytorch_generate": verify.generation_agreement(side.greedy_tokens, reference),
            "quantized_vs_reference_onnx": verify.generation_agreement(reference, quantized),
            "samples": [{"prompt": text, "reference": decode(r), "quantized": decode(q)}
                        for text, r, q in zip(verify.GENERATION_PROMPTS, reference, quantized)]}


def output_factors(out: Path, modules: Collection[str]) -> dict[str, np.ndarray]:
    """The smoothing factor dividing the output rows of each of `modules` that produces another linear's input
    (v_proj, up_proj): the layer-wise diff multiplies those outputs back before comparing them."""
    from safetensors.numpy import load_file

    return {k: v for k, v in load_file(str(out / FACTORS)).items() if k in modules}


def layerwise_check(run: Run, float_weights: SavedArrays, windows: np.ndarray) -> dict:
    """Layer-wise diff of the reference and Q/DQ graphs (float_weights: the PyTorch side's), saved in OUT with its
    channel statistics."""
    from pipeline.layerwise import layerwise_diff

    result, channels = layerwise_diff(run.path(REFERENCE), run.path(QUANTIZED), windows, float_weights,
                                      output_factors(run.out, float_weights))
    with atomic_path(run.path(LAYERWISE_CHANNELS)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **channels)
    write_json(run.path(LAYERWISE), result)
    return result


def graph_checks(run: Run, evaluation: np.ndarray, folder: Path,
                 side: TorchSide) -> tuple[dict, dict, dict, dict, tuple[list[list[int]], list[list[int]]]]:
    """Every ONNX Runtime check, against the PyTorch side's saved arrays in `folder`: accuracy, the reference graph
    against PyTorch, the Q/DQ graph against the fake-quant simulation, precision floors, the layer-wise diff (saved
    in OUT), and the greedy tokens of both graphs."""
    from pipeline import verify

    logits = SavedArrays.saved_by_another_process(folder / LOGITS, side.float_logits + side.simulated_logits)
    float_weights = SavedArrays.saved_by_another_process(folder / FLOAT_WEIGHTS, side.float_weights)
    faithful = len(side.float_logits)
    graph_outputs = SavedArrays(folder / "graphs")  # the reference's logits while the Q/DQ graph runs
    # Each FP32 graph runs once, in one session, for all its checks: PyTorch on the first windows, accuracy on
    # all of them, the precision floors' FP32 side on the first few, and the greedy generation loop.
    with verify.OpenGraph(run.path(REFERENCE)) as reference:
        verify.save_reference_logits(reference, evaluation, graph_outputs, f"{REFERENCE} (vs PyTorch; accuracy)")
        reference_tokens = verify.onnx_greedy(reference, side.prompts, verify.GENERATED_TOKENS, side.stops)
    reference_vs_torch = verify.faithfulness((logits[n] for n in side.float_logits),
                                             graph_outputs.numbered("reference", faithful))
    with verify.OpenGraph(run.path(QUANTIZED)) as quantized:
        quantized_vs_sim, accuracy = verify.check_quantized(quantized, evaluation,
                                                            (logits[n] for n in side.simulated_logits),
                                                            graph_outputs, FP16_GRAPH_WINDOWS,
                                                            f"{QUANTIZED} (vs PyTorch fake-quant; accuracy)")
        quantized_tokens = verify.onnx_greedy(quantized, side.prompts, verify.GENERATED_TOKENS, side.stops)
    quantized_vs_sim["noise_floor"] = side.noise_floor
    quantized_vs_sim["layer_by_layer"] = side.layer_by_layer
    logits.clear()
    floors = verify.precision_floors(run.path(REFERENCE_FP16), run.path(QUANTIZED_FP16),
                                     evaluation[:FP16_GRAPH_WINDOWS], graph_outputs)
    layerwise_check(run, float_weights, evaluation[:LAYERWISE_WINDOWS])
    return accuracy, reference_vs_torch, quantized_vs_sim, floors, (reference_tokens, quantized_tokens)


def verify_stage(run: Run) -> dict:
    build = read_json(run.path("manifest.json"))["stages"].get("build") or {}
    key = digest("verify", run.records.key("export"), run.records.details("calibrate"),
                 {k: v for k, v in build.items() if k != "machine"},  # a plan built or not, not where build ran
                 VERIFY_CHECKS)
    if up_to_date(run, "verify", key):
        return read_json(run.path(VERIFICATION))
    plan = QuantPlan.from_json(read_json(run.path(PLAN)))
    evaluation = np.load(run.path(WINDOWS))["evaluation"]
    whole_model_notice(run, "verify")
    with scratch_folder(run.path(VERIFICATION).with_suffix(".arrays")) as folder:
        side = pytorch_side_process(run.config, folder)
        with torch_kept_out():
            accuracy, reference_vs_torch, quantized_vs_sim, floors, tokens = graph_checks(
                run, evaluation, folder, side)
    generation = generation_check(run.out, side, *tokens)  # outside: a tokenizer without tokenizer.json needs torch
    from pipeline import report_files, verify  # ONNX Runtime, Polygraphy, matplotlib: not held beside the child

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
    run.update_manifest("verify", "done", side.machine, perplexity_delta_percent=accuracy["perplexity_delta_percent"])
    report.print_headline(result, report_files.write_reports(run.out))
    return result
