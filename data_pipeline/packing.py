"""Pack tokenized documents into fixed-length samples, recording where documents start.

Documents are concatenated (each already ends with the end-of-document token) and cut every
``seq_len`` tokens; a document may continue into the next sample. Each sample records
``doc_starts`` (positions where a document begins, so attention can be kept within a
document), ``prompt_spans`` (flattened ``[start, end)`` pairs of prompt tokens, which are
never masked) and ``length`` (real tokens; only the last sample of a dataset is padded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass
class PackedSample:
    tokens: np.ndarray  # [seq_len]
    length: int
    doc_starts: np.ndarray  # int32 [k]
    prompt_spans: np.ndarray  # int32 [2m]


class Packer:
    def __init__(self, seq_len: int, pad_id: int, dtype=np.int32):
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.dtype = dtype
        self._tokens: list[np.ndarray] = []
        self._size = 0
        self._starts: list[int] = []
        self._spans: list[tuple[int, int]] = []
        self.num_documents = 0
        self.num_tokens = 0

    def add(self, ids: np.ndarray, prompt_length: int = 0) -> Iterator[PackedSample]:
        """Append one document (``prompt_length`` leading tokens are prompt); yield full samples."""
        ids = np.asarray(ids, dtype=self.dtype)
        self.num_documents += 1
        self.num_tokens += len(ids)
        self._starts.append(self._size)
        if prompt_length > 0:
            self._spans.append((self._size, self._size + prompt_length))
        self._tokens.append(ids)
        self._size += len(ids)
        while self._size >= self.seq_len:
            yield self._emit(self.seq_len)

    def finish(self) -> Iterator[PackedSample]:
        """The last, padded sample, if any tokens are left."""
        if self._size > 0:
            yield self._emit(self._size)

    def _emit(self, length: int) -> PackedSample:
        stream = np.concatenate(self._tokens) if len(self._tokens) > 1 else self._tokens[0]
        tokens = np.full(self.seq_len, self.pad_id, dtype=self.dtype)
        tokens[:length] = stream[:length]
        starts = np.array([s for s in self._starts if s < length], dtype=np.int32)
        spans = [(s, min(e, length)) for s, e in self._spans if s < length]
        sample = PackedSample(tokens, length, starts, np.array(spans, dtype=np.int32).reshape(-1))
        # Carry the rest over, shifting positions to the next sample's frame.
        rest = stream[length:]
        self._tokens = [rest] if len(rest) else []
        self._size = len(rest)
        self._starts = [s - length for s in self._starts if s >= length]
        self._spans = [(max(s, length) - length, e - length) for s, e in self._spans if e > length]
        return sample


def encode_layout(sample: PackedSample) -> np.ndarray:
    """``[length, num_doc_starts, *doc_starts, *prompt_spans]`` as one int32 array (never empty,
    which MDS cannot store)."""
    return np.concatenate([[sample.length, len(sample.doc_starts)], sample.doc_starts, sample.prompt_spans]).astype(
        np.int32
    )


def decode_layout(layout: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(length, doc_starts, prompt_spans) from ``encode_layout``'s array."""
    num_starts = int(layout[1])
    return int(layout[0]), layout[2:2 + num_starts], layout[2 + num_starts:]


def sample_masks(lengths: np.ndarray, doc_starts: list[np.ndarray], prompt_spans: list[np.ndarray], seq_len: int):
    """Per-token arrays ``[b, seq_len]`` for a batch of packed samples, built with array ops:
    ``real`` (not padding), ``maskable`` (real and not prompt), ``segments`` (document index;
    -1 on padding)."""
    b = len(lengths)
    positions = np.arange(seq_len)[None, :]
    real = positions < np.asarray(lengths)[:, None]
    rows = np.repeat(np.arange(b), [len(s) for s in doc_starts])
    boundary = np.zeros((b, seq_len + 1), dtype=np.int32)
    if len(rows):
        np.add.at(boundary, (rows, np.concatenate(doc_starts)), 1)
    segments = np.cumsum(boundary[:, :seq_len], axis=1)
    segments = np.where(real, segments, -1).astype(np.int32)
    prompt = np.zeros((b, seq_len + 1), dtype=np.int32)
    pairs = [s.reshape(-1, 2) for s in prompt_spans]
    span_rows = np.repeat(np.arange(b), [len(p) for p in pairs])
    if len(span_rows):
        spans = np.concatenate(pairs)
        np.add.at(prompt, (span_rows, spans[:, 0]), 1)
        np.add.at(prompt, (span_rows, spans[:, 1]), -1)
    in_prompt = np.cumsum(prompt[:, :seq_len], axis=1) > 0
    return real, real & ~in_prompt, segments
