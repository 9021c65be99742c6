"""A checkpoint's weights in one process, at full size, whatever layout saved them (no process group, no
model): what export, inference and the tests read. Metadata is read without unpickling code
(``parallel.checkpoint.safe_reader``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from parallel.checkpoint.safe_reader import SafeFileSystemReader


def read_tensors(folder: Path, names: list[str] | None = None, prefix: str = "model."):
    """Yield ``(name, full tensor)`` of a checkpoint's entries under ``prefix``, one at a time."""
    metadata = SafeFileSystemReader(str(folder)).read_metadata()
    keys = [k for k in metadata.state_dict_metadata if k.startswith(prefix)]
    if names is not None:
        wanted = {prefix + n for n in names}
        keys = [k for k in keys if k in wanted]
    for key in sorted(keys):
        meta = metadata.state_dict_metadata[key]
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({key: tensor}, storage_reader=SafeFileSystemReader(str(folder)), no_dist=True)
        yield key[len(prefix):], tensor


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint at full size (small models and tests)."""
    return dict(read_tensors(folder))
