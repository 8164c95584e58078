"""Calibration sources: chat-template rendering of jsonl/txt records, Hugging Face datasets (a local dataset
folder, read offline by the datasets library) and the errors of each."""

import copy
import json
import os
import subprocess
import sys

import pytest

from calibration import CalibrationError
from calibration.data import build_windows
from calibration.sources import source_text

# A minimal template in the style of ChatML (SmolLM2's): role markers around each turn, special tokens as text.
TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."}]


@pytest.fixture
def chat_tokenizer(tokenizer):
    t = copy.deepcopy(tokenizer)
    t.chat_template = TEMPLATE
    return t


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_messages_and_text_records_are_rendered_by_the_models_template(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"text": "Tell me about the sea."}])
    text = source_text(str(path), chat_tokenizer, chat=True)
    assert text == ("<s>user\nWhat is the capital of France?</s>\n<s>assistant\nParis is the capital of France.</s>\n"
                    "\n\n<s>user\nTell me about the sea.</s>\n")
    # the markers become the tokenizer's special tokens, as they will in production prompts
    ids = chat_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(chat_tokenizer.bos_token_id) == 3 and ids.count(chat_tokenizer.eos_token_id) == 3


def test_a_txt_file_gives_one_user_turn_per_paragraph(tmp_path, chat_tokenizer):
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph.\n\nSecond one.\n\n\n")
    assert source_text(str(path), chat_tokenizer, chat=True) == \
        "<s>user\nFirst paragraph.</s>\n\n\n<s>user\nSecond one.</s>\n"
    assert source_text(str(path), chat_tokenizer, chat=False) == "First paragraph.\n\nSecond one.\n\n\n"  # as is


def test_chat_records_need_the_template_and_the_template_must_exist(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    with pytest.raises(CalibrationError, match="holds chat 'messages': pass --chat-template"):
        source_text(str(path), tokenizer, chat=False)
    with pytest.raises(CalibrationError, match="tokenizer has no chat template.*drop --chat-template"):
        source_text(str(path), tokenizer, chat=True)


def test_a_local_dataset_folder_gives_the_same_windows_as_the_same_jsonl(tmp_path, tokenizer, corpus):
    paragraphs = [p for p in corpus.read_text().split("\n\n") if p.strip()]
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": p} for p in paragraphs])
    as_file = build_windows(None, tokenizer, str(folder / "train.jsonl"), None, 3, 1, 2, 16, 0)
    as_dataset = build_windows(None, tokenizer, f"hf:{folder}", None, 3, 1, 2, 16, 0)
    assert as_dataset.calibration.tolist() == as_file.calibration.tolist()
    assert as_dataset.evaluation.tolist() == as_file.evaluation.tolist()
    assert as_dataset.calibration_origin.startswith(f"hf:{folder}: last 3 windows")


def test_a_dataset_that_cannot_be_loaded_is_one_clear_line_and_exit_2(tmp_path, tiny_model_dir):
    # A fresh process with the hub switched off: this machine cannot reach the hub either way, but offline mode
    # fails at once instead of after the hub client's retries.
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "pipeline", "calibrate", "--model", str(tiny_model_dir), "--out",
                           str(out), "--calib", "hf:nobody/no-such-dataset:x:test"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "cannot load Hugging Face dataset 'hf:nobody/no-such-dataset:x:test'" in errors[0]
    assert "download it while online, or pass a local .txt/.jsonl" in errors[0]
    assert not (out / "windows.npz").exists()


def test_a_dataset_without_a_text_column(tmp_path):
    folder = tmp_path / "tabular"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"label": 1, "score": 0.5}])
    with pytest.raises(CalibrationError, match="has no 'text' or 'messages' column \\(it has label, score\\)"):
        source_text(f"hf:{folder}", None, chat=False)


def test_the_chat_template_needs_a_text_source():
    from pipeline import PipelineError
    from pipeline.config import CalibrationConfig

    with pytest.raises(PipelineError, match="--chat-template renders a calibration file or dataset, and CALIB is "
                                            "synthetic"):
        CalibrationConfig(chat_template=True)


def test_an_unknown_sampling_dtype_is_refused_with_the_choices():
    from pipeline import PipelineError
    from pipeline.config import CalibrationConfig

    with pytest.raises(PipelineError, match="unknown --sampling-dtype 'float16': use one of auto, bfloat16, float32"):
        CalibrationConfig(sampling_dtype="float16")
