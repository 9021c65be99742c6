"""The validation split: packed like the training samples, kept in one small ``val.npz`` that every rank
reads in full (no streaming, no order to keep), and turned into masked batches from a fixed seed.

Held-out documents are chosen by a hash of their position in the input (``--val-fraction``), so the
split does not depend on the number of tokenization workers; or they come from ``--val-input``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.masking import MaskedBatch, hashed_uniform
from data_pipeline.packing import Packer, encode_layout

VAL_FILE = "val.npz"
_STREAM_SPLIT = 11


def held_out(document: int, fraction: float) -> bool:
    return bool(hashed_uniform(0, _STREAM_SPLIT, np.array([document]), 0, 1)[0, 0] < fraction)


class ValidationSink:
    def __init__(self, seq_len: int, pad_id: int, dtype):
        self.packer = Packer(seq_len, pad_id, dtype)
        self.tokens, self.layouts = [], []

    def add(self, ids: np.ndarray, prompt_length: int) -> None:
        self._keep(self.packer.add(ids, prompt_length))

    def _keep(self, samples) -> None:
        for sample in samples:
            self.tokens.append(sample.tokens)
            self.layouts.append(encode_layout(sample))

    def is_empty(self) -> bool:
        self._keep(self.packer.finish())
        return not self.tokens

    def save(self, folder: Path) -> dict:
        self._keep(self.packer.finish())
        if not self.tokens:
            raise DataError("the validation split is empty: raise --val-fraction or give a larger --val-input")
        offsets = np.cumsum([0] + [len(layout) for layout in self.layouts]).astype(np.int64)
        path = Path(folder) / VAL_FILE
        with open(path, "wb") as handle:
            np.savez(handle, tokens=np.stack(self.tokens), layouts=np.concatenate(self.layouts).astype(np.int64),
                     offsets=offsets)
        return {"file": VAL_FILE, "num_samples": len(self.tokens), "num_tokens": self.packer.num_tokens,
                "size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def read_validation(root: Path, manifest: dict) -> tuple[np.ndarray, list[np.ndarray]]:
    """(tokens ``[n, l]``, each sample's layout); checked against the manifest."""
    entry = manifest.get("validation")
    if entry is None:
        raise DataError(f"{root} has no validation split; prepare it with memdlm-prepare-data --val-fraction F "
                        "(or --val-input PATH), or set --data.val_fraction for raw input")
    path = Path(root) / entry["file"]
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
        raise DataError(f"{path} is missing or does not match its sha256 in the manifest")
    with np.load(path, allow_pickle=False) as data:
        tokens, layouts, offsets = data["tokens"], data["layouts"], data["offsets"]
    return tokens, [layouts[offsets[i]:offsets[i + 1]] for i in range(len(tokens))]


def validation_batches(root: Path, manifest: dict, collates: list, indices: list[int],
                       batch_size: int) -> list[list[MaskedBatch]]:
    """Masked batches of validation samples ``indices``, one list per collate (``MaskingCollate`` objects:
    the evaluation's masks, the adaptation's; a sample's masks depend only on it and its index). The file
    is read and checked once."""
    tokens, layouts = read_validation(root, manifest)
    samples = [{"tokens": tokens[i], "layout": layouts[i], "sample_index": i, "epoch": 0} for i in indices]
    return [[collate(samples[start:start + batch_size]) for start in range(0, len(samples), batch_size)]
            for collate in collates]
