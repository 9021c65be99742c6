"""Text corpus -> token stream -> fixed-length packed sequences (the in-memory path).

A plain text file is split into documents at blank lines; each document is tokenized and
followed by the end-of-document token; the stream is cut into ``seq_len`` sequences (the
tail that does not fill one is dropped). Token arrays are cached per (file, tokenizer).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.tokenizer import TokenizerInfo, load_tokenizer, train_bpe

BUNDLED_CORPUS = Path(__file__).resolve().parent / "corpus" / "tinyshakespeare.txt"


def default_cache_dir() -> Path:
    root = os.environ.get("MEMDLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "memdlm")
    return Path(root)


def check_text_file(path: str | Path, option: str = "--data.path") -> Path:
    """The path of a readable, non-empty UTF-8 text file, or a DataError saying what is wrong."""
    file = Path(path)
    if not file.exists():
        raise DataError(f"{option}: {file} does not exist; pass a UTF-8 text file, or omit it for the bundled corpus")
    if not file.is_file():
        raise DataError(f"{option}: {file} is not a file; pass a UTF-8 text file")
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


def iter_documents(file: Path) -> Iterator[str]:
    """Documents of a text file: runs of non-blank lines, streamed."""
    lines: list[str] = []
    with open(file, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines)
                lines = []
    if lines:
        yield "".join(lines)


def tokenize_file(file: Path, tokenizer: TokenizerInfo, cache_dir: Path, batch_docs: int = 1024) -> np.ndarray:
    """All documents of ``file`` as one int32 token stream, each followed by end-of-document."""
    key = hashlib.sha256(file.read_bytes()).hexdigest()[:16] + "-" + tokenizer.fingerprint()
    target = cache_dir / "tokens" / f"{key}.npy"
    if target.is_file():
        return np.load(target)
    pieces: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        for encoding in tokenizer.tokenizer.encode_batch(batch, add_special_tokens=False):
            pieces.append(np.asarray(encoding.ids + [tokenizer.eot_id], dtype=np.int32))
        batch.clear()

    for document in iter_documents(file):
        batch.append(document)
        if len(batch) >= batch_docs:
            flush()
    flush()
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial.npy")
    np.save(partial, tokens)
    partial.replace(target)
    return tokens


def pack_sequences(tokens: np.ndarray, seq_len: int, source: str = "the corpus") -> np.ndarray:
    """Cut a token stream into ``[num_sequences, seq_len]``; an error if not even one fits."""
    num_sequences = len(tokens) // seq_len
    if num_sequences == 0:
        raise DataError(
            f"{source} has {len(tokens)} tokens, fewer than one sequence of --model.seq_len {seq_len}; "
            "use a shorter --model.seq_len or more text"
        )
    return tokens[: num_sequences * seq_len].reshape(num_sequences, seq_len)


@dataclass
class PackedCorpus:
    sequences: np.ndarray  # [num_sequences, seq_len] int32
    tokenizer: TokenizerInfo
    source: Path


def load_packed_corpus(path: str, tokenizer: str, vocab_size: int, seq_len: int, cache_dir: str = "") -> PackedCorpus:
    """The text at ``path`` (default: the bundled corpus), tokenized and packed; tokenizer
    trained (cached) when ``tokenizer`` is empty, loaded otherwise."""
    file = check_text_file(path) if path else BUNDLED_CORPUS
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    info = load_tokenizer(tokenizer) if tokenizer else train_bpe([file], vocab_size, cache)
    if info.vocab_size > vocab_size:
        raise DataError(
            f"the tokenizer has {info.vocab_size} tokens but --model.vocab_size is {vocab_size}; "
            f"set --model.vocab_size {info.vocab_size} or more"
        )
    tokens = tokenize_file(file, info, cache)
    return PackedCorpus(pack_sequences(tokens, seq_len, source=str(file)), info, file)
