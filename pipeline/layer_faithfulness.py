"""Export faithfulness layer by layer: every decoder layer of the Q/DQ graph against the same layer of the PyTorch
fake-quant simulation, both given the graph's own input to that layer.

End to end, the two cannot agree closely on a W8A8 model with per-tensor activation scales: a float difference
of 1e-7 (another summation order) flips a rounding at some Q node, the flipped step is multiplied by a smoothed
weight, and the next layers' Q nodes flip further. On SmolLM2 the simulation run with two float-equivalent
attention kernels agrees with itself only to a logits cosine of ~0.993, as the graph agrees with it. Fed the
graph's input at every layer, a flip can no longer travel: each layer is held to the cosine threshold on its
own, and the logits are the simulation's last layer and head on the graph's hidden state. A layer that computes
something else (a wrong scale, axis or weight in the export) stands out as that layer.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.layerwise import TensorError, fetch
from pipeline.metrics import PairStats
from pipeline.verify import marked_graph


def save_graph_states(path: Path, layers: list[str], windows: np.ndarray, saved: MutableMapping) -> None:
    """The graph's logits (`logits<i>`) and the output of each decoder block in `layers` (`blocks<i>`: [layers,
    batch, positions, hidden]) on each window, saved for `simulate`, which runs once the session is closed."""
    import onnx_ir as ir

    from exporters.probes import block_outputs

    blocks = block_outputs(ir.load(path), set(layers))
    names = [blocks[layer] for layer in layers]
    with marked_graph(path, names) as graph:
        for i, window in enumerate(tqdm(windows, desc=f"{path.name}, every block's output", unit="window")):
            got = fetch(graph, window, ["logits", *names])
            saved[f"logits{i}"] = got.pop("logits")
            saved[f"blocks{i}"] = np.stack(list(got.values()))
            del got  # not beside the next window's run (verify.py's note)


@contextmanager
def fed_graph_inputs(layers: list[torch.nn.Module], graph_blocks: np.ndarray, inputs: list, outputs: list):
    """Hooks on the decoder layers: each layer after the first reads the graph's output of the previous block in
    place of the previous simulated layer's; what each layer read and returned is appended to inputs / outputs."""

    def feed(k: int):
        def hook(module, args, kwargs):
            hidden = torch.from_numpy(graph_blocks[k - 1]) if k else (args[0] if args else kwargs["hidden_states"])
            inputs.append(hidden)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}
        return hook

    def keep(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [h for k, layer in enumerate(layers)
               for h in (layer.register_forward_pre_hook(feed(k), with_kwargs=True), layer.register_forward_hook(keep))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def simulate(model: torch.nn.Module, layers: list[str], windows: np.ndarray, saved: MutableMapping) -> dict:
    """The fake-quant `model` with each layer fed the graph's input to it (the graph states save_graph_states kept in
    `saved`), against the graph. Per layer, the update it adds to the residual stream (block output minus block
    input: the input is the same on both sides, and comparing whole outputs would credit the layer with the stream
    it was handed); and the logits."""
    modules = [model.get_submodule(name) for name in layers]
    updates = {name: TensorError() for name in layers}
    logits = PairStats()
    for i, window in enumerate(tqdm(windows, desc="PyTorch fake-quant, layer by layer", unit="window")):
        graph_blocks, inputs, outputs = saved[f"blocks{i}"], [], []
        with fed_graph_inputs(modules, graph_blocks, inputs, outputs), torch.no_grad():
            simulated = model(input_ids=torch.from_numpy(window[None, :]), use_cache=False).logits.numpy()
        logits.add(simulated, saved[f"logits{i}"])
        for name, x, y_sim, y_graph in zip(layers, inputs, outputs, graph_blocks):
            x = x.numpy()
            updates[name].add(y_sim.numpy() - x, y_graph - x)
        del graph_blocks, inputs, outputs, simulated  # not beside the next window's forward (verify.py's note)
    rows = [{"layer": name, "update_cosine": float(e.cosine()), "update_snr_db": e.snr_db()}
            for name, e in updates.items()]
    snrs = [r["update_snr_db"] for r in rows if r["update_snr_db"] is not None]  # None: identical
    # Named by error power, not cosine: cosine is blind to a gain error (a wrong scale on a whole GEMM).
    least = min(rows, key=lambda r: math.inf if r["update_snr_db"] is None else r["update_snr_db"])
    return {"windows": len(windows), "logits": logits.summary(), "layers": rows,
            "update_cosine_min": min(r["update_cosine"] for r in rows), "update_snr_db_min": min(snrs, default=None),
            "least_faithful_layer": least["layer"], "identical_layers": len(rows) - len(snrs)}
