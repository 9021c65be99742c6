"""Input documents, streamed: plain text, JSON Lines, or a directory of them.

- ``*.jsonl`` / ``*.json``: one JSON object per line, ``{"text": ...}`` or
  ``{"prompt": ..., "response": ...}`` (the prompt is context: never masked, no loss);
- anything else: UTF-8 text, one document per run of non-blank lines.

A directory is walked recursively in sorted order (hidden files skipped), so the document
order, and with it the packed samples, are the same on every run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data_pipeline.errors import DataError

JSON_SUFFIXES = {".jsonl", ".json"}


@dataclass
class Document:
    text: str  # the response for prompt/response documents
    prompt: str | None = None


def input_files(path: str | Path) -> list[Path]:
    root = Path(path)
    if not root.exists():
        raise DataError(f"--input: {root} does not exist; pass a text/JSONL file or a directory of them")
    if root.is_file():
        files = [root]
    else:
        files = sorted(
            p for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise DataError(f"--input: {root} holds no non-empty files; pass text or JSONL files")
    return files


def _json_documents(file: Path) -> Iterator[Document]:
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{file}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{file}:{number}: expected a JSON object with 'text' or 'prompt'/'response'")
            if "text" in record:
                yield Document(str(record["text"]))
            elif "prompt" in record and "response" in record:
                yield Document(str(record["response"]), prompt=str(record["prompt"]))
            else:
                raise DataError(
                    f"{file}:{number}: a JSON line needs a 'text' field or 'prompt' and 'response' fields, "
                    f"found {sorted(record)[:5]}"
                )


def _text_documents(file: Path) -> Iterator[Document]:
    lines: list[str] = []
    with open(file, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                lines.append(line)
            elif lines:
                yield Document("".join(lines))
                lines = []
    if lines:
        yield Document("".join(lines))


def iter_documents(files: list[Path]) -> Iterator[Document]:
    for file in files:
        reader = _json_documents if file.suffix.lower() in JSON_SUFFIXES else _text_documents
        try:
            yield from reader(file)
        except UnicodeDecodeError as err:
            raise DataError(f"{file} is not UTF-8 text (byte {err.start}: {err.reason})") from None


def iter_training_text(files: list[Path]) -> Iterator[str]:
    """All text of the documents (prompts and responses), for training a tokenizer."""
    for document in iter_documents(files):
        if document.prompt:
            yield document.prompt
        yield document.text
