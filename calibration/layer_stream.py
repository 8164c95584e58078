"""Models larger than memory: the decoder run one layer at a time over the hidden states of every window.

A layer window is the model's own class built with one decoder layer (parameters on the meta device until read),
that layer's weights read from the checkpoint, and the final norm and head replaced by identities: its "logits"
are the layer's output hidden states. The window keeps the layer's real index, so module names
(model.layers.<i>.mlp.down_proj) are the full model's, and every calibration function that takes a model
(statistics hooks, smoothing, range estimators, GPTQ) runs on it unchanged, fed hidden states instead of tokens.

Peak memory is one layer's weights, its activations for one batch, and the hidden states of the windows
(windows x seq_len x hidden x 4 bytes, updated in place layer after layer); of the embedding only the rows of the
tokens present are read.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from calibration import CalibrationError
from calibration.architectures import ArchitectureSpec
from calibration.stats import AbsmaxObserver, check_finite, observing, quantizable_linears, run_windows


class WeightReader(Protocol):
    """Reads a checkpoint's float tensors a module at a time (pipeline/layer_reader.py: safetensors, GGUF)."""

    config: object  # the transformers config of the whole model

    def read(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every float32 tensor named `prefix.<rest>`, keyed by <rest>."""

    def rows(self, name: str, index: np.ndarray) -> torch.Tensor:
        """Rows `index` (sorted, unique) of the 2-D tensor `name`, float32, without reading the others."""


def window_model(reader: WeightReader, spec: ArchitectureSpec, index: int) -> torch.nn.Module:
    """The model with only decoder layer `index`, its weights read; maps that layer's input hidden states to its
    output hidden states."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(reader.config)
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):  # sliding-window and full-attention layers alternate in some models
        config.layer_types = [reader.config.layer_types[index]]
    with init_empty_weights():  # parameters on meta, buffers (rotary frequencies) computed on CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    layers = model.get_submodule(spec.layers)
    layer = layers[0]
    layers._modules = {str(index): layer}  # ModuleList stores children by name: keep the real index
    for name in (spec.final_norm, spec.head):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, torch.nn.Identity())
    for name, tensor in reader.read(f"{spec.layers}.{index}").items():
        set_module_tensor_to_device(layer, name, "cpu", value=tensor)
    missing = [n for n, p in layer.named_parameters() if p.is_meta]
    if missing:
        raise CalibrationError(f"the checkpoint has no tensor {spec.layers}.{index}.{missing[0]}: the model file is "
                               "incomplete; download or convert it again")
    return model.eval()


@torch.no_grad()
def embed(reader: WeightReader, spec: ArchitectureSpec, windows: np.ndarray) -> np.ndarray:
    """[windows, seq_len, hidden] float32 input hidden states of the first layer. Only the embedding rows of the
    tokens present are read: the whole table can be as large as a layer (or several, with a big vocabulary)."""
    tokens, positions = np.unique(windows, return_inverse=True)
    rows = reader.rows(f"{spec.embedding}.weight", tokens)
    return torch.nn.functional.embedding(torch.from_numpy(positions.reshape(windows.shape)), rows).numpy()


def layer_windows(reader: WeightReader, spec: ArchitectureSpec, desc: str) -> Iterator[torch.nn.Module]:
    """Each decoder layer's window in order, one in memory at a time (the caller drops it before the next)."""
    for index in tqdm(range(reader.config.num_hidden_layers), desc=desc, unit="layer"):
        yield window_model(reader, spec, index)


@torch.no_grad()
def advance(model: torch.nn.Module, hidden: np.ndarray, batch_size: int) -> None:
    """Replace the hidden states by the window's outputs, batch by batch, in place."""
    for start in range(0, len(hidden), batch_size):
        hidden[start : start + batch_size] = run_windows(model, hidden[start : start + batch_size]).logits.numpy()


def streamed_input_absmax(reader: WeightReader, spec: ArchitectureSpec, windows: np.ndarray,
                          batch_size: int) -> dict[str, torch.Tensor]:
    """collect_input_absmax of the whole model, computed one layer at a time: the same batches through the same
    layers, so the same statistics."""
    observer = AbsmaxObserver()
    hidden = embed(reader, spec, windows)
    for model in layer_windows(reader, spec, "calibrating layer by layer"):
        with observing(quantizable_linears(model, spec), observer):
            advance(model, hidden, batch_size)
    check_finite(observer.absmax)
    return observer.absmax
