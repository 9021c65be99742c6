"""The bundled corpus, the cache directory, and checks on raw text inputs."""

from __future__ import annotations

import os
from pathlib import Path

from data_pipeline.errors import DataError

BUNDLED_CORPUS = Path(__file__).resolve().parent / "corpus" / "tinyshakespeare.txt"


def default_cache_dir() -> Path:
    root = os.environ.get("MEMDLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "memdlm")
    return Path(root)


def check_text_file(path: str | Path, option: str = "--data.path") -> Path:
    """The path of a readable, non-empty UTF-8 text file, or a DataError saying what is wrong."""
    file = Path(path)
    if not file.exists():
        raise DataError(f"{option}: {file} does not exist; pass a prepared dataset directory, a text/JSONL file, "
                        "or nothing for the bundled corpus")
    if not file.is_file():
        raise DataError(f"{option}: {file} is not a file")
    if file.stat().st_size == 0:
        raise DataError(f"{option}: {file} is empty; pass a file with text in it")
    try:
        with open(file, encoding="utf-8") as handle:
            has_text = False
            while chunk := handle.read(1 << 20):
                has_text = has_text or bool(chunk.strip())
    except UnicodeDecodeError as err:
        raise DataError(f"{option}: {file} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    if not has_text:
        raise DataError(f"{option}: {file} holds only whitespace; pass a file with text in it")
    return file
