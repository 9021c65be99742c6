"""The validation split: packed like the training samples, kept in one small ``val.npz`` that every rank
reads in full (no streaming, no order to keep), and turned into masked batches from a fixed seed.

Held-out documents are chosen by a hash of their input file's position and their position in that file
(``--val-fraction``), so the split depends on neither the number of tokenization workers nor the parts a
preparation is cut into; or they come from ``--val-input``. Each input file's validation samples are packed
on their own (``data_pipeline.unit_writer``) and ``write_validation`` joins them in input order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.masking import MaskedBatch, hashed_uniform_one

VAL_FILE = "val.npz"
_STREAM_SPLIT = 11


def held_out(document: int, fraction: float, unit: int = 0) -> bool:
    """Whether document ``document`` of input file ``unit`` is held out."""
    return hashed_uniform_one(unit, _STREAM_SPLIT, document) < fraction


def write_validation(folder: Path, pieces: list[Path], num_tokens: int) -> dict | None:
    """``folder/val.npz`` from the units' validation pieces (in input order); None when there are none."""
    tokens, layouts = [], []
    for piece in pieces:
        with np.load(piece, allow_pickle=False) as data:
            tokens.append(data["tokens"])
            bounds = np.concatenate([[0], np.cumsum(data["lengths"])])
            layouts += [data["layouts"][bounds[i]:bounds[i + 1]] for i in range(len(data["lengths"]))]
    if not layouts:
        return None
    offsets = np.cumsum([0] + [len(layout) for layout in layouts]).astype(np.int64)
    path = Path(folder) / VAL_FILE
    with open(path, "wb") as handle:
        np.savez(handle, tokens=np.concatenate(tokens), layouts=np.concatenate(layouts).astype(np.int64),
                 offsets=offsets)
    return {"file": VAL_FILE, "num_samples": len(layouts), "num_tokens": num_tokens,
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
