"""A GGUF model converted once to a Hugging Face folder (config, tokenizer, FP32 safetensors), kept in a cache.

Every stage process loads the model again. From GGUF that costs about 15 s for SmolLM2-135M whatever the model's
size: gguf's reader parses all of the file's metadata (the tokenizer's 49k tokens and merges) field by field in
Python, once for the config, once for the tokenizer and once for the weights. The converted folder loads in under
a second. The conversion is streamed (one decoder layer's tensors per shard, dequantized alone by
layer_reader.GgufReader), so it fits the memory of --low-memory, and it is written under a temporary name and
renamed when complete: an interrupted conversion leaves nothing that a later run would take as done.

The cache folder is $SMOOTHTRT_CACHE (default ~/.cache/smoothtrt); SMOOTHTRT_CACHE=off loads the GGUF file
directly every time. Disk cost: the model's parameters x 4 bytes (538 MB for SmolLM2-135M).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from importlib.metadata import version
from pathlib import Path

from tqdm import tqdm

from calibration.architectures import spec_for_model_type

log = logging.getLogger(__name__)

CACHE_ENV = "SMOOTHTRT_CACHE"
DEFAULT_CACHE = Path.home() / ".cache" / "smoothtrt"
INDEX = "model.safetensors.index.json"  # written last: its presence marks a complete conversion


def cache_root() -> Path | None:
    """Where converted models live; None when the cache is switched off."""
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() == "off":
        return None
    return Path(value) if value else DEFAULT_CACHE


def cache_key(gguf_file: Path) -> str:
    """The file (path, size, modification time) and the converters' versions: a changed file, or a transformers
    whose GGUF loader dequantizes differently, converts again."""
    st = gguf_file.stat()
    text = f"{gguf_file.resolve()}:{st.st_size}:{st.st_mtime_ns}:{version('transformers')}:{version('gguf')}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def converted_folder(gguf_file: Path, read_config, read_tokenizer) -> Path | None:
    """The folder holding the GGUF model as safetensors, converted now if it is not in the cache yet (the config
    and tokenizer are read from the GGUF file only then)."""
    root = cache_root()
    if root is None:
        return None
    folder = root / f"{gguf_file.name.removesuffix('.gguf')}-{cache_key(gguf_file)}"
    if not (folder / INDEX).is_file():
        _convert(gguf_file, read_config(), read_tokenizer(), folder)
    return folder


def _shard_prefixes(names, layers: str, count: int) -> list[str]:
    """One shard per decoder layer (`layers`: the architecture's module path of the layer list), then one for
    everything else (embedding, final norm, head)."""
    prefixes = [f"{layers}.{i}." for i in range(count)]
    if any(not n.startswith(f"{layers}.") for n in names):
        prefixes.append("")
    return prefixes


def _convert(gguf_file: Path, config, tokenizer, folder: Path) -> None:
    from safetensors.torch import save_file

    from pipeline.layer_reader import GgufReader

    log.info("converting %s to safetensors once, in %s (later stages load it in seconds)", gguf_file.name, folder)
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        reader = GgufReader(gguf_file, config)
        prefixes = _shard_prefixes(reader.tensors, spec_for_model_type(config.model_type).layers,
                                   config.num_hidden_layers)
        weight_map, total = {}, 0
        for k, prefix in enumerate(tqdm(prefixes, desc="converting GGUF", unit="shard")):
            names = [n for n in reader.tensors if n.startswith(prefix) and n not in weight_map]
            shard = f"model-{k + 1:05d}-of-{len(prefixes):05d}.safetensors"
            tensors = {n: reader.tensor(n) for n in names}
            save_file(tensors, str(partial / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, shard))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        (partial / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2, sort_keys=True))
        if folder.is_dir() and not (folder / INDEX).is_file():
            shutil.rmtree(folder)  # left by hand without its index: not a conversion of ours
        try:
            partial.rename(folder)
        except OSError:  # another process finished the same conversion first: theirs is as good as ours
            if not (folder / INDEX).is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
