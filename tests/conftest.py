"""Tiny randomly initialised models from transformers configs (no download), and a tokenizer trained here."""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from calibration.architectures import spec_for_model_type
from calibration.stats import collect_input_absmax, quantizable_linears
from exporters.onnx_export import export_model
from exporters.qdq import insert_qdq

VOCAB = 320
TEXT = (
    "The quick brown fox jumps over the lazy dog. Calibration windows come from the end of the file and "
    "evaluation windows from its start. SmoothQuant migrates activation outliers into the weights. "
) * 40


def tiny_config(model_type: str = "llama", layers: int = 2):
    # Grouped-query attention (4 query heads over 2 KV heads) so the shared o_proj factor is exercised.
    return AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )


def tiny_model(model_type: str = "llama", seed: int = 0, outliers: bool = True):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    if outliers:
        # Real LLMs have a few huge activation channels; random init has none. Make some, so smoothing matters.
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight[:3] = 40.0
                layer.mlp.up_proj.weight[:4] *= 30.0
    return model


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """GGUF models convert into a folder of this test session (pipeline/gguf_cache.py), never the user's cache;
    CLI subprocesses inherit it."""
    from pipeline.gguf_cache import CACHE_ENV

    folder = tmp_path_factory.mktemp("model-cache")
    previous, os.environ[CACHE_ENV] = os.environ.get(CACHE_ENV), str(folder)
    yield folder
    if previous is None:
        del os.environ[CACHE_ENV]
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A local Hugging Face folder (config, safetensors, tokenizer) for end-to-end runs."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT)
    return path


def random_windows(n: int = 6, seq_len: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (n, seq_len)).astype(np.int64)


def calibrated(model, windows=None):
    spec = spec_for_model_type(model.config.model_type)
    linears = quantizable_linears(model, spec)
    absmax = collect_input_absmax(model, linears, random_windows() if windows is None else windows)
    return spec, linears, absmax


def export_both_graphs(model, names, quantizations, folder):
    """The FP32 graph (FP32 scales, for ONNX Runtime) and the FP16 graph (FP16 scales, for TensorRT), saved:
    dtype -> (graph, path)."""
    graphs = {}
    for dtype, scale_dtype in ((torch.float32, np.float32), (torch.float16, np.float16)):
        graph = export_model(model, dtype, 21, names)
        insert_qdq(graph, quantizations, scale_dtype)
        path = folder / f"{dtype}.onnx"
        ir.save(graph, path)
        graphs[dtype] = (graph, path)
    return graphs


def stepwise_logits(engine, window: np.ndarray, prefill: int):
    """Logits of every position of `window` [batch, seq] computed the generation way: the first `prefill` tokens in
    one step, then one token per step through the engine's KV cache. Returns (logits, cache)."""
    batch, length = window.shape
    cache = engine.new_cache(batch, length)
    logits, cache = engine.step(window[:, :prefill], np.ones((batch, prefill), np.int64),
                                np.tile(np.arange(prefill), (batch, 1)), cache)
    steps = [logits]
    for t in range(prefill, length):
        logits, cache = engine.step(window[:, t:t + 1], np.ones((batch, t + 1), np.int64), np.full((batch, 1), t), cache)
        steps.append(logits)
    return np.concatenate(steps, axis=1), cache
