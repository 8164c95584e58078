"""Decode-step latency with the KV cache against a no-cache loop (each new token re-runs the whole sequence), for
the reference and Q/DQ graphs of an OUT folder, in ONNX Runtime, measured side by side in one process.

    python bench/generation.py --out build/<name> [--prompt-tokens 128] [--new-tokens 32] [--repeats 3]

Writes bench/results/generation.json and .md; prints the table. Ratios are the figures to quote (absolute times
depend on the machine's load)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.generation import Sampling, generate_ids  # noqa: E402
from pipeline.runtime import OnnxDecoder  # noqa: E402

PARAGRAPH = ("Quantization maps floating point weights and activations to small integers so that matrix products run "
             "on integer units. SmoothQuant moves the difficulty of activation outliers into the weights with a "
             "per-channel scale that leaves the product unchanged. ")
RESULTS = Path(__file__).resolve().parent / "results"


def prompt_ids(engine: OnnxDecoder, length: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < length:
        ids += engine.tokenizer(PARAGRAPH, add_special_tokens=False)["input_ids"]
    return ids[:length]


class StepTimer:
    """Wraps an engine's step to time prefill and each decode step separately."""

    def __init__(self, engine: OnnxDecoder):
        self.engine, self.times = engine, []
        self.tokenizer, self.new_cache = engine.tokenizer, engine.new_cache

    def step(self, *args):
        start = time.perf_counter()
        result = self.engine.step(*args)
        self.times.append(time.perf_counter() - start)
        return result


def with_cache(engine: OnnxDecoder, prompt: list[int], new: int) -> tuple[list[int], float, list[float]]:
    timer = StepTimer(engine)
    tokens = generate_ids(timer, [prompt], new, Sampling())[0]
    return tokens, timer.times[0], timer.times[1:]


def without_cache(engine: OnnxDecoder, prompt: list[int], new: int) -> tuple[list[int], list[float]]:
    """The loop a prefill-only graph forces: every token re-reads the whole sequence."""
    sequence, times = list(prompt), []
    for _ in range(new):
        start = time.perf_counter()
        logits = engine.prefill_logits(np.array([sequence]))
        times.append(time.perf_counter() - start)
        sequence.append(int(logits[0, -1].argmax()))
    return sequence[len(prompt):], times


def measure(path: Path, prompt_tokens: int, new: int, repeats: int) -> dict:
    engine = OnnxDecoder(path)
    prompt = prompt_ids(engine, prompt_tokens)
    with_cache(engine, prompt, 2)  # warm-up: session allocations and kernel selection
    prefill, decode, uncached = [], [], []
    for _ in range(repeats):
        cached_tokens, first, steps = with_cache(engine, prompt, new)
        plain_tokens, plain = without_cache(engine, prompt, new)
        prefill.append(first)
        decode += steps
        uncached += plain[1:]  # the first no-cache step is the same prefill
    return {"graph": path.name, "prompt_tokens": prompt_tokens, "new_tokens": new, "repeats": repeats,
            "prefill_ms": 1e3 * statistics.median(prefill),
            "decode_step_ms_with_cache": 1e3 * statistics.median(decode),
            "decode_step_ms_without_cache": 1e3 * statistics.median(uncached),
            "speedup_with_cache": statistics.median(uncached) / statistics.median(decode),
            "same_tokens_both_loops": cached_tokens == plain_tokens}


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "| graph | prompt | new | prefill ms | decode ms, KV cache | decode ms, no cache | speed-up | same tokens |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['graph']} | {r['prompt_tokens']} | {r['new_tokens']} | {r['prefill_ms']:.1f} | "
              f"{r['decode_step_ms_with_cache']:.1f} | {r['decode_step_ms_without_cache']:.1f} | "
              f"{r['speedup_with_cache']:.2f}x | {r['same_tokens_both_loops']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="OUT folder with reference.onnx, quantized.onnx, tokenizer/")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    rows = [measure(out / name, args.prompt_tokens, args.new_tokens, args.repeats)
            for name in ("reference.onnx", "quantized.onnx") if (out / name).is_file()]
    if not rows:
        sys.exit(f"error: {out} has no reference.onnx or quantized.onnx: run `make engine OUT={out}` first")
    command = "python " + " ".join(sys.argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "generation.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    (RESULTS / "generation.md").write_text(markdown(rows, command))
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
