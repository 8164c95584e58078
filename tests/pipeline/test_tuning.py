"""Alpha modes and range estimators through the CLI (calibrate + quantize on a tiny local model)."""

import json

import numpy as np
import pytest
import torch

from calibration.alpha_search import DEFAULT_GRID
from calibration.architectures import LLAMA_FAMILY
from calibration.gptq import load_quantized
from pipeline import stages
from pipeline.budget import perplexity_delta_bound
from pipeline.cli import config_from, parser, run
from pipeline.run import Run
from tests.pipeline.test_cli import SMALL


def quantize(model_dir, out, corpus, *extra):
    common = ["--model", str(model_dir), "--out", str(out), "--calib", str(corpus), *SMALL, *extra]
    assert run(["calibrate", *common]) == 0
    assert run(["quantize", *common]) == 0
    return json.loads((out / "quant_plan.json").read_text()), json.loads((out / "alpha_choice.json").read_text())


def test_auto_alpha_writes_each_groups_choice_into_the_plan(tiny_model_dir, corpus, tmp_path):
    plan, choice = quantize(tiny_model_dir, tmp_path, corpus, "--alpha", "auto")
    assert plan["alpha"] == "auto" and choice["mode"] == "auto"
    assert len(choice["groups"]) == 2 * 4  # two layers, four smoothing groups each
    by_module = {m["name"]: m for m in plan["modules"]}
    for key, group in choice["groups"].items():
        assert group["alpha"] in DEFAULT_GRID
        assert group["error"] == min(group["error_at"].values())
    layer = "model.layers.1"
    for consumer in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert by_module[f"{layer}.{consumer}"]["alpha"] == choice["groups"][f"{layer}.input_layernorm"]["alpha"]
    assert by_module[f"{layer}.mlp.down_proj"]["alpha"] == choice["groups"][f"{layer}.mlp.up_proj"]["alpha"]


def test_grid_alpha_picks_the_lowest_holdout_perplexity(tiny_model_dir, corpus, tmp_path):
    plan, choice = quantize(tiny_model_dir, tmp_path, corpus, "--alpha", "grid")
    scores = {float(a): p for a, p in choice["holdout_perplexity"].items()}
    assert choice["alpha"] == min(scores, key=scores.get)
    assert len(scores) == 8 and choice["holdout_windows"] == 4
    assert {m["alpha"] for m in plan["modules"] if m["smoothed"]} == {choice["alpha"]}


def test_percentile_ranges_clip_and_are_recorded(tiny_model_dir, corpus, tmp_path):
    by_max, _ = quantize(tiny_model_dir, tmp_path / "max", corpus)
    clipped, _ = quantize(tiny_model_dir, tmp_path / "p99", corpus, "--range-estimator", "percentile",
                          "--percentile", "99")
    assert by_max["range_estimator"] == "max" and clipped["range_estimator"] == "percentile"
    pairs = [(a["input_absmax"], b["input_absmax"]) for a, b in zip(by_max["modules"], clipped["modules"])
             if a["status"] == "quantized"]
    assert all(p <= m for m, p in pairs) and any(p < 0.9 * m for m, p in pairs)


def test_weight_clipping_is_recorded_and_stored(tiny_model_dir, corpus, tmp_path):
    argv = ["--alpha", "0.8", "--weight-clip", "mse"]
    plan, _ = quantize(tiny_model_dir, tmp_path, corpus, *argv)
    weights = load_quantized(tmp_path / "quantized_weights.safetensors")
    quantized = [m for m in plan["modules"] if m["status"] == "quantized"]
    assert len(quantized) == 14 and all(0.5 <= m["clip_ratio_mean"] <= 1.0 for m in quantized)
    assert sum(m["clipped_rows"] for m in quantized) > 0  # the tiny model has rows worth clipping
    args = parser().parse_args(["quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--calib",
                                str(corpus), *SMALL, *argv])
    smoothed, _ = stages.smoothed_model(Run(config_from(args)))
    for m in quantized:
        q, w = weights[m["name"]], smoothed.get_submodule(m["name"]).weight
        row_max = w.abs().amax(dim=1) / 127
        clipped = q.scales[:, 0] < row_max * (1 - 1e-6)
        assert int(clipped.sum()) == m["clipped_rows"]  # the stored scales are the clipped ones
        assert torch.all(q.scales[:, 0] <= row_max * (1 + 1e-6))


@pytest.mark.parametrize("argv, message", [
    (["--alpha", "best"], "ALPHA must be a number within [0, 1], 'auto' or 'grid' (got 'best')"),
    (["--percentile", "0"], "percentile must be within (0, 100]"),
    (["--holdout-windows", "0"], "holdout_windows must be at least 1"),
    (["--accuracy-budget", "kl:-1"], "--accuracy-budget 'kl:-1' is not a target: write ppl:<percent>"),
    (["--accuracy-budget", "top1:99"], "--accuracy-budget 'top1:99' is not a target"),
    (["--weight-clip", "mse", "--quant", "w8a8-gptq"], "--weight-clip mse applies to the round-to-nearest INT8 weights"),
])
def test_bad_tuning_options_are_one_line_errors(tiny_model_dir, corpus, tmp_path, capsys, argv, message):
    code = run(["quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--calib", str(corpus), *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# A perplexity budget is held to the delta's upper bound over the holdout windows, a KL budget to the KL itself.
@pytest.mark.parametrize("budget, metric", [("0.05", "perplexity_delta_bound_percent"), ("kl:0.00003", "kl_mean")])
def test_accuracy_budget_keeps_the_costliest_groups_float_until_met(tiny_model_dir, corpus, tmp_path, budget, metric):
    # naive W8A8 on the planted outlier channels: the budget has work to do
    plan, _ = quantize(tiny_model_dir, tmp_path, corpus, "--no-smooth", "--accuracy-budget", budget)
    evidence = json.loads((tmp_path / "accuracy_budget.json").read_text())
    limit = float(budget.rpartition(":")[2])
    assert evidence["target"] == {"0.05": "ppl:0.05", "kl:0.00003": "kl:3e-05"}[budget]  # normalised
    assert len(evidence["unit_cost"]) == 2 * 4
    assert evidence["all_quantized"][metric] > limit  # the budget had work to do
    assert evidence["judged_by"] == metric
    costs = evidence["unit_kl_cost"]  # KL orders the units whatever the target: the gain that transfers
    assert evidence["kept_float"] == sorted(costs, key=costs.get, reverse=True)[: len(evidence["kept_float"])]
    assert evidence["kept_float"]  # the budget kept something float
    assert evidence["final"] == {k: v for k, v in evidence["steps"][-1].items() if k != "float"}
    assert evidence["met"] == (evidence["final"][metric] <= limit)
    # each step floats one more group and is re-scored; the last step is the first to meet the budget
    assert [s[metric] <= limit for s in evidence["steps"]][:-1] == [False] * (len(evidence["steps"]) - 1)
    skipped = {m["name"] for m in plan["modules"] if m["reason"].startswith("accuracy budget")}
    consumers = {g.producer: g.consumers for g in LLAMA_FAMILY.groups}
    expected = set()
    for unit in evidence["kept_float"]:
        layer, producer = unit.split(".", 3)[:3], unit.split(".", 3)[3]
        expected |= {".".join(layer) + "." + c for c in consumers[producer]}
    assert skipped == expected
    # what is kept float ships float: no integer weights saved, no weight fields in the plan
    weights = load_quantized(tmp_path / "quantized_weights.safetensors")
    assert set(weights) == {m["name"] for m in plan["modules"] if m["status"] == "quantized"}
    assert all(m["weight_bits"] is None and m["clip_ratio_mean"] is None for m in plan["modules"] if m["name"] in skipped)


def test_a_budget_already_met_keeps_everything_quantized(tiny_model_dir, corpus, tmp_path):
    plan, _ = quantize(tiny_model_dir, tmp_path, corpus, "--accuracy-budget", "kl:1000")
    evidence = json.loads((tmp_path / "accuracy_budget.json").read_text())
    assert evidence["kept_float"] == [] and evidence["unit_cost"] == {} and evidence["met"]
    assert evidence["final"] == evidence["all_quantized"] and evidence["all_quantized"]["kl_mean"] > 0
    assert all(m["status"] == "quantized" for m in plan["modules"] if m["name"].startswith("model.layers"))


def test_perplexity_bound_widens_with_the_spread_between_windows():
    reference = np.log(np.array([20.0, 30.0, 25.0, 40.0]))
    even = reference + np.log(1.01)  # every window exactly 1% worse: no spread, the bound is the point value
    assert perplexity_delta_bound(even, reference) == pytest.approx(1.0)
    uneven = reference + np.log(np.array([1.0, 1.02, 0.99, 1.03]))  # the same mean log ratio, spread over windows
    assert perplexity_delta_bound(uneven, reference) > 1.0 + 1.645 * 0.4  # mean + z * (std / sqrt(4)), std ~1.8%
    assert perplexity_delta_bound(uneven[:1], reference[:1]) == np.inf  # one window: no spread measured, no bound
