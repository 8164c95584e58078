"""Calibration and evaluation text from a source: a .txt file, a .jsonl file (one {"text": ...} or
{"messages": [{"role": ..., "content": ...}, ...]} object per line), or a Hugging Face dataset named
`hf:<name>[:<config>[:<split>]]` (local dataset folders work offline).

With a chat template, each record is rendered by the model's own template before tokenizing: an instruct model
in production sees its role markers and special tokens, and their activations (often the largest of all) belong in
the calibration statistics. Plain text records become one user turn; a .txt file gives one turn per paragraph.
"""

from __future__ import annotations

import json
from pathlib import Path

from calibration import CalibrationError

HF_PREFIX = "hf:"
SYNTHETIC = "synthetic"  # not a source of text: CALIB that asks for text sampled from the model (data.py)

Record = str | list  # plain text, or a list of chat messages


def is_dataset(source: str) -> bool:
    return source.startswith(HF_PREFIX)


def read_records(path: Path, chat: bool) -> list[Record]:
    if not path.is_file():
        raise CalibrationError(f"calibration file '{path}' does not exist: pass an existing .txt/.jsonl file, "
                               "hf:<dataset> or 'synthetic'")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise CalibrationError(f"calibration file '{path}' looks binary (NUL bytes): pass UTF-8 text or .jsonl")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"calibration file '{path}' is not UTF-8 (byte {e.start}): re-encode it as UTF-8") from None
    if path.suffix == ".jsonl":
        records = _jsonl_records(path, text)
    else:
        records = [p for p in text.split("\n\n") if p.strip()] if chat else [text]
    if not any(r.strip() if isinstance(r, str) else r for r in records):
        raise CalibrationError(f"calibration file '{path}' is empty: pass a file with text in it")
    return records


def _jsonl_records(path: Path, text: str) -> list[Record]:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise CalibrationError(f"{path}:{lineno}: not valid JSON: each line must be an object with a 'text' field") from None
        try:
            records.append(_record(record))
        except ValueError:
            raise CalibrationError(f"{path}:{lineno}: missing string field 'text': each line must be {{\"text\": ...}} "
                                   "or {\"messages\": [...]}") from None
    return records


def _record(row) -> Record:
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        return row["messages"]
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    raise ValueError(row)


def dataset_records(source: str) -> list[Record]:
    """Rows of a Hugging Face dataset `hf:<name>[:<config>[:<split>]]` (split default: train)."""
    name, config, split = (source[len(HF_PREFIX):].split(":") + ["", ""])[:3]
    try:
        import datasets
    except ImportError:
        raise CalibrationError(f"CALIB={source} needs the datasets package: pip install 'smoothtrt[datasets]'") from None
    try:
        rows = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # offline, unknown name/config/split: datasets raises many types, all mean "cannot load"
        first_line = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CalibrationError(f"cannot load Hugging Face dataset '{source}' ({first_line}): check the name, config "
                               "and split, or download it while online, or pass a local .txt/.jsonl") from None
    column = "messages" if "messages" in rows.column_names else "text"
    if column not in rows.column_names:
        raise CalibrationError(f"dataset '{source}' has no 'text' or 'messages' column (it has "
                               f"{', '.join(rows.column_names)}): pick a text dataset or export one to .jsonl")
    return [r for r in rows[column] if r]


def _plain(records: list[Record], source: str) -> list[str]:
    if any(not isinstance(r, str) for r in records):
        raise CalibrationError(f"'{source}' holds chat 'messages': pass --chat-template to render them with the "
                               "model's template")
    return records


def _render(records: list[Record], tokenizer, source: str) -> list[str]:
    if not getattr(tokenizer, "chat_template", None):
        raise CalibrationError(f"--chat-template: the model's tokenizer has no chat template, so '{source}' cannot be "
                               "rendered with it; drop --chat-template")
    return [tokenizer.apply_chat_template(r if isinstance(r, list) else [{"role": "user", "content": r}],
                                          tokenize=False) for r in records]


def source_text(source: str, tokenizer, chat: bool) -> str:
    """The text a calibration/evaluation source stands for, rendered with the chat template when `chat`."""
    records = dataset_records(source) if is_dataset(source) else read_records(Path(source), chat)
    parts = _render(records, tokenizer, source) if chat else _plain(records, source)
    return "\n\n".join(parts)
