"""Models larger than memory: the decoder run one layer at a time over the hidden states of every window.

A layer window is the model's own class built with one decoder layer (parameters on the meta device until read),
that layer's weights read from the checkpoint, and the final norm and head replaced by identities: its "logits"
are the layer's output hidden states. The window keeps the layer's real index, so module names
(model.layers.<i>.mlp.down_proj) are the full model's, and every calibration function that takes a model
(statistics hooks, smoothing, range estimators, GPTQ) runs on it unchanged, fed hidden states instead of tokens.

Peak memory is one layer's weights and its activations for one batch. The hidden states of the windows wait in a
file (HiddenStates: windows x seq_len x hidden x 4 bytes, 75 MB for SmolLM2's 64 x 512 calibration windows,
updated in place layer after layer) and are read a batch at a time; of the embedding only the rows of the tokens
present are read.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
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


@dataclass(frozen=True)
class HiddenStates:
    """[windows, seq_len, hidden] float32 hidden states in a file, read and written a slice of windows at a time:
    the slices a caller takes are the only ones in memory. A file, not a memory map: a map's pages, once touched,
    count in the process's resident memory until it is unmapped, and a layer pass touches all of them."""

    path: Path
    shape: tuple[int, int, int]

    @classmethod
    def zeros(cls, path: Path, shape: tuple[int, int, int]) -> "HiddenStates":
        with open(path, "wb") as f:
            f.truncate(4 * shape[0] * shape[1] * shape[2])
        return cls(path, shape)

    @property
    def window_items(self) -> int:
        return self.shape[1] * self.shape[2]

    def __len__(self) -> int:
        return self.shape[0]

    def _span(self, key: slice) -> tuple[int, int]:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise IndexError(f"HiddenStates are read and written in contiguous slices of windows, not [{key}]")
        start, stop, _ = key.indices(len(self))
        return start, max(stop, start)

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop = self._span(key)
        count = (stop - start) * self.window_items
        values = np.fromfile(self.path, np.float32, count, offset=4 * start * self.window_items)
        return values.reshape(stop - start, *self.shape[1:])

    def __setitem__(self, key: slice, values: np.ndarray) -> None:
        start, stop = self._span(key)
        values = np.ascontiguousarray(values, dtype=np.float32)
        if values.shape != (stop - start, *self.shape[1:]):
            raise ValueError(f"hidden states of shape {values.shape} written to windows {start}:{stop} of {self.shape}")
        with open(self.path, "r+b") as f:
            f.seek(4 * start * self.window_items)
            values.tofile(f)

    def copy(self, path: Path) -> "HiddenStates":
        shutil.copyfile(self.path, path)
        return HiddenStates(path, self.shape)


@torch.no_grad()
def embed(reader: WeightReader, spec: ArchitectureSpec, windows: np.ndarray, path: Path,
          batch_size: int) -> HiddenStates:
    """The input hidden states of the first layer, in the file `path`. Only the embedding rows of the tokens present
    are read: the whole table can be as large as a layer (or several, with a big vocabulary)."""
    tokens, positions = np.unique(windows, return_inverse=True)
    positions = torch.from_numpy(positions.reshape(windows.shape))
    rows = reader.rows(f"{spec.embedding}.weight", tokens)
    hidden = HiddenStates.zeros(path, (*windows.shape, rows.shape[1]))
    for start in range(0, len(windows), batch_size):
        hidden[start : start + batch_size] = torch.nn.functional.embedding(positions[start : start + batch_size],
                                                                           rows).numpy()
    return hidden


def layer_windows(reader: WeightReader, spec: ArchitectureSpec, desc: str) -> Iterator[torch.nn.Module]:
    """Each decoder layer's window in order, one in memory at a time (the caller drops it before the next)."""
    for index in tqdm(range(reader.config.num_hidden_layers), desc=desc, unit="layer"):
        yield window_model(reader, spec, index)


@torch.no_grad()
def advance(model: torch.nn.Module, hidden: HiddenStates, batch_size: int) -> None:
    """Replace the hidden states by the window's outputs, batch by batch, in place."""
    for start in range(0, len(hidden), batch_size):
        hidden[start : start + batch_size] = run_windows(model, hidden[start : start + batch_size]).logits.numpy()


def streamed_input_absmax(reader: WeightReader, spec: ArchitectureSpec, windows: np.ndarray, batch_size: int,
                          scratch: Path) -> dict[str, torch.Tensor]:
    """collect_input_absmax of the whole model, computed one layer at a time: the same batches through the same
    layers, so the same statistics. `scratch`: a folder for the hidden states."""
    absmax = {}
    hidden = embed(reader, spec, windows, scratch / "hidden.f32", batch_size)
    for model in layer_windows(reader, spec, "calibrating layer by layer"):
        linears = quantizable_linears(model, spec)
        observer = AbsmaxObserver(linears)  # its buffers before the layer's pass (AbsmaxObserver)
        with observing(linears, observer):
            advance(model, hidden, batch_size)
        absmax.update(observer.absmax)
    check_finite(absmax)
    return absmax
