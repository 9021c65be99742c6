"""torch.distributed.checkpoint's ``.metadata`` read without running code.

DCP pickles its metadata (tensor shapes, dtypes, where each chunk lies) and its ``FileSystemReader`` unpickles
it with ``pickle.load``: a ``.metadata`` replaced by a hostile pickle would run anything at load time, and
every reader (resume, export, generation, evaluation) loads it. ``SafeFileSystemReader`` unpickles it with an
allow-list of the classes DCP's metadata is made of; anything else is refused with a one-line
``CheckpointError``. The tensor files themselves DCP already reads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from parallel.checkpoint.manifest import CheckpointError

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
ALLOWED = {
    (_METADATA_MODULE, name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch", "device"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
} | {("torch", name) for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of checkpoint metadata")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as handle:
            try:
                metadata = _MetadataUnpickler(handle).load()
            except Exception as err:  # refusals and damaged files alike: never a traceback into a pickle
                raise CheckpointError(f"{path} is not checkpoint metadata this trainer reads ({err}); it is not "
                                      "loaded") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
