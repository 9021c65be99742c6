"""Tokenization in a process pool, results in input order.

The main process reads the input units (files) and sends their documents in chunks to the pool; each chunk
comes back as token ids (the document's prompt, its text and the end-of-text token) in input order, tagged
with its unit, followed by the unit's end, or its skip when the file turned out unreadable within the
``--max-bad-files`` budget. A bounded window of chunks in flight keeps memory flat.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipeline.documents import BadFiles, Document, Fields, file_documents
from data_pipeline.errors import DataError

DOCS_PER_TASK = 1024


@dataclass(frozen=True)
class Unit:
    """One input file: the unit of resuming, of parts and of packing (its last sample is padded)."""

    index: int  # its position among all inputs (training files, then --val-input files)
    file: Path
    role: str  # "train" (documents held out by --val-fraction) or "val" (all of them validation)

    @property
    def name(self) -> str:
        return f"u-{self.index:06d}"


@dataclass
class Event:
    """``docs``: a chunk's encoded documents; ``end``: the unit is complete; ``skip``: the unit is unreadable."""

    unit: Unit
    kind: str
    documents: list[tuple[np.ndarray, int]] | None = None  # (ids, prompt length)
    position: int = 0  # bytes of the unit's file read when the chunk was cut
    reason: str = ""


_worker_tokenizer = None


def init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def encode(task: tuple[list[str], list[str] | None, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A chunk's texts (and prompts) -> its documents' token ids (prompt, text, end-of-text token) end to end in
    one int32 array, with each document's length and prompt length: three arrays cross the process boundary,
    not one object per document."""
    texts, prompts, eot_id = task
    bodies = [e.ids for e in _worker_tokenizer.encode_batch(texts, add_special_tokens=False)]
    if prompts is not None:
        heads = [e.ids for e in _worker_tokenizer.encode_batch(prompts, add_special_tokens=False)]
    else:
        heads = [[] for _ in texts]
    prompt_lengths = np.fromiter(map(len, heads), dtype=np.int64, count=len(texts))
    lengths = prompt_lengths + np.fromiter(map(len, bodies), dtype=np.int64, count=len(texts)) + 1
    flat = np.empty(int(lengths.sum()), dtype=np.int32)
    ends = np.cumsum(lengths)
    flat[ends - 1] = eot_id
    starts = ends - lengths
    for start, head, body in zip(starts.tolist(), heads, bodies):
        flat[start:start + len(head)] = head
        flat[start + len(head):start + len(head) + len(body)] = body
    return flat, lengths, prompt_lengths


def split_documents(encoded: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[tuple[np.ndarray, int]]:
    """``encode``'s arrays -> (ids, prompt length) per document (views of the one array)."""
    flat, lengths, prompt_lengths = encoded
    return list(zip(np.split(flat, np.cumsum(lengths)[:-1]), prompt_lengths.tolist()))


def _task(chunk: list[Document], eot_id: int) -> tuple[list[str], list[str] | None, int]:
    prompts = [d.prompt for d in chunk]
    return [d.text for d in chunk], ([p or "" for p in prompts] if any(prompts) else None), eot_id


def _tasks(units: list[Unit], fields: Fields, eot_id: int, bad: BadFiles):
    """(unit, kind, task, position) in input order: document chunks, then the unit's end (or skip)."""
    for unit in units:
        position = [0]
        documents = file_documents(unit.file, fields, position)
        try:
            while chunk := list(islice(documents, DOCS_PER_TASK)):
                yield unit, "docs", _task(chunk, eot_id), position[0]
        except DataError as err:
            bad.skip(unit.file, err)  # raises when over the budget
            yield unit, "skip", str(err), position[0]
            continue
        yield unit, "end", None, position[0]


def encoded_events(units: list[Unit], tokenizer_json: str, eot_id: int, num_workers: int, fields: Fields,
                   bad: BadFiles) -> Iterator[Event]:
    """The units' events in input order (see the module docstring); ``num_workers`` 0 encodes here."""
    tasks = _tasks(units, fields, eot_id, bad)
    if num_workers == 0:
        init_worker(tokenizer_json)
        for unit, kind, task, position in tasks:
            yield _event(unit, kind, split_documents(encode(task)) if kind == "docs" else None, position, task)
        return
    # Spawned, not forked: a fork copies the locks of the caller's other threads (a trainer or a test
    # process has loader threads), and a worker that inherits a held one never starts (seen: a hang).
    context = multiprocessing.get_context("spawn")
    pending: list = []
    with context.Pool(num_workers, initializer=init_worker, initargs=(tokenizer_json,)) as pool:
        for unit, kind, task, position in tasks:
            result = pool.apply_async(encode, (task,)) if kind == "docs" else None
            pending.append((unit, kind, result, position, task))
            while len(pending) > 4 * num_workers or (pending and pending[0][2] is None):
                yield _finished(pending.pop(0))
        for entry in pending:
            yield _finished(entry)


def _finished(entry) -> Event:
    unit, kind, result, position, task = entry
    return _event(unit, kind, split_documents(result.get()) if result is not None else None, position, task)


def _event(unit: Unit, kind: str, documents, position: int, task) -> Event:
    return Event(unit, kind, documents, position, reason=task if kind == "skip" else "")
