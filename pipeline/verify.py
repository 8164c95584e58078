"""Verification on CPU: Polygraphy's ONNX Runtime backend runs the reference and Q/DQ graphs on real token windows,
compared with each other (accuracy) and with PyTorch (export faithfulness)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import onnxruntime as ort
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.datatype import DataType
from tqdm import tqdm

from exporters.decoder_io import DecoderShape

log = logging.getLogger(__name__)


def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Sum and count of -log p(token t+1 | tokens <= t) over a [batch, seq] window (float64 log-softmax)."""
    logp = torch.log_softmax(torch.from_numpy(logits[:, :-1]).double(), dim=-1)
    target = torch.from_numpy(ids[:, 1:]).long()
    nll = -logp.gather(-1, target[..., None]).squeeze(-1)
    return float(nll.sum()), nll.numel()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over positions of the cosine between two logit vectors."""
    a64 = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b64 = b.reshape(-1, b.shape[-1]).astype(np.float64)
    num = (a64 * b64).sum(-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return float(np.mean(num / np.maximum(den, 1e-30)))


def top1_matches(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    ta, tb = a.argmax(-1), b.argmax(-1)
    return int((ta == tb).sum()), ta.size


@dataclass
class PairStats:
    """Streaming comparison of a candidate's logits against a baseline's."""

    cosines: list[float] = field(default_factory=list)
    max_abs: float = 0.0
    top1_same: int = 0
    positions: int = 0

    def add(self, baseline: np.ndarray, candidate: np.ndarray) -> None:
        self.cosines.append(cosine(baseline, candidate))
        self.max_abs = max(self.max_abs, float(np.abs(baseline.astype(np.float32) - candidate.astype(np.float32)).max()))
        same, n = top1_matches(baseline, candidate)
        self.top1_same += same
        self.positions += n

    def summary(self) -> dict:
        return {
            "windows": len(self.cosines),
            "cosine_mean": float(np.mean(self.cosines)),
            "cosine_min": float(np.min(self.cosines)),
            "max_abs_error": self.max_abs,
            "top1_agreement": self.top1_same / max(self.positions, 1),
        }


@dataclass
class Perplexity:
    nll: float = 0.0
    count: int = 0

    def add(self, logits: np.ndarray, ids: np.ndarray) -> None:
        s, n = next_token_nll(logits, ids)
        self.nll += s
        self.count += n

    def value(self) -> float:
        return float(np.exp(self.nll / self.count))


def onnx_session(path: Path, providers: list[str] | None = None,
                 disabled_optimizers: tuple[str, ...] = ()) -> ort.InferenceSession:
    """A CPU session that computes what the graph says. ONNX Runtime's default optimizer fuses an INT4 blocked
    DequantizeLinear + MatMul into MatMulNBits with accuracy_level 4, which also quantizes the activations to
    INT8 on the fly: a W4A8 kernel, not the W4A16 graph. Level 0 keeps the float activations.
    `disabled_optimizers`: for graphs other tools made that trip an ONNX Runtime optimizer bug."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers))


def onnx_runner(path: Path, disabled_optimizers: tuple[str, ...] = ()) -> OnnxrtRunner:
    return OnnxrtRunner(lambda: onnx_session(path, disabled_optimizers=disabled_optimizers))


def window_feeder(runner: OnnxrtRunner):
    """window -> the decoder graph's inputs for that whole window with an empty past (teacher-forced logits)."""
    metadata = runner.get_input_metadata()
    shape = DecoderShape.from_inputs({name: meta.shape for name, meta in metadata.items()})
    past_dtype = DataType.to_dtype(metadata[shape.past_names[0]].dtype, "numpy")
    return lambda window: shape.prefill_feed(window[None, :], past_dtype)


def torch_logits(model: torch.nn.Module, window: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(window[None, :]), use_cache=False).logits.numpy()


def compare_with_torch(path: Path, model: torch.nn.Module, windows: np.ndarray, label: str) -> dict:
    """ONNX Runtime on the graph vs the PyTorch module it was exported from (or simulates)."""
    stats = PairStats()
    with onnx_runner(path) as runner:
        feed = window_feeder(runner)
        for window in tqdm(windows, desc=f"checking {label}", unit="window"):
            stats.add(torch_logits(model, window), runner.infer(feed(window))["logits"])
    return stats.summary()


def attention_path_noise_floor(model: torch.nn.Module, windows: np.ndarray) -> dict:
    """The same PyTorch model with SDPA vs eager attention: float-equivalent, differing only in summation order.

    A W8A8 model with per-tensor activation scales is discontinuous (a 1e-6 change can flip a rounding at a
    Q node, and an outlier channel's smoothed weight turns that one-step flip into a large output change), so
    two exact implementations of one recipe differ measurably. This is the yardstick for export faithfulness.
    """
    from exporters.onnx_export import eager_attention

    stats = PairStats()
    for window in tqdm(windows, desc="measuring the simulation's noise floor", unit="window"):
        baseline = torch_logits(model, window)
        with eager_attention(model):
            stats.add(baseline, torch_logits(model, window))
    return stats.summary()


def compare_graphs(reference: Path, candidate: Path, windows: np.ndarray, label: str,
                   candidate_disabled_optimizers: tuple[str, ...] = ()) -> dict:
    """Perplexity of both graphs and the candidate's agreement with the reference on the same windows."""
    ppl_ref, ppl_cand, pair = Perplexity(), Perplexity(), PairStats()
    with onnx_runner(reference) as ref_runner, onnx_runner(candidate, candidate_disabled_optimizers) as cand_runner:
        ref_feed, cand_feed = window_feeder(ref_runner), window_feeder(cand_runner)
        for window in tqdm(windows, desc=f"evaluating {label}", unit="window"):
            ref = ref_runner.infer(ref_feed(window))["logits"]
            cand = cand_runner.infer(cand_feed(window))["logits"].astype(np.float32)
            ppl_ref.add(ref, window[None, :])
            ppl_cand.add(cand, window[None, :])
            pair.add(ref, cand)
    ref_ppl, cand_ppl = ppl_ref.value(), ppl_cand.value()
    return {
        "perplexity_reference": ref_ppl,
        "perplexity_candidate": cand_ppl,
        "perplexity_delta_percent": 100.0 * (cand_ppl / ref_ppl - 1.0),
        "predicted_tokens": ppl_ref.count,
        **pair.summary(),
    }


# Greedy generation through the KV-cache graphs (the loop production services run), on fixed varied prompts.
GENERATION_PROMPTS = (
    "The capital of France is",
    "Here is a short poem about the sea:",
    "In 1905, Albert Einstein published",
    "def fibonacci(n):",
    "The three primary colors are",
)
GENERATED_TOKENS = 32


def stop_tokens(model: torch.nn.Module) -> tuple[int, ...]:
    """The end-of-sequence ids Hugging Face's generate() stops at (its generation config, else the model config)."""
    eos = getattr(model.generation_config, "eos_token_id", None) if model.generation_config else None
    eos = model.config.eos_token_id if eos is None else eos
    return () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


def torch_greedy(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Hugging Face generate(), greedy, exactly new_tokens per prompt: min_new_tokens masks the end-of-sequence
    tokens until then, as our loop does with Sampling.min_new_tokens, so every prompt compares at full length."""
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       pad_token_id=(stop_tokens(model) or (0,))[0])
            out.append(generated[0, len(prompt):].tolist())
    return out


def onnx_greedy(path: Path, prompts: list[list[int]], new_tokens: int, stops: tuple[int, ...]) -> list[list[int]]:
    from pipeline.generation import Sampling, generate_ids
    from pipeline.runtime import OnnxDecoder

    engine = OnnxDecoder(path)
    sampling = Sampling(stop_token_ids=stops, min_new_tokens=new_tokens)
    return [generate_ids(engine, [prompt], new_tokens, sampling)[0]
            for prompt in tqdm(prompts, desc=f"generating with {path.name}", unit="prompt")]


def generation_agreement(baseline: list[list[int]], candidate: list[list[int]]) -> dict:
    """Per prompt: tokens equal at the same step, and the length of the common prefix (greedy outputs diverge for
    good after the first different token, so the prefix is the meaningful figure). Identical means the same
    tokens and the same length (both stopped at the same end-of-sequence token, or both ran to the limit)."""
    prefixes, same, total = [], 0, 0
    for b, c in zip(baseline, candidate):
        prefix = next((i for i, (x, y) in enumerate(zip(b, c)) if x != y), min(len(b), len(c)))
        prefixes.append(prefix)
        same += sum(x == y for x, y in zip(b, c))
        total += len(b)
    return {"prompts": len(baseline), "identical": sum(b == c for b, c in zip(baseline, candidate)),
            "token_agreement": same / max(total, 1), "common_prefix_lengths": prefixes,
            "mean_common_prefix": float(np.mean(prefixes))}
