"""The Hugging Face GPTQ checkpoint layout (AutoGPTQ / GPTQModel, `checkpoint_format` "gptq" or "gptq_v2"):
write ours in it, and read symmetric ones back into codes and scales for the ONNX/TensorRT export.

Per quantized linear with K inputs, N outputs, G groups:
- qweight int32 [K * bits / 32, N]: unsigned codes u = q + 2^(bits-1) packed along K as a little-endian bit
  stream (bit j*bits of the stream starts value j; 3-bit values straddle 32-bit words, 32 values per 3 words).
- qzeros int32 [G, N * bits / 32]: the zero point per group and output, packed the same way along N. The "gptq"
  (v1) format stores zero - 1 (the original AutoGPTQ kernels add the 1 back); "gptq_v2" stores the zero itself.
- scales fp16 [G, N]; g_idx int32 [K]: the group of each input column.
The weight is w = scale[g_idx[k], n] * (u[k, n] - zero[g_idx[k], n]).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from calibration.gptq import QuantizedWeight, group_index
from exporters import ExportError

FORMAT_V1 = "gptq"
FORMAT_V2 = "gptq_v2"
WEIGHTS_FILE = "model.safetensors"


def pack_int32(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned values (< 2^bits) packed along `axis` into int32 words; that axis must hold a multiple of 32/gcd."""
    moved = np.moveaxis(values.astype(np.uint32), axis, 0)
    count = moved.shape[0]
    if (count * bits) % 32:
        raise ExportError(f"cannot pack {count} values of {bits} bits into whole int32 words")
    planes = (moved[:, None] >> np.arange(bits, dtype=np.uint32).reshape(1, bits, *[1] * (moved.ndim - 1))) & 1
    stream = planes.reshape(count * bits // 32, 32, *moved.shape[1:])
    shifts = np.arange(32, dtype=np.uint32).reshape(1, 32, *[1] * (moved.ndim - 1))
    words = (stream << shifts).sum(axis=1, dtype=np.uint32)
    return np.ascontiguousarray(np.moveaxis(words.view(np.int32), 0, axis))  # safetensors writes raw memory


def unpack_int32(words: np.ndarray, bits: int, count: int, axis: int) -> np.ndarray:
    """Inverse of pack_int32: `count` unsigned values along `axis`, as int32."""
    moved = np.moveaxis(words.view(np.uint32), axis, 0)
    shifts = np.arange(32, dtype=np.uint32).reshape(1, 32, *[1] * (moved.ndim - 1))
    stream = ((moved[:, None] >> shifts) & 1).reshape(moved.shape[0] * 32, *moved.shape[1:])[: count * bits]
    planes = stream.reshape(count, bits, *moved.shape[1:]).astype(np.int32)
    weights = (1 << np.arange(bits, dtype=np.int32)).reshape(1, bits, *[1] * (moved.ndim - 1))
    return np.moveaxis((planes * weights).sum(axis=1, dtype=np.int32), 0, axis)


def linear_tensors(prefix: str, q: QuantizedWeight) -> dict[str, np.ndarray]:
    """The checkpoint tensors of one symmetric linear, in the v1 ("gptq") format."""
    offset = 1 << (q.bits - 1)
    unsigned = (q.codes.numpy().astype(np.int32) + offset).T  # [K, N]
    zeros = np.full((q.scales.shape[1], q.codes.shape[0]), offset - 1, np.int32)  # v1 stores zero - 1
    return {
        f"{prefix}.qweight": pack_int32(unsigned, q.bits, axis=0),
        f"{prefix}.qzeros": pack_int32(zeros, q.bits, axis=1),
        f"{prefix}.scales": np.ascontiguousarray(q.scales.numpy().T.astype(np.float16)),
        f"{prefix}.g_idx": group_index(q.codes.shape[1], q.group_size).numpy().astype(np.int32),
    }


def read_linear(tensors: dict[str, np.ndarray], prefix: str, bits: int, group_size: int, checkpoint_format: str,
                in_features: int, out_features: int) -> QuantizedWeight:
    """Codes and scales of one linear; asymmetric or non-contiguous (act-order without static groups) refused."""
    unsigned = unpack_int32(tensors[f"{prefix}.qweight"], bits, in_features, axis=0)  # [K, N]
    scales = tensors[f"{prefix}.scales"].astype(np.float32)  # [G, N]
    zeros = unpack_int32(tensors[f"{prefix}.qzeros"], bits, out_features, axis=1)
    if checkpoint_format == FORMAT_V1:
        zeros = (zeros + 1) & ((1 << bits) - 1)
    if np.any(zeros != 1 << (bits - 1)):
        raise ExportError(f"{prefix}: asymmetric GPTQ weights (zero points other than {1 << (bits - 1)}): TensorRT's "
                          "INT4 DequantizeLinear is symmetric only; re-quantize with sym=True")
    g_idx = tensors.get(f"{prefix}.g_idx")
    size = in_features if group_size == -1 else group_size
    contiguous = group_index(in_features, size).numpy()
    if g_idx is not None and not np.array_equal(g_idx, contiguous):
        raise ExportError(f"{prefix}: g_idx is not contiguous (act-order without static groups): blocked "
                          "DequantizeLinear cannot express it; re-quantize with static_groups=True or desc_act=False")
    codes = torch.from_numpy((unsigned - (1 << (bits - 1))).T.astype(np.int8).copy())
    return QuantizedWeight(codes, torch.from_numpy(np.ascontiguousarray(scales.T)), bits, size)


def quantization_config(bits: int, group_size: int, act_order: bool, damp: float) -> dict:
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": True, "desc_act": act_order,
            "static_groups": True, "damp_percent": damp, "true_sequential": True, "checkpoint_format": FORMAT_V1}


def write_checkpoint(folder: Path, model: torch.nn.Module, tokenizer, weights: dict[str, QuantizedWeight],
                     config: dict) -> None:
    """A loadable GPTQ checkpoint folder (config with quantization_config, safetensors, tokenizer), written to a
    temporary sibling and renamed, so a crash leaves no half checkpoint."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    quantized = {f"{name}.weight" for name in weights}
    tied = getattr(model.config, "tie_word_embeddings", False)
    tensors = {k: v.detach().to(torch.float16).numpy() for k, v in model.state_dict().items()
               if k not in quantized and not (tied and k == "lm_head.weight")}
    for name, q in weights.items():
        tensors.update(linear_tensors(name, q))
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    model_config = model.config.to_dict()
    model_config.update(torch_dtype="float16", quantization_config=config)
    (tmp / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True, default=str))
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def checkpoint_quantization(folder: Path) -> dict | None:
    """The GPTQ quantization_config of a model folder, or None when it is not a GPTQ checkpoint."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text()).get("quantization_config") or {}
    return config if config.get("quant_method") == "gptq" else None


def read_checkpoint(folder: Path, linear_shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, QuantizedWeight],
                                                                                      dict[str, np.ndarray]]:
    """(codes and scales per quantized linear, the remaining float tensors). linear_shapes: name -> (N, K)."""
    config = checkpoint_quantization(folder)
    if config is None:
        raise ExportError(f"{folder} is not a GPTQ checkpoint (no quantization_config with quant_method 'gptq')")
    if not config.get("sym", True):
        raise ExportError("asymmetric GPTQ checkpoint (sym=false): TensorRT's INT4 DequantizeLinear is symmetric "
                          "only; re-quantize with sym=True")
    checkpoint_format = config.get("checkpoint_format", FORMAT_V1)
    if checkpoint_format not in (FORMAT_V1, FORMAT_V2):
        raise ExportError(f"GPTQ checkpoint_format '{checkpoint_format}' is not supported: use gptq or gptq_v2")
    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    weights = {}
    for name, (out_features, in_features) in linear_shapes.items():
        if f"{name}.qweight" in tensors:
            weights[name] = read_linear(tensors, name, int(config["bits"]), int(config.get("group_size", -1)),
                                        checkpoint_format, in_features, out_features)
    if not weights:
        raise ExportError(f"{folder}: no qweight tensors for the model's linears: not a GPTQ checkpoint of this model")
    packed = {k for name in weights for k in tensors if k.startswith(f"{name}.") and not k.endswith(".bias")}
    return weights, {k: v for k, v in tensors.items() if k not in packed}
