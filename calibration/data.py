"""Token windows for calibration and evaluation: from a text source (sources.py) or sampled from the model itself.

Protocol (shared/data/README.md): non-overlapping windows of `seq_len` tokens; when calibration and evaluation
come from the same source, evaluation takes the FIRST windows and calibration the LAST ones, never overlapping.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from calibration import CalibrationError
from calibration.sources import SYNTHETIC, is_dataset, source_text


# Windows sampled at once, by sampling dtype: as many as keep the calibrate stage within 2.5x the FP32 weights (issue
# 7's limit). SmolLM2, 512 tokens, peak RSS of the sampler / seconds per window: bfloat16, 16 at once: 1,224 MB (the
# loading: the FP32 checkpoint beside the bfloat16 copy) / 3.6 s. float32, 16 at once: 1,469 MB / 4.7 s; 12: 1,310 MB
# / 6.0 s; 10: 1,269 MB / 6.6 s; 8: 1,192 MB / 6.8 s, against a 1,345 MB limit (docs/RESULTS.md). Each sequence's KV
# cache costs 1.2-1.6x its size: the cache grows by concatenation, and glibc's heap keeps the blocks it frees.
SAMPLING_BATCH = {torch.bfloat16: 16, torch.float32: 8}

# Varied openings so the sampled text covers prose, code, dialogue, lists and numbers.
SYNTHETIC_PROMPTS = (
    "The history of the city begins",
    "def parse_config(path):\n",
    "User: Can you explain how vaccines work?\nAssistant:",
    "Ingredients:\n1.",
    "In 1887, the expedition",
    "The theorem states that for every integer n",
    "Dear hiring manager,",
    "BREAKING NEWS:",
    "Once upon a time, in a village by the sea,",
    "SELECT name, count(*) FROM",
    "The patient presented with",
    "Chapter 1\n\n",
    "Q: What is the capital of Australia?\nA:",
    "The stock market closed",
    "To install the package, run",
    "Photosynthesis is the process",
)


@dataclass(frozen=True)
class TokenWindows:
    calibration: np.ndarray  # int64 [n_calib, seq_len]: activation statistics
    holdout: np.ndarray  # int64 [n_holdout, seq_len]: same source as calibration, scores tuning choices
    evaluation: np.ndarray  # int64 [n_eval, seq_len]
    calibration_origin: str
    evaluation_origin: str

    def digest(self) -> str:
        return windows_digest(self.calibration, self.holdout, self.evaluation)


def windows_digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return h.hexdigest()


def cut_windows(token_ids: list[int] | np.ndarray, seq_len: int) -> np.ndarray:
    ids = np.asarray(token_ids, dtype=np.int64)
    n = len(ids) // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)


def source_windows(tokenizer, source: str, seq_len: int, chat_template: bool = False) -> np.ndarray:
    # No special tokens added: windows are plain slices of the running text, as in the perplexity protocol (a chat
    # template writes its own special tokens into the text).
    ids = tokenizer(source_text(source, tokenizer, chat_template), add_special_tokens=False)["input_ids"]
    return cut_windows(ids, seq_len)


def split_same_source(windows: np.ndarray, n_calib: int, n_eval: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation from the start, calibration from the end, never overlapping."""
    if len(windows) < n_calib + n_eval:
        raise CalibrationError(
            f"'{source}' has {len(windows)} windows of the requested length but {n_calib} calibration + {n_eval} "
            f"evaluation windows were asked for: use a longer text or lower CALIB_WINDOWS/EVAL_WINDOWS/SEQ_LEN"
        )
    return windows[len(windows) - n_calib :], windows[:n_eval]


def take_windows(windows: np.ndarray, n: int, source: str, role: str) -> np.ndarray:
    if len(windows) < n:
        raise CalibrationError(
            f"'{source}' has {len(windows)} windows of the requested length but {n} {role} windows were asked for: "
            "use a longer text or fewer/shorter windows"
        )
    return windows[:n]


def sampling_dtype(requested: str = "auto") -> torch.dtype:
    """What synthetic text is sampled in: the `requested` dtype's name, or for "auto" bfloat16 where the CPU multiplies
    it natively (AVX512-BF16 or AMX; torch's private checks, torch is pinned), float32 elsewhere, where bfloat16
    GEMMs are emulated. SmolLM2 on an AMX Xeon, 16 windows of 512 tokens at once: 57 s in bfloat16, 75 s in
    float32, and half the weights and KV cache (SAMPLING_BATCH). The text is still the model's: its perplexity under
    the FP32 model differs between sample sets as much as between the two dtypes (docs/RESULTS.md)."""
    if requested != "auto":
        return getattr(torch, requested)
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else torch.float32


@torch.no_grad()
def synthetic_windows(model, tokenizer, n: int, seq_len: int, seed: int) -> np.ndarray:
    """Sample n windows of seq_len tokens from the model itself (temperature 1, top-p 0.95), prompt i % 16, in
    batches of SAMPLING_BATCH[the model's dtype]."""
    batch_size = SAMPLING_BATCH[next(model.parameters()).dtype]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    rows = []
    for start in tqdm(range(0, n, batch_size), desc="sampling synthetic calibration text", unit="batch"):
        prompts = [SYNTHETIC_PROMPTS[i % len(SYNTHETIC_PROMPTS)] for i in range(start, min(n, start + batch_size))]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_p=0.95,
            top_k=0,
            max_new_tokens=seq_len,
            min_new_tokens=seq_len,  # no early EOS: every window gets seq_len real tokens
            pad_token_id=tokenizer.pad_token_id,
        )
        prompt_len = enc["input_ids"].shape[1]
        for row, mask in zip(out, enc["attention_mask"]):
            prompt = row[:prompt_len][mask.bool()]
            rows.append(torch.cat([prompt, row[prompt_len:]])[:seq_len].numpy())
    return np.stack(rows).astype(np.int64)


def same_source(a: str, b: str | None) -> bool:
    if b is None or SYNTHETIC in (a, b):
        return False
    return a == b if is_dataset(a) or is_dataset(b) else Path(a).resolve() == Path(b).resolve()


def build_windows(model, tokenizer, calib_source: str, eval_source: str | None, n_calib: int, n_holdout: int,
                  n_eval: int, seq_len: int, seed: int, chat_template: bool = False) -> TokenWindows:
    """Calibration, holdout and evaluation windows.

    The holdout slice comes from the calibration source, just before the calibration windows: tuning (alpha grid,
    accuracy budget) is scored on it, never on the evaluation text and never on the windows the statistics saw.
    chat_template renders the calibration source with the model's chat template (evaluation windows cut from the
    same source are rendered too; a separate evaluation file stays plain text, as the perplexity protocol reads it).
    """
    n_source = n_calib + n_holdout
    shared_source = same_source(calib_source, eval_source)
    rendered = " rendered with the chat template" if chat_template else ""
    calib_origin = f"{calib_source}{rendered}: last {n_calib} windows (holdout: the {n_holdout} before them)"
    if calib_source == SYNTHETIC:
        sampled = synthetic_windows(model, tokenizer, n_source + (n_eval if eval_source is None else 0), seq_len, seed)
        source = sampled[:n_source]
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        calib_origin = (f"synthetic: {n_calib} windows sampled from the model in {dtype}, seed {seed} "
                        f"(+{n_holdout} holdout)")
        if eval_source is None:
            return TokenWindows(source[n_holdout:], source[:n_holdout], sampled[n_source:], calib_origin,
                                f"synthetic: {n_eval} further samples, held out from calibration")
    else:
        windows = source_windows(tokenizer, calib_source, seq_len, chat_template)
        if eval_source is None or shared_source:
            source, evaluation = split_same_source(windows, n_source, n_eval, calib_source)
            return TokenWindows(source[n_holdout:], source[:n_holdout], evaluation, calib_origin,
                                f"{calib_source}: first {n_eval} windows, held out from calibration")
        source = take_windows(windows[::-1], n_source, calib_source, "calibration")[::-1]
    evaluation = take_windows(source_windows(tokenizer, eval_source, seq_len), n_eval, eval_source, "evaluation")
    source = np.ascontiguousarray(source)
    return TokenWindows(source[n_holdout:], source[:n_holdout], evaluation, calib_origin,
                        f"{eval_source}: first {n_eval} windows")
