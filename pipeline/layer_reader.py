"""Read a checkpoint's tensors one module at a time, for --low-memory (calibration/layer_stream.py).

- safetensors (a Hugging Face folder, sharded or not): safe_open memory-maps each file and copies out only the
  tensors asked for.
- GGUF: gguf's reader memory-maps the file; each tensor is dequantized alone, with the name map and the tensor
  fix-ups (llama.cpp's Q/K row permutation) of transformers' own GGUF loader, so the weights are the ones
  from_pretrained(gguf_file=...) would load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline import PipelineError

ROW_BLOCK = 4096  # embedding rows copied out of a safetensors file at a time


def _empty_model(config):
    """The whole model on the meta device: parameter names and shapes, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


class SafetensorsReader:
    def __init__(self, folder: Path, config):
        self.config = config
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            from safetensors import safe_open

            self.files = {}
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(str(path), "pt") as f:
                    self.files.update({k: path for k in f.keys()})
        if not self.files:
            raise PipelineError(f"no .safetensors weights in {folder}: --low-memory reads safetensors or GGUF "
                                "checkpoints (save the model with save_pretrained(safe_serialization=True))")

    def rows(self, name: str, index: np.ndarray) -> torch.Tensor:
        """Rows `index` (sorted, unique) of a 2-D tensor, read a block of rows at a time."""
        from safetensors import safe_open

        with safe_open(str(self.files[name]), "pt") as f:
            table = f.get_slice(name)
            parts = []
            for start in range(0, table.get_shape()[0], ROW_BLOCK):
                wanted = index[(index >= start) & (index < start + ROW_BLOCK)]
                if len(wanted):
                    parts.append(table[start : start + ROW_BLOCK][torch.from_numpy(wanted - start)].float())
        return torch.cat(parts)

    def read(self, prefix: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        wanted = [k for k in self.files if k.startswith(prefix + ".")]
        out = {}
        for path in sorted({self.files[k] for k in wanted}):
            with safe_open(str(path), "pt") as f:
                out.update({k[len(prefix) + 1:]: f.get_tensor(k).float() for k in wanted if self.files[k] == path})
        return out


class GgufReader:
    def __init__(self, path: Path, config):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map, read_field)

        self.config = config
        self.reader = GGUFReader(str(path))
        architecture = read_field(self.reader, "general.architecture")[0]
        # The processors read head counts under the Hugging Face config's own keys.
        self.parsed = {"config": config.to_dict(), "tensors": {}}
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=self.parsed["config"])
        self.names = get_gguf_hf_weights_map(_empty_model(config), self.processor)  # gguf name -> HF name
        self.tensors = {self.names[t.name]: t for t in self.reader.tensors if t.name in self.names}

    def rows(self, name: str, index: np.ndarray) -> torch.Tensor:
        """Rows `index` of a 2-D tensor, dequantized alone: GGUF stores each row as whole quantization blocks."""
        tensor = self.tensors[name]
        return self._dequantized(tensor, tensor.data[index])

    def read(self, prefix: str) -> dict[str, torch.Tensor]:
        return {name[len(prefix) + 1:]: self.tensor(name) for name in self.tensors if name.startswith(prefix + ".")}

    def tensor(self, name: str) -> torch.Tensor:
        return self._dequantized(self.tensors[name], self.tensors[name].data)

    def _dequantized(self, tensor, data: np.ndarray) -> torch.Tensor:
        from gguf.quants import dequantize

        weights = self.processor.process(weights=dequantize(data, tensor.tensor_type), name=tensor.name,
                                         tensor_key_mapping=self.names, parsed_parameters=self.parsed).weights
        return torch.from_numpy(np.require(weights, np.float32, ["W"]))  # F32 tensors come straight off the mmap
