"""The KV-cache decoder graph and the ONNX Runtime engine: generation equal to Hugging Face's, cache consistency,
left-padded batches, sampling rules and refusals."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from calibration.architectures import spec_for_model_type
from calibration.stats import quantizable_linears
from exporters.onnx_export import export_model
from pipeline import PipelineError
from pipeline.generation import Sampling, filtered_probabilities, generate_ids, left_padded
from pipeline.runtime import OnnxDecoder, load
from pipeline.simulation import stop_tokens, torch_greedy
from pipeline.verify import generation_agreement
from tests.conftest import VOCAB, stepwise_logits, tiny_model

PROMPTS = [[5, 17, 42], [7], [100, 3, 250, 9, 61, 8, 77], [12, 12, 12, 12], [300, 1, 2, 3, 4, 5]]


def exported_decoder(model, folder, dtype=torch.float32) -> OnnxDecoder:
    names = list(quantizable_linears(model, spec_for_model_type(model.config.model_type)))
    path = folder / "decoder.onnx"
    ir.save(export_model(model, dtype, 21, names), path)
    return OnnxDecoder(path)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_and_engine(request, tmp_path_factory):
    model = tiny_model(request.param, outliers=False)
    return model, exported_decoder(model, tmp_path_factory.mktemp(request.param))


def hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    return torch_greedy(model, [prompt], new)[0]


def test_greedy_generation_equals_hugging_face_generate(model_and_engine):
    model, engine = model_and_engine
    for prompt in PROMPTS:
        ours = generate_ids(engine, [prompt], 32, Sampling(stop_token_ids=stop_tokens(model), min_new_tokens=32))[0]
        assert ours == hf_greedy(model, prompt, 32) and len(ours) == 32, prompt


def test_hugging_face_greedy_of_a_left_padded_batch_equals_each_prompt_alone(model_and_engine):
    """verify runs its prompts through generate() as one batch; padding must not change a prompt's tokens."""
    model, _ = model_and_engine
    assert torch_greedy(model, PROMPTS, 16) == [hf_greedy(model, p, 16) for p in PROMPTS]


def test_prefill_then_decode_steps_reproduce_full_prefill_logits(model_and_engine):
    _, engine = model_and_engine
    window = np.random.default_rng(1).integers(0, VOCAB, (2, 12))
    stepwise, cache = stepwise_logits(engine, window, prefill=5)
    assert cache.length == 12
    assert np.abs(stepwise - engine.prefill_logits(window)).max() < 1e-4


def test_left_padded_batch_generates_what_each_prompt_generates_alone(model_and_engine):
    _, engine = model_and_engine
    alone = [generate_ids(engine, [p], 12, Sampling())[0] for p in PROMPTS]
    assert generate_ids(engine, PROMPTS, 12, Sampling()) == alone


def test_a_reserved_masked_slot_changes_nothing(model_and_engine):
    """The TensorRT engine prefills after one masked slot instead of a zero-length past: same tokens, same logits."""
    _, engine = model_and_engine
    reserved = OnnxDecoder(engine.path, reserved_slots=1)
    assert generate_ids(reserved, PROMPTS, 12, Sampling()) == generate_ids(engine, PROMPTS, 12, Sampling())
    window = np.random.default_rng(2).integers(0, VOCAB, (1, 6))
    logits, cache = reserved.step(window, np.ones_like(window), np.arange(6)[None], reserved.new_cache(1, 6))
    assert cache.length == 7 and cache.tokens == 6
    assert np.abs(logits - engine.prefill_logits(window)).max() < 1e-4


def test_a_one_thread_engine_runs_one_intra_op_thread_and_generates_the_same_tokens(model_and_engine):
    """`threads` (a service running one worker process per core; the latency bench's steady measurement)."""
    _, engine = model_and_engine
    single = OnnxDecoder(engine.path, threads=1)
    assert single.session.get_session_options().intra_op_num_threads == 1
    assert engine.session.get_session_options().intra_op_num_threads == 0  # ONNX Runtime's default: per core
    assert generate_ids(single, PROMPTS, 12, Sampling()) == generate_ids(engine, PROMPTS, 12, Sampling())


def test_fp16_graph_generates_through_the_same_loop(tmp_path):
    model = tiny_model(outliers=False)
    fp16 = exported_decoder(model, tmp_path, torch.float16)
    assert fp16.kv_dtype == np.float16
    tokens = generate_ids(fp16, PROMPTS[:2], 8, Sampling(stop_token_ids=stop_tokens(model), min_new_tokens=8))
    reference = [hf_greedy(model, p, 8) for p in PROMPTS[:2]]
    agree = np.mean([a == b for ours, ref in zip(tokens, reference) for a, b in zip(ours, ref)])
    assert agree >= 0.75  # FP16 rounding may flip a near-tie on a random model, not most tokens


def test_stop_token_ends_a_row_and_sampling_is_seeded(model_and_engine):
    _, engine = model_and_engine
    greedy = generate_ids(engine, [PROMPTS[0]], 10, Sampling())[0]
    stopped = generate_ids(engine, [PROMPTS[0]], 10, Sampling(stop_token_ids=(greedy[3],)))[0]
    assert stopped == greedy[: greedy.index(greedy[3]) + 1]
    held = generate_ids(engine, [PROMPTS[0]], 10, Sampling(stop_token_ids=(greedy[3],), min_new_tokens=10))[0]
    assert len(held) == 10 and greedy[3] not in held  # masked until the minimum, which is the whole budget
    sampled = [generate_ids(engine, [PROMPTS[0]], 10, Sampling(temperature=1.5, seed=s))[0] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    assert generate_ids(engine, [PROMPTS[0]], 10, Sampling(temperature=0.7, top_k=1, seed=3))[0] == greedy


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.allclose(filtered_probabilities(logits, Sampling(temperature=1.0)), [[0.5, 0.3, 0.15, 0.05]])
    assert np.allclose(filtered_probabilities(logits, Sampling(temperature=1.0, top_k=2)), [[0.625, 0.375, 0, 0]])
    # top-p 0.79: 0.5 + 0.3 already reaches it, so the third token is dropped; 0.81 needs the third.
    assert np.allclose(filtered_probabilities(logits, Sampling(temperature=1.0, top_p=0.79)), [[0.625, 0.375, 0, 0]])
    kept = filtered_probabilities(logits, Sampling(temperature=1.0, top_p=0.81))
    assert np.allclose(kept, [[0.5, 0.3, 0.15, 0]] / np.float64(0.95))
    hot = filtered_probabilities(logits, Sampling(temperature=2.0))
    assert np.allclose(hot, np.sqrt([0.5, 0.3, 0.15, 0.05]) / np.sqrt([0.5, 0.3, 0.15, 0.05]).sum())


def test_left_padding_positions_count_real_tokens():
    ids, mask, positions = left_padded([[4, 5, 6], [9]], pad_id=0)
    assert ids.tolist() == [[4, 5, 6], [0, 0, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_refusals_are_one_line_errors(model_and_engine, tmp_path):
    _, engine = model_and_engine
    cache = engine.new_cache(1, 4)
    with pytest.raises(PipelineError, match="exceeds the KV cache of 4"):
        engine.step(np.ones((1, 5), np.int64), np.ones((1, 5), np.int64), np.arange(5)[None], cache)
    with pytest.raises(PipelineError, match="mask must cover past"):
        engine.step(np.ones((1, 2), np.int64), np.ones((1, 3), np.int64), np.arange(2)[None], cache)
    with pytest.raises(PipelineError, match="empty prompt"):
        generate_ids(engine, [[]], 4, Sampling())
    with pytest.raises(PipelineError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)
    with pytest.raises(PipelineError, match="no tokenizer"):
        engine.generate("hello")
    with pytest.raises(PipelineError, match="no engine at"):
        load(tmp_path / "missing.onnx")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(PipelineError, match="unknown engine type"):
        load(tmp_path / "model.bin")


def test_generation_agreement_counts_the_common_prefix_and_whole_matches():
    result = generation_agreement([[1, 2, 3], [4, 5, 6], [7, 8]], [[1, 2, 9], [4, 5, 6], [7, 8, 0]])
    assert result["identical"] == 1 and result["common_prefix_lengths"] == [2, 3, 2]
    assert result["token_agreement"] == 7 / 8
