"""The output folder: atomic writes, per-stage records keyed by input hashes, and manifest.json."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import platform
from collections.abc import Iterator, MutableMapping
from importlib import metadata
from pathlib import Path

import numpy as np

from pipeline import PipelineError

PACKAGES = ("torch", "transformers", "onnx", "onnxruntime", "onnx-ir", "polygraphy", "numpy", "gguf")
TOKENIZER = "tokenizer"  # folder next to the graphs, written by the export stage, loaded by pipeline/runtime.py


def prepare_out(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PipelineError(f"cannot write to OUT '{out}' ({e.strerror}): choose a writable folder") from None
    return out


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yield a temporary sibling path; rename it onto `final` only if the block succeeds."""
    tmp = final.with_name(f".{final.name}.partial")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def scratch_folder(near: Path):
    """An empty temporary folder beside `near` (same filesystem, so renames out of it are atomic), always removed."""
    tmp = near.with_name(f".{near.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class SavedArrays(MutableMapping):
    """numpy arrays kept in `folder` (in a scratch_folder; made if absent), one .npy file per key, each read back
    when asked for: what a stage needs later but must not hold beside what it runs next (verify: the PyTorch logits
    while ONNX Runtime runs the graphs, one graph's logits while the other runs, the float weights beside the
    layer-wise diff's sessions). Keys iterate in insertion order; a key is a file name."""

    def __init__(self, folder: Path):
        folder.mkdir(exist_ok=True)
        self.folder, self.names = folder, []

    @classmethod
    def saved_by_another_process(cls, folder: Path, names: list[str]) -> SavedArrays:
        """The arrays `names` (in that order) that another process saved in `folder` (verify's PyTorch side)."""
        missing = [n for n in names if not (folder / f"{n}.npy").is_file()]
        if missing:
            raise PipelineError(f"{folder} lacks {missing[:3]}: the process that saves them did not finish; re-run")
        saved = cls(folder)
        saved.names = list(names)
        return saved

    def __setitem__(self, name: str, array: np.ndarray) -> None:
        np.save(self.folder / f"{name}.npy", array)  # a transposed view is written as is, in Fortran order
        if name not in self.names:
            self.names.append(name)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        return np.load(self.folder / f"{name}.npy")

    def __delitem__(self, name: str) -> None:
        self.names.remove(name)
        (self.folder / f"{name}.npy").unlink()

    def __contains__(self, name: object) -> bool:  # Mapping's would read the array
        return name in self.names

    def numbered(self, prefix: str, count: int) -> Iterator[np.ndarray]:
        """The arrays saved as prefix0 .. prefix<count - 1> (one per window), each read when reached."""
        return (self[f"{prefix}{i}"] for i in range(count))

    def clear(self) -> None:  # MutableMapping's would read each array back before deleting it
        for name in list(self.names):
            del self[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@contextlib.contextmanager
def atomic_folder(final: Path):
    """Yield an empty temporary sibling folder; it replaces `final` only if the block succeeds."""
    with scratch_folder(final) as tmp:
        yield tmp
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)


def write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path):
    return json.loads(path.read_text())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


class StageRecords:
    """stages/<name>.json holds the key (hash of inputs) and the sha256 of each output of a completed stage."""

    def __init__(self, out: Path):
        self.folder = out / "stages"

    def _path(self, stage: str) -> Path:
        return self.folder / f"{stage}.json"

    def is_current(self, stage: str, key: str) -> bool:
        path = self._path(stage)
        if not path.exists():
            return False
        record = read_json(path)
        if record.get("key") != key:
            return False
        out = self.folder.parent
        return all((out / name).exists() and file_sha256(out / name) == sha for name, sha in record["outputs"].items())

    def key(self, stage: str) -> str:
        path = self._path(stage)
        if not path.exists():
            raise PipelineError(f"stage '{stage}' has not run in {self.folder.parent}: run `python -m pipeline {stage}` first")
        return read_json(path)["key"]

    def complete(self, stage: str, key: str, outputs: list[str], details: dict | None = None) -> None:
        self.folder.mkdir(exist_ok=True)
        out = self.folder.parent
        record = {"key": key, "outputs": {name: file_sha256(out / name) for name in outputs}, "details": details or {}}
        write_json(self._path(stage), record)

    def details(self, stage: str) -> dict:
        path = self._path(stage)
        return read_json(path).get("details", {}) if path.exists() else {}


def machine() -> dict:
    """The CPU a stage ran on. Float results depend on it: MKL and oneDNN pick kernels by instruction set and
    vendor, and a different summation order can flip a near-tie of the alpha search (RESULTS: the same commit and
    inputs gave SmolLM2 perplexity 29.9697 on one machine and 30.0551 on another)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:  # not Linux
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads()}


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found
