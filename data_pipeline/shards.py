"""Shard files and the manifest: writing (MDS and webdataset) and checking before reading.

A prepared dataset directory holds ``manifest.json``, ``tokenizer.json`` and one folder per
format: ``mds/`` (one ``MDSWriter`` output per input file, ``mds/u-NNNNNN/``, and the merged ``index.json``
that lists their shards in input order) and/or ``webdataset/`` (``u-NNNNNN/shard-NNNNNN.tar``), with the same
samples in the same order. A sample's index is its position in that order (the MDS sample id; for
webdataset, the samples of the shards before it in the manifest plus its position in its shard).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds
from streaming import MDSWriter

from data_pipeline.errors import DataError
from data_pipeline.packing import PackedSample, encode_layout

MANIFEST = "manifest.json"


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


class MDSSink:
    """MDS shards in ``folder`` (its own ``index.json``); ``close()`` describes them relative to ``folder``'s
    parent (the format folder)."""

    def __init__(self, folder: Path, seq_len: int, dtype, samples_per_shard: int):
        self.dir = Path(folder)
        sample_bytes = seq_len * np.dtype(dtype).itemsize + 64
        self.writer = MDSWriter(
            out=str(self.dir),
            columns={
                "tokens": f"ndarray:{np.dtype(dtype).name}:{seq_len}",
                "layout": "ndarray:int32",
            },
            hashes=["sha1", "xxh64"],
            size_limit=max(sample_bytes * samples_per_shard, 1 << 12),
            progress_bar=False,
        )

    def write(self, index: int, sample: PackedSample) -> None:
        self.writer.write({"tokens": sample.tokens, "layout": encode_layout(sample)})

    def close(self) -> list[dict]:
        self.writer.finish()
        index = json.loads((self.dir / "index.json").read_text())
        return [_describe(self.dir / shard["raw_data"]["basename"], shard["samples"], self.dir.name)
                for shard in index["shards"]]


class WebDatasetSink:
    """webdataset shards in ``folder``, described like ``MDSSink``'s."""

    def __init__(self, folder: Path, samples_per_shard: int):
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.shards: list[tuple[Path, int]] = []
        self.writer = None

    def write(self, index: int, sample: PackedSample) -> None:
        if self.writer is None or self.shards[-1][1] >= self.samples_per_shard:
            self._roll()
        self.writer.write({
            "__key__": f"{index:012d}",
            "tokens.npy": sample.tokens,
            "layout.npy": encode_layout(sample),
        })
        path, count = self.shards[-1]
        self.shards[-1] = (path, count + 1)

    def _roll(self) -> None:
        if self.writer is not None:
            self.writer.close()
        path = self.dir / f"shard-{len(self.shards):06d}.tar"
        self.writer = wds.TarWriter(str(path), mtime=0.0)  # fixed mtime: byte-identical reruns
        self.shards.append((path, 0))

    def close(self) -> list[dict]:
        if self.writer is not None:
            self.writer.close()
        return [_describe(path, count, self.dir.name) for path, count in self.shards]


def _describe(path: Path, samples: int, subfolder: str) -> dict:
    return {"file": f"{subfolder}/{path.name}", "samples": samples, "bytes": path.stat().st_size,
            "sha256": file_sha256(path)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    file = root / MANIFEST
    if not file.is_file():
        raise DataError(
            f"--data.path: {root} has no {MANIFEST}; prepare it with `memdlm-prepare-data --input TEXT --output {root}`"
        )
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{file} is not valid JSON ({err.msg}); prepare the dataset again") from None


def check_shards(root: str | Path, manifest: dict, data_format: str, verify_hashes: bool) -> Path:
    """The format's shard folder after checking every shard exists with its recorded size (and
    sha256 when ``verify_hashes``); a DataError names the first bad shard."""
    entry = manifest.get("formats", {}).get(data_format)
    if entry is None:
        have = ", ".join(sorted(manifest.get("formats", {}))) or "none"
        raise DataError(
            f"--data.format {data_format}: {root} was not prepared in that format (it has: {have}); "
            f"run memdlm-prepare-data --format {data_format} or pick one of those"
        )
    folder = Path(root) / entry["dir"]
    if data_format == "mds":
        check_mds_columns(folder)
    for shard in entry["shards"]:
        path = folder / shard["file"]
        if not path.is_file():
            raise DataError(f"shard {path} is missing; restore it or prepare the dataset again")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise DataError(
                f"shard {path} has {size} bytes but the manifest records {shard['bytes']} (truncated or "
                "replaced); restore it or prepare the dataset again"
            )
        if verify_hashes and file_sha256(path) != shard["sha256"]:
            raise DataError(
                f"shard {path} does not match its sha256 in the manifest (corrupt); restore it or prepare "
                "the dataset again (--data.verify_hashes false skips this check)"
            )
    return folder


MDS_COLUMNS = ("layout", "tokens")  # what MDSSink writes: integer arrays only


def check_mds_columns(folder: Path) -> None:
    """Refuse an MDS index whose shards declare other columns or encodings than ``MDSSink`` writes:
    mosaicml-streaming decodes a ``pkl`` (or ``json``, ``jpeg``, ...) column with that codec, and unpickling
    a column of a dataset from elsewhere would run its code."""
    index_file = folder / "index.json"
    try:
        shards = json.loads(index_file.read_text())["shards"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{index_file} cannot be read ({type(err).__name__}: {err}); prepare the dataset again") \
            from None
    for shard in shards:
        names, encodings = shard.get("column_names"), shard.get("column_encodings")
        if (shard.get("format") != "mds" or names is None or encodings is None or tuple(sorted(names)) != MDS_COLUMNS
                or not all(isinstance(e, str) and e.startswith("ndarray:") for e in encodings)):
            raise DataError(
                f"{index_file} declares columns {names} with encodings {encodings}; only the integer-array columns "
                f"{list(MDS_COLUMNS)} that memdlm-prepare-data writes are read (another codec, such as pkl, could "
                "run code when decoded); prepare the dataset with memdlm-prepare-data")


def decode_webdataset_sample(raw: dict, sample_index: int) -> dict:
    """A webdataset sample's raw member bytes -> the same fields as an MDS sample."""
    def array(name):
        return np.load(io.BytesIO(raw[name]), allow_pickle=False)

    try:
        return {"tokens": array("tokens.npy"), "layout": array("layout.npy"), "sample_index": sample_index}
    except (KeyError, ValueError, OSError, tarfile.TarError) as err:
        raise DataError(f"sample {raw.get('__key__')} in {raw.get('__url__')} is malformed ({err})") from None
