"""Verify's PyTorch side, run as `python -m pipeline.simulation FOLDER` by the verify stage (pipeline/verify_stage.py)
in a process of its own, so that the ONNX Runtime checks after it run in a process without torch.

In order, one model at a time, everything saved in FOLDER (the stage's scratch folder):
- the Q/DQ graph's decoder-block outputs on the first windows, before any model loads
  (layer_faithfulness.save_graph_states);
- the float model: its logits on the faithfulness windows (float<i>) and generate()'s greedy tokens;
- the smoothed model as the fake-quant simulation: its logits (simulated<i>) and their noise floor, and each layer
  fed the graph's input to it (layer_faithfulness.simulate); before that, each quantized linear's smoothed float
  weight for the layer-wise diff (weights/).
"""

from __future__ import annotations

import logging
import pickle
import sys
from collections.abc import MutableMapping
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from calibration.gptq import load_quantized
from calibration.plan import QuantPlan
from calibration.quant import fake_quantized
from pipeline.artifacts import SavedArrays, machine, read_json, write_json
from pipeline.memory import release_memory
from pipeline.metrics import PairStats
from pipeline.run import (FAITHFULNESS_WINDOWS, LAYER_FAITHFULNESS_WINDOWS, PLAN, QUANTIZED, WEIGHTS, WINDOWS, Run,
                          announce_memory)
from pipeline.verify_stage import FLOAT_WEIGHTS, JOB, LOGITS, TORCH_SIDE, TorchSide, decoder_layers


def torch_logits(model: torch.nn.Module, window: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(window[None, :]), use_cache=False).logits.numpy()


def save_torch_logits(model: torch.nn.Module, windows: np.ndarray, saved: MutableMapping, prefix: str,
                      label: str) -> list[str]:
    """The module's logits of each window, saved as `prefix<i>`: compared with a graph's once the model is freed.
    Returns their names, in window order."""
    names = [f"{prefix}{i}" for i in range(len(windows))]
    for name, window in zip(names, tqdm(windows, desc=label, unit="window")):
        saved[name] = torch_logits(model, window)
    return names


def save_simulation_logits(model: torch.nn.Module, windows: np.ndarray, saved: MutableMapping,
                           prefix: str) -> tuple[list[str], dict]:
    """save_torch_logits of the fake-quant model (SDPA attention), and the noise floor of that simulation: the
    same model with eager attention against them, float-equivalent and differing only in summation order.

    A W8A8 model with per-tensor activation scales is discontinuous (a 1e-6 change can flip a rounding at a
    Q node, and an outlier channel's smoothed weight turns that one-step flip into a large output change), so
    two exact implementations of one recipe differ measurably. This is the yardstick for export faithfulness.
    """
    from exporters.onnx_export import eager_attention

    floor, names = PairStats(), [f"{prefix}{i}" for i in range(len(windows))]
    for name, window in zip(names, tqdm(windows, desc="PyTorch fake-quant logits and noise floor", unit="window")):
        saved[name] = expected = torch_logits(model, window)
        with eager_attention(model):
            floor.add(expected, torch_logits(model, window))
        del expected  # not beside the next window's forward (verify.py's note)
    return names, floor.summary()


def stop_tokens(model: torch.nn.Module) -> tuple[int, ...]:
    """The end-of-sequence ids Hugging Face's generate() stops at (its generation config, else the model config)."""
    eos = getattr(model.generation_config, "eos_token_id", None) if model.generation_config else None
    eos = model.config.eos_token_id if eos is None else eos
    return () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


def torch_greedy(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Hugging Face generate(), greedy, exactly new_tokens per prompt: min_new_tokens masks the end-of-sequence
    tokens until then, as our loop does with Sampling.min_new_tokens, so every prompt compares at full length.
    The prompts go in as one left-padded batch (generate() derives positions from the mask): decoding reads every
    weight once per step whatever the batch, so one batch of 5 takes the time of one prompt (SmolLM2: 2 s, where
    one prompt at a time took 9.7 s)."""
    pad = (stop_tokens(model) or (0,))[0]
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, pad_token_id=pad)
    return generated[:, longest:].tolist()


def save_float_weights(model: torch.nn.Module, names: list[str], saved: MutableMapping) -> None:
    """The float weight of each linear in `names` (`model`: the smoothed float model; the quantized linears) in
    MatMul layout, saved under its module name for the layer-wise diff, which reads them back one at a time."""
    for name in names:
        saved[name] = model.get_submodule(name).weight.detach().numpy().T


def pytorch_side(run: Run, plan: QuantPlan, windows: np.ndarray, folder: Path, layers: list[str]) -> TorchSide:
    """The Q/DQ graph's block outputs, then the float model, then the smoothed one as the fake-quant simulation,
    one at a time; arrays kept in `folder`. `layers`: the decoder layers compared layer by layer."""
    from pipeline import layer_faithfulness
    from pipeline.stages import smoothed_model
    from pipeline.verify import GENERATED_TOKENS, GENERATION_PROMPTS

    graph_states = SavedArrays(folder / "graph_states")  # before any PyTorch model loads
    layer_faithfulness.save_graph_states(run.path(QUANTIZED), layers, windows[:LAYER_FAITHFULNESS_WINDOWS],
                                         graph_states)
    logits = SavedArrays(folder / LOGITS)
    model, tokenizer, _ = run.model()
    float_logits = save_torch_logits(model, windows, logits, "float", "PyTorch FP32 logits")
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in GENERATION_PROMPTS]
    greedy_tokens = torch_greedy(model, prompts, GENERATED_TOKENS)
    stops = stop_tokens(model)
    del model
    release_memory()
    # The simulation computes from the integer codes: the float weights they replace (SmolLM2: 425 MB) are saved for
    # the layer-wise diff, then freed before the kept weights' rounding (smoothed_model: the peak was there).
    float_weights = [m.name for m in plan.quantized()]
    model, _ = smoothed_model(run, drop=float_weights,
                              before_drop=lambda m: save_float_weights(m, float_weights,
                                                                       SavedArrays(folder / FLOAT_WEIGHTS)))
    with fake_quantized(model, plan, load_quantized(run.path(WEIGHTS))):
        simulated_logits, noise_floor = save_simulation_logits(model, windows, logits, "simulated")
        layer_by_layer = layer_faithfulness.simulate(model, layers, windows[:LAYER_FAITHFULNESS_WINDOWS], graph_states)
    graph_states.clear()
    return TorchSide(float_logits, simulated_logits, float_weights, noise_floor, layer_by_layer, prompts, greedy_tokens,
                     list(stops), machine())


def main() -> None:
    """The verify stage's child process: FOLDER holds the run configuration (job.pickle, written by the stage);
    the result goes to FOLDER/torch_side.json. Errors print in one line, with the CLI's exit codes."""
    from pipeline.cli import USER_ERRORS

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    folder = Path(sys.argv[1])
    try:
        run = Run(pickle.loads((folder / JOB).read_bytes()))
        announce_memory(run, ("verify",))
        plan = QuantPlan.from_json(read_json(run.path(PLAN)))
        windows = np.load(run.path(WINDOWS))["evaluation"][:FAITHFULNESS_WINDOWS]
        write_json(folder / TORCH_SIDE, asdict(pytorch_side(run, plan, windows, folder, decoder_layers(plan))))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
