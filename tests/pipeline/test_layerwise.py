"""Layer-wise diff, outlier analysis, reports from saved artifacts and --bisect, on a tiny model run end to end."""

import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from calibration.gptq import load_quantized
from calibration.plan import QuantPlan
from calibration.quant import fake_quantized
from pipeline import report, stages
from pipeline.artifacts import SavedArrays, read_json
from pipeline.cli import config_from, parser, run
from pipeline.layer_faithfulness import save_graph_states, simulate
from pipeline.layerwise import layerwise_diff
from pipeline.run import (FAITHFULNESS_WINDOWS, LAYERWISE, LAYERWISE_CHANNELS, PLAN, QUANTIZED, REFERENCE,
                          VERIFICATION, WEIGHTS, WINDOWS, Run)
from pipeline.simulation import pytorch_side, save_float_weights
from pipeline.verify_stage import output_factors
from tests.pipeline.test_cli import SMALL, assert_one_line_error, engine

LAYER_1_O_PROJ = "model.layers.1.self_attn.o_proj"
LAYER_0_GATE = "model.layers.0.mlp.gate_proj"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, corpus):
    out = tmp_path_factory.mktemp("run")
    assert engine(tiny_model_dir, out, corpus) == 0
    return out


@pytest.fixture(scope="module")
def diff_inputs(finished, tiny_model_dir, corpus, tmp_path_factory):
    """Everything layerwise_diff needs besides the graphs, as the verify stage builds it."""
    args = parser().parse_args(["verify", "--model", str(tiny_model_dir), "--out", str(finished),
                                "--calib", str(corpus), *SMALL])
    current = Run(config_from(args))
    model, _ = stages.smoothed_model(current)
    plan = QuantPlan.from_json(read_json(finished / PLAN))
    windows = np.load(finished / WINDOWS)["evaluation"]
    float_weights = SavedArrays(tmp_path_factory.mktemp("weights"))
    save_float_weights(model, [m.name for m in plan.quantized()], float_weights)
    return windows, float_weights, output_factors(finished, float_weights)


def corrupted_copy(out, tmp_path, initializer: str, change) -> "Path":
    graph = ir.load(out / QUANTIZED)
    value = graph.graph.initializers[initializer]
    array = value.const_value.numpy()
    value.const_value = ir.tensor(change(array).astype(array.dtype), name=initializer)
    path = tmp_path / "corrupted.onnx"
    ir.save(graph, path)
    return path


def test_a_healthy_graph_has_no_large_error_and_every_module_is_measured(finished):
    lw = read_json(finished / LAYERWISE)
    assert lw["first_large_error"] is None
    assert not list(finished.glob(".*"))  # the float weights the diff read back are gone with the stage
    assert len(lw["gemms"]) == 14 and [b["layer"] for b in lw["blocks"]] == ["model.layers.0", "model.layers.1"]
    # Execution order: layer 0's attention before its MLP, before layer 1.
    assert lw["gemms"][0]["module"] == "model.layers.0.self_attn.q_proj"
    assert lw["gemms"][-1]["module"] == "model.layers.1.mlp.down_proj"
    assert all(g["local_snr_db"] > 20 for g in lw["gemms"])  # INT8 rounding of a smoothed GEMM: tens of dB
    # The error accumulated at a GEMM's output is at least what the first GEMM alone adds, and it grows.
    assert lw["blocks"][1]["snr_db"] < lw["blocks"][0]["snr_db"]


@pytest.mark.parametrize("initializer, change, culprit", [
    (f"{LAYER_1_O_PROJ}.input_scale", lambda scale: scale * 100, LAYER_1_O_PROJ),
    (f"{LAYER_0_GATE}.weight_quantized", lambda codes: -codes.astype(np.int16).clip(-127, 127), LAYER_0_GATE),
], ids=["activation scale x100", "negated weight"])
def test_the_layerwise_diff_names_the_corrupted_layer(finished, diff_inputs, tmp_path, initializer, change, culprit):
    windows, float_weights, factors = diff_inputs
    corrupted = corrupted_copy(finished, tmp_path, initializer, change)
    found, _ = layerwise_diff(finished / REFERENCE, corrupted, windows, float_weights, factors)
    # Its marked graphs and saved probes are gone from beside both graphs.
    assert not [path for folder in (finished, corrupted.parent) for pattern in (".layerwise*", ".marked*")
                for path in folder.glob(pattern)]
    assert found["first_large_error"] == culprit
    row = next(g for g in found["gemms"] if g["module"] == culprit)
    assert row["local_snr_db"] < found["large_error_threshold_db"]
    # Every GEMM before the culprit in execution order is as clean as in the healthy graph.
    healthy = {g["module"]: g["local_snr_db"] for g in read_json(finished / LAYERWISE)["gemms"]}
    for g in found["gemms"][: [x["module"] for x in found["gemms"]].index(culprit)]:
        assert g["local_snr_db"] == pytest.approx(healthy[g["module"]], abs=0.01)


LAYERS = ["model.layers.0", "model.layers.1"]


@pytest.fixture(scope="module")
def simulation(finished, tiny_model_dir, corpus):
    """The PyTorch fake-quant simulation of the finished run, as verify builds it."""
    args = parser().parse_args(["verify", "--model", str(tiny_model_dir), "--out", str(finished),
                                "--calib", str(corpus), *SMALL])
    model, _ = stages.smoothed_model(Run(config_from(args)))
    plan = QuantPlan.from_json(read_json(finished / PLAN))
    with fake_quantized(model, plan, load_quantized(finished / WEIGHTS)):
        yield model


def clean(snr_db: float | None) -> bool:
    """Float-precision agreement (None: identical); the verdict's threshold is 27 dB."""
    return snr_db is None or snr_db > 50


def layer_by_layer(graph: Path, simulated, windows, tmp_path) -> dict:
    saved = SavedArrays(tmp_path / "graph_states")
    save_graph_states(graph, LAYERS, windows, saved)
    return simulate(simulated, LAYERS, windows, saved)


def test_verify_holds_every_layer_and_the_logits_to_the_simulation_fed_the_graph_inputs(finished):
    faithfulness = read_json(finished / VERIFICATION)["export_faithfulness"]
    found = faithfulness["quantized_onnx_vs_pytorch_fake_quant"]["layer_by_layer"]
    assert [r["layer"] for r in found["layers"]] == LAYERS and found["windows"] == 2
    # The tiny graph computes the simulation to float precision: far above the 0.999 threshold.
    assert found["update_cosine_min"] > 0.99999 and found["logits"]["cosine_min"] > 0.99999
    assert all(clean(snr) for snr in (found["update_snr_db_min"], found["logits"]["snr_db"]))
    assert found["logits"]["top1_agreement"] == 1.0
    assert faithfulness["faithful"] is True
    assert "layer by layer: logits" in (finished / "report.md").read_text()


@pytest.mark.parametrize("initializer, change, culprit, along_the_signal", [
    (f"{LAYER_1_O_PROJ}.input_scale", lambda scale: scale * 100, "model.layers.1", False),
    (f"{LAYER_0_GATE}.weight_quantized", lambda codes: -codes.astype(np.int16).clip(-127, 127), "model.layers.0",
     False),
    (f"{LAYER_1_O_PROJ}.weight_scale", lambda scale: scale * 1.2, "model.layers.1", True),
], ids=["activation scale x100", "negated weight", "weight scales x1.2"])
def test_layer_by_layer_names_the_layer_the_export_got_wrong_and_no_other(finished, simulation, tmp_path,
                                                                         initializer, change, culprit,
                                                                         along_the_signal):
    windows = np.load(finished / WINDOWS)["evaluation"]
    found = layer_by_layer(corrupted_copy(finished, tmp_path, initializer, change), simulation, windows, tmp_path)
    assert not list(tmp_path.glob(".marked*"))  # the marked graph goes with its session
    assert found["least_faithful_layer"] == culprit
    rows = {r["layer"]: r for r in found["layers"]}
    assert rows[culprit]["update_snr_db"] < report.faithful_snr_db(report.FAITHFUL_COSINE)
    # A gain error leaves the update's direction almost as it was: the cosine alone would pass it, the SNR does not.
    assert (rows[culprit]["update_cosine"] >= report.FAITHFUL_COSINE) == along_the_signal
    # Fed the corrupted graph's own input, the other layer still matches: the error is not carried forward.
    others = [r for layer, r in rows.items() if layer != culprit]
    assert others and all(r["update_cosine"] > 0.99999 and clean(r["update_snr_db"]) for r in others)
    quantized_vs_sim = {**read_json(finished / VERIFICATION)["export_faithfulness"][
        "quantized_onnx_vs_pytorch_fake_quant"], "layer_by_layer": found}  # end to end as the healthy run's
    assert report.faithful(quantized_vs_sim) is False


def test_report_from_a_verification_made_before_the_layer_by_layer_check(finished, tmp_path):
    """`make report` on an OUT verified by an earlier version: the report states the rule that OUT was judged by."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    verification = read_json(out / VERIFICATION)
    faithfulness = verification["export_faithfulness"]
    del faithfulness["quantized_onnx_vs_pytorch_fake_quant"]["layer_by_layer"], faithfulness["threshold_layer_snr_db"]
    (out / VERIFICATION).write_text(json.dumps(verification))
    assert run(["report", "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "layer by layer" not in md and "Q/DQ faithful (cosine min >= 0.999, or mean deviation" in md


def test_report_from_saved_artifacts_has_figures_outliers_and_the_layer_table(finished, capsys):
    for name in ("report.json", "report.md", "report.html"):
        (finished / name).unlink()
    assert run(["report", "--out", str(finished)]) == 0
    report = json.loads((finished / "report.json").read_text())
    assert report["report_version"] == 1 and report["bisect"] is None and report["tensorrt_layers"] is None
    html = (finished / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "report_figures/" not in html
    md = (finished / "report.md").read_text()
    assert "| model.layers.1.mlp.down_proj |" in md and "First large error" in md
    for name in ("error_by_layer", "activation_outliers", "weight_ranges", "worst_channels"):
        assert (finished / "report_figures" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    # The tiny model has 40x input_layernorm channels: smoothing must flatten the q/k/v input and steepen weights.
    rows = {r["module"]: r for r in report["outliers"]["modules"]}
    for layer in (0, 1):
        q = rows[f"model.layers.{layer}.self_attn.q_proj"]
        assert q["activation_max_median_after"] < q["activation_max_median_before"] / 2
        assert q["weight_max_median_after"] > q["weight_max_median_before"]
        assert {c["channel"] for c in q["top_channels"][:3]} == {0, 1, 2}
    a = report["accuracy"]
    for key in ("next_token_top5_agreement", "next_token_kl_mean", "logits_snr_db", "logits_mean_abs_error"):
        assert a[key] is not None
    assert report["export_faithfulness"]["reference_within_float_tolerance"] is True
    floors = report["precision_floors"]  # FP16 arithmetic moves a W8A8 graph more than a float one
    assert floors["quantized"]["kl_mean"] > floors["float"]["kl_mean"] > 0


def test_bisect_finds_an_exclusion_list_that_the_rerun_meets(finished, tiny_model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    all_quantized = read_json(out / VERIFICATION)["accuracy"]["next_token_kl_mean"]
    target = 0.6 * all_quantized  # INT8 weights alone (every activation float) leave ~40% of it on this model
    assert run(["report", "--out", str(out), "--bisect", f"kl:{target}"]) == 0
    found = read_json(out / "bisect.json")
    assert found["met"] and 0 < len(found["exclusions"]) < 14
    assert found["steps"][0]["count"] == 0 and found["steps"][0]["value"] > target
    listed = (out / "float_modules.txt").read_text().split()
    assert listed == found["exclusions"]
    assert "Bisect" in (out / "report.md").read_text()
    assert engine(tiny_model_dir, out, corpus, "--skip-file", str(out / "float_modules.txt")) == 0
    plan = read_json(out / PLAN)
    assert {m["name"] for m in plan["modules"] if m["status"] == "skipped"} == set(listed)
    assert read_json(out / VERIFICATION)["accuracy"]["next_token_kl_mean"] <= target


def test_bad_bisect_target_and_missing_skip_file_fail_in_one_line(finished, tiny_model_dir, corpus, capsys, tmp_path):
    assert_one_line_error(capsys, run(["report", "--out", str(finished), "--bisect", "accuracy:1"]),
                          "not a target", "ppl:")
    assert_one_line_error(capsys, engine(tiny_model_dir, tmp_path / "x", corpus, "--skip-file", "nope.txt"),
                          "--skip-file nope.txt does not exist")
    assert_one_line_error(capsys, run(["report", "--out", str(tmp_path)]), "run `make engine")


def test_the_tensorrt_comparison_feed_with_a_reserved_slot_gives_the_same_logits(finished):
    """verify.compare_plan feeds a plan's prefill profile one masked reserved slot; ONNX Runtime on that feed must
    give the logits of the plain feed, or the plan comparison would measure the feed, not the plan."""
    from exporters.decoder_io import DecoderShape
    from pipeline.verify import onnx_session

    shape = DecoderShape.from_onnx_file(finished / QUANTIZED)
    session = onnx_session(finished / QUANTIZED)
    window = np.load(finished / WINDOWS)["evaluation"][:1]
    plain = session.run(["logits"], shape.prefill_feed(window))[0]
    reserved = session.run(["logits"], shape.prefill_feed(window, np.float32, reserved_slots=1))[0]
    np.testing.assert_allclose(reserved, plain, atol=1e-5, rtol=0)


def test_weight_channels_after_smoothing_are_the_exported_int8_weights(finished):
    """The outlier analysis reads weights from the graphs: per-channel INT8 through DequantizeLinear must give back
    the integer weights quantize saved, dequantized."""
    from calibration.gptq import load_quantized

    channels = np.load(finished / LAYERWISE_CHANNELS)
    for name, weight in load_quantized(finished / WEIGHTS).items():
        expected = weight.dequantize().abs().amax(dim=0).numpy()  # [out, in] -> per input channel
        np.testing.assert_allclose(channels[f"{name}/weight_after"], expected, rtol=1e-6)


def test_the_diff_in_passes_of_one_layer_equals_the_diff_in_one_pass(finished, diff_inputs, monkeypatch):
    windows, float_weights, factors = diff_inputs
    whole, whole_channels = layerwise_diff(finished / REFERENCE, finished / QUANTIZED, windows,
                                           float_weights, factors)
    monkeypatch.setattr("pipeline.layerwise.LAYERS_PER_PASS", 1)  # two passes: layer 0, then layer 1
    passes, passes_channels = layerwise_diff(finished / REFERENCE, finished / QUANTIZED, windows,
                                             float_weights, factors)
    assert passes == whole  # same GEMMs in the same order, same block drops across the pass boundary
    assert passes["blocks"][1]["snr_drop_db"] is not None
    assert set(passes_channels) == set(whole_channels)
    for key, value in whole_channels.items():
        np.testing.assert_array_equal(passes_channels[key], value)


def test_a_later_pass_runs_only_its_blocks_fed_the_previous_block_output(finished, diff_inputs):
    """The cut graph a pass runs: its probes are its only outputs, the previous block's output is an input, and no
    linear of an earlier block, final norm or lm_head is left, nor the embedding's weight."""
    from exporters.naming import module_of_node
    from exporters.probes import find_probes, probe_subgraph

    model = ir.load(finished / QUANTIZED)
    embedding = [name for name in model.graph.initializers if "embed_tokens" in name]
    probes = find_probes(model, list(diff_inputs[1]))
    block_0, block_1 = probes.block_outputs.values()
    wanted = probes.subset([m for m in probes.gemm_outputs if m.startswith("model.layers.1.")]).names()
    probe_subgraph(model, wanted, (block_0, np.float32))
    assert [v.name for v in model.graph.outputs] == wanted and block_1 in wanted
    assert block_0 in [v.name for v in model.graph.inputs] and len(model.graph.inputs) > 1
    scopes = {module_of_node(node.name) for node in model.graph}  # layer 0's attention scope builds the mask
    earlier = [m for m in probes.gemm_outputs if m.startswith("model.layers.0.")] + ["lm_head", "model.norm"]
    assert earlier[0] and not scopes & set(earlier)
    assert embedding and not set(embedding) & set(model.graph.initializers)


def test_saved_arrays_read_back_what_was_written_in_order(tmp_path):
    weights = {"b.proj": np.arange(12, dtype=np.float32).reshape(3, 4).T, "a.proj": np.ones((2, 5), np.float32)}
    saved = SavedArrays(tmp_path)
    saved.update(weights)
    assert list(saved) == ["b.proj", "a.proj"] and len(saved) == 2 and "a.proj" in saved and "c" not in saved
    for name, weight in weights.items():
        np.testing.assert_array_equal(saved[name], weight)
    with pytest.raises(KeyError):
        saved["c"]
    saved["b.proj"] = np.zeros(3, np.float32)  # rewritten in place, keeping its position
    del saved["a.proj"]
    assert list(saved) == ["b.proj"] and sorted(p.name for p in tmp_path.iterdir()) == ["b.proj.npy"]
    np.testing.assert_array_equal(saved["b.proj"], 0)
    saved.clear()
    assert len(saved) == 0 and not list(tmp_path.iterdir())


def test_verify_opens_one_onnx_runtime_session_at_a_time_once_per_graph(finished, tiny_model_dir, corpus,
                                                                        monkeypatch):
    """Each graph's session (its weights and arena) is gone before the next one opens: side by side, sessions set
    verify's peak memory (the accuracy check, the layer-wise diff and the precision floors each used two). And each
    graph is opened once for all its checks: a session costs seconds to create on a real model."""
    from pipeline import metrics, verify

    live, overlaps, opened, create = weakref.WeakKeyDictionary(), [], [], verify.onnx_session
    compared_beside, add = [], metrics.PairStats.add

    def tracked(path, *args, **kwargs):
        if len(live):
            overlaps.append(Path(path).name)
        opened.append(Path(path).name)
        session = create(path, *args, **kwargs)
        live[session] = Path(path).name
        return session

    def comparison(self, baseline, candidate):
        compared_beside.extend(live.values())
        return add(self, baseline, candidate)

    monkeypatch.setattr(verify, "onnx_session", tracked)
    monkeypatch.setattr(metrics.PairStats, "add", comparison)
    (finished / "stages" / "verify.json").unlink()
    assert run(["verify", "--model", str(tiny_model_dir), "--out", str(finished), "--calib", str(corpus), *SMALL]) == 0
    assert overlaps == []
    graphs = ("reference.onnx", "quantized.onnx", "reference.fp16.onnx", "quantized.fp16.onnx")
    # The Q/DQ graph marked for the layer-by-layer comparison runs in the PyTorch side's process (before its models
    # load); here each graph once, then the layer-wise diff's marked pair (one pass for 2 layers).
    assert opened == [*graphs, ".marked-reference.onnx", ".marked-quantized.onnx"]
    # Logits are compared beside the Q/DQ graph's session only (its accuracy against the saved reference, streamed):
    # the reference's and the FP16 graphs' logits wait on disk until their session has closed.
    assert set(compared_beside) == {"quantized.onnx"}
    assert not [p for p in finished.iterdir() if p.name.startswith(".")]  # scratch folders removed with the stage


def test_the_simulation_runs_without_the_float_weights_its_integer_codes_replace(finished, tiny_model_dir, corpus,
                                                                                monkeypatch, tmp_path):
    """Verify's fake-quant simulation computes from the integer codes: the quantized linears' float weights (SmolLM2:
    425 MB) are freed before it, and it still matches the Q/DQ graph at float level, layer by layer."""
    seen = {}

    def recording(model, plan, weights=None):
        seen.update({m.name: model.get_submodule(m.name).weight.numel() for m in plan.quantized()})
        return fake_quantized(model, plan, weights)

    monkeypatch.setattr("pipeline.simulation.fake_quantized", recording)
    args = parser().parse_args(["verify", "--model", str(tiny_model_dir), "--out", str(finished),
                                "--calib", str(corpus), *SMALL])
    plan = QuantPlan.from_json(read_json(finished / PLAN))
    windows = np.load(finished / WINDOWS)["evaluation"][: FAITHFULNESS_WINDOWS]
    side = pytorch_side(Run(config_from(args)), plan, windows, tmp_path, LAYERS)
    assert seen and set(seen.values()) == {0}
    assert side.layer_by_layer["logits"]["cosine_min"] > 0.99999
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph_states", "logits", "weights"]
    assert not list((tmp_path / "graph_states").iterdir())  # deleted once compared
    # What the verify stage's process reads back is what the side says it saved, one array per window or module.
    assert len(side.float_logits) == len(side.simulated_logits) == len(windows)
    assert side.float_weights == [m.name for m in plan.quantized()]
    assert sorted(p.stem for p in (tmp_path / "logits").iterdir()) == sorted(side.float_logits + side.simulated_logits)
    assert sorted(p.stem for p in (tmp_path / "weights").iterdir()) == sorted(side.float_weights)


def test_verify_from_the_command_line_runs_its_graph_checks_without_torch(finished, tiny_model_dir, corpus):
    """`python -m pipeline verify` imports neither torch nor transformers itself: the PyTorch side runs in a child
    process, and a torch import beside the sessions would cost ~0.3 GB (2.5x-the-model target, issue 7). The
    parent's imports are listed by -X importtime, which its child does not inherit."""
    import re
    import subprocess
    import sys

    (finished / "stages" / "verify.json").unlink()
    before = read_json(finished / VERIFICATION)
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline", "verify", "--model",
                           str(tiny_model_dir), "--out", str(finished), "--calib", str(corpus), *SMALL],
                          capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    imported = re.findall(r"^import time:.*\|\s+(\S+)$", done.stderr, re.M)
    assert "onnxruntime" in imported and "torch" not in imported and "transformers" not in imported
    after = read_json(finished / VERIFICATION)
    for check in ("accuracy", "export_faithfulness"):
        assert json.dumps(after[check], sort_keys=True) == json.dumps(before[check], sort_keys=True), check
