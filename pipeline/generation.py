"""Token generation over any decoder engine with a KV cache (ONNX Runtime or TensorRT): the loop, left padding,
and the sampling rules (greedy, temperature, top-k, top-p), as small pure functions on logits."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pipeline import PipelineError


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax; ties go to the lowest id, as in torch.argmax and Hugging Face)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0  # stop tokens are masked out before this many new tokens (Hugging Face's meaning)

    def __post_init__(self):
        if self.temperature < 0:
            raise PipelineError(f"temperature {self.temperature} is negative: use 0 for greedy or a positive value")
        if self.top_k < 0:
            raise PipelineError(f"top_k {self.top_k} is negative: use 0 to disable it or a positive count")
        if not 0.0 < self.top_p <= 1.0:
            raise PipelineError(f"top_p {self.top_p} is outside (0, 1]: use 1.0 to disable nucleus sampling")


def filtered_probabilities(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """[batch, vocab] logits -> next-token probabilities after temperature, top-k, then top-p (the order of
    Hugging Face's logits warpers). Top-p keeps the smallest set of most likely tokens whose mass reaches p
    (Holtzman et al. 2020), always at least the most likely one."""
    scaled = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k and sampling.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -sampling.top_k, axis=-1)[:, -sampling.top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, -1)
        mass_before = np.cumsum(sorted_probs, -1) - sorted_probs
        drop = np.zeros_like(probs, dtype=bool)
        np.put_along_axis(drop, order, mass_before >= sampling.top_p, -1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(-1, keepdims=True)
    return probs


def next_tokens(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    if sampling.temperature == 0.0:
        return logits.argmax(-1)
    probs = filtered_probabilities(logits, sampling)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, mask, positions for a batch of prompts padded on the left, so every prompt's last token is in the last
    column. Positions count real tokens only (padding gets 0), as Hugging Face's generate computes them."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise PipelineError("an empty prompt cannot be continued: give at least one token per prompt")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    return ids, mask, positions


def generate_ids(engine, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling, pad_id: int = 0,
                 on_token=None) -> list[list[int]]:
    """Prefill all prompts in one step, then decode one token per step reusing the KV cache, which is allocated
    once at the full length this call can reach. Returns each prompt's new tokens (up to and including a stop
    token). `on_token(row, token)` is called as tokens are chosen (streaming)."""
    if max_new_tokens < 1:
        raise PipelineError(f"max_new_tokens {max_new_tokens} must be at least 1")
    ids, mask, positions = left_padded(prompts, pad_id)
    cache = engine.new_cache(len(prompts), ids.shape[1] + max_new_tokens)
    rng = np.random.default_rng(sampling.seed)
    stops = np.array(sampling.stop_token_ids, dtype=np.int64)
    produced: list[list[int]] = [[] for _ in prompts]
    finished = np.zeros(len(prompts), dtype=bool)
    for produced_count in range(max_new_tokens):
        logits, cache = engine.step(ids, mask, positions, cache)
        last = logits[:, -1]
        if produced_count < sampling.min_new_tokens and len(stops):
            last = last.copy()
            last[:, stops] = -np.inf
        chosen = next_tokens(last, sampling, rng)
        for row in np.flatnonzero(~finished):
            produced[row].append(int(chosen[row]))
            if on_token is not None:
                on_token(int(row), int(chosen[row]))
        finished |= np.isin(chosen, stops)
        if finished.all():
            break
        ids = np.where(finished, pad_id, chosen)[:, None].astype(np.int64)
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
    return produced


def tokenizer_stops(tokenizer) -> tuple[int, ...]:
    return () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)


def tokenizer_pad(tokenizer) -> int:
    """Left-padding id: the tokenizer's pad token, else 0 (padded slots are masked, so any valid id works)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


class TextGeneration:
    """`generate` for engines that have `step`, `new_cache` and a `path` (the tokenizer is the one saved next to it)."""

    @functools.cached_property
    def tokenizer(self):
        """OUT's tokenizer (None where there is none), loaded on first use: transformers' import costs seconds and
        ~0.3 GB (it imports torch), which a caller passing token ids never needs (verify's generation check)."""
        from pipeline.runtime import load_tokenizer

        return load_tokenizer(self.path.parent)

    def generate(self, prompt: str | list[str], max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop_token_ids: tuple[int, ...] | None = None,
                 on_token=None) -> str | list[str]:
        if self.tokenizer is None:
            raise PipelineError("no tokenizer next to this engine: pass token ids to generate_ids, or re-run "
                                "`python -m pipeline export`, which saves OUT/tokenizer/")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if stop_token_ids is None:
            stop_token_ids = tokenizer_stops(self.tokenizer)
        sampling = Sampling(temperature, top_k, top_p, seed, tuple(stop_token_ids))
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        produced = generate_ids(self, encoded, max_new_tokens, sampling, tokenizer_pad(self.tokenizer), on_token)
        texts = [self.tokenizer.decode([t for t in tokens if t not in sampling.stop_token_ids])
                 for tokens in produced]
        return texts[0] if isinstance(prompt, str) else texts
