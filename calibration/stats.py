"""Per-input-channel absmax of every quantizable Linear input, collected with forward pre-hooks."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from calibration import CalibrationError
from calibration.architectures import ArchitectureSpec
from calibration.rotation import linear_input

log = logging.getLogger(__name__)


def quantizable_linears(model: torch.nn.Module, spec: ArchitectureSpec) -> dict[str, torch.nn.Linear]:
    """Full module name -> Linear, for every linear of the spec in every decoder layer, in layer order."""
    found = {}
    for i, layer in decoder_layers(model, spec):
        for rel in spec.linears:
            module = layer.get_submodule(rel)
            if not isinstance(module, torch.nn.Linear):
                raise CalibrationError(f"{spec.layers}.{i}.{rel} is {type(module).__name__}, expected Linear")
            found[f"{spec.layers}.{i}.{rel}"] = module
    return found


def decoder_layers(model: torch.nn.Module, spec: ArchitectureSpec) -> list[tuple[int, torch.nn.Module]]:
    """(index, layer) of the decoder layers the model holds: all of them, or the one a layer window holds
    (calibration/layer_stream.py keeps the layer's own index, so module names match the full model's)."""
    return [(int(i), layer) for i, layer in model.get_submodule(spec.layers).named_children()]


def run_windows(model: torch.nn.Module, batch: np.ndarray, **kwargs):
    """Forward one batch: token ids into the embedding, or hidden states (floats: a layer window's inputs)
    straight into the decoder layers."""
    tensor = torch.from_numpy(np.ascontiguousarray(batch))
    key = "inputs_embeds" if tensor.is_floating_point() else "input_ids"
    return model(**{key: tensor}, use_cache=False, **kwargs)


@contextlib.contextmanager
def observing(linears: dict[str, torch.nn.Module], observe: Callable[[str, torch.Tensor], None]):
    """While inside, every forward hands each linear's input ([tokens, in_features]) to observe(name, x): what its
    weight multiplies, so rotated after a rotation (calibration/rotation.py)."""
    def make_hook(name: str):
        def hook(module, args):
            x = linear_input(module, args[0].detach())
            observe(name, x.reshape(-1, x.shape[-1]))
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in linears.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def observe_inputs(model: torch.nn.Module, linears: dict[str, torch.nn.Module], windows: np.ndarray, batch_size: int,
                   observe: Callable[[str, torch.Tensor], None], desc: str) -> None:
    """Run the windows (token ids, or a layer window's hidden states) through the model, handing each linear's
    input ([tokens, in_features]) to observe(name, x)."""
    with observing(linears, observe):
        for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch"):
            # logits_to_keep=1: the lm_head is not calibrated, so skip most of its cost.
            run_windows(model, windows[start : start + batch_size], logits_to_keep=1)


def collect_input_absmax(model: torch.nn.Module, linears: dict[str, torch.nn.Linear], windows: np.ndarray,
                         batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Run the windows through the model; return fp32 per-input-channel max|x| for each linear."""
    observer = AbsmaxObserver(linears)
    observe_inputs(model, linears, windows, batch_size, observer, "calibrating")
    check_finite(observer.absmax)
    return observer.absmax


class AbsmaxObserver:
    """observe(name, x) for observe_inputs: keeps the running per-input-channel max|x| of each of `linears`.

    Its buffers are allocated here, before the pass, and updated in place. A running result allocated during the
    pass (a new tensor per batch, or the first batch's) is a small block that outlives the forward's temporaries
    around it on glibc's heap: depending on where it lands, it keeps the heap from reusing or returning the space
    they free. SmolLM2 calibrate peaked at 1.9-2.1 GB in about half the runs that way (the heap grew ~30 MB per
    decoder layer of the first batch, ~0.8 GB of it free), and at 1.1-1.2 GB in every run with the buffers
    allocated first (docs/RESULTS.md, "Calibrate's heap swing found")."""

    def __init__(self, linears: dict[str, torch.nn.Linear]):
        self.absmax = {name: torch.full((m.in_features,), -torch.inf) for name, m in linears.items()}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        running = self.absmax[name]
        # fmax would drop NaNs; maximum keeps them so non-finite activations are reported by check_finite.
        torch.maximum(running, x.abs().amax(dim=0).float(), out=running)


def check_finite(absmax: dict[str, torch.Tensor]) -> None:
    for name, value in absmax.items():
        if torch.isneginf(value).all():  # AbsmaxObserver's initial value: no forward reached this linear
            raise CalibrationError(f"{name} received no input during calibration: the architecture table lists a "
                                   "linear this model's forward never calls; fix its entry in "
                                   "calibration/architectures.py")
        if not torch.isfinite(value).all():
            raise CalibrationError(
                f"NaN/Inf activations seen in calibration at the input of {name}: the model weights or the "
                "calibration text produce non-finite values; check the model file (run it in float32)"
            )


def save_stats(absmax: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_file({k: v.contiguous() for k, v in absmax.items()}, str(path), metadata=metadata)


def load_stats(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
