"""One input file's share of a prepared dataset: its packed samples in each shard format, its held-out
validation samples, and a record written last, which says the unit is complete.

In a dataset folder (or a part's, or a preparation's staging folder) unit ``u-NNNNNN`` owns
``mds/u-NNNNNN/``, ``webdataset/u-NNNNNN/``, ``val/u-NNNNNN.npz`` and ``units/u-NNNNNN.json``. A unit packs
its own documents (its last sample is padded), so a dataset is the concatenation of its units in input
order whichever machine prepared each: parts merge into exactly what one preparation writes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from data_pipeline.packing import Packer, encode_layout
from data_pipeline.prepare_options import FORMAT_DIRS
from data_pipeline.shards import MDSSink, WebDatasetSink
from data_pipeline.tokenize_pool import Unit
from data_pipeline.validation import held_out

UNITS_DIR, VAL_DIR = "units", "val"


def unit_paths(folder: Path, unit_name: str) -> list[Path]:
    """Everything a unit owns in ``folder``."""
    return [folder / FORMAT_DIRS[f] / unit_name for f in FORMAT_DIRS] + [
        folder / VAL_DIR / f"{unit_name}.npz", folder / UNITS_DIR / f"{unit_name}.json"]


def remove_unit(folder: Path, unit_name: str) -> None:
    for path in unit_paths(folder, unit_name):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def read_unit_records(folder: Path) -> dict[int, dict]:
    """The complete units of ``folder`` by index."""
    records = {}
    for file in sorted((folder / UNITS_DIR).glob("u-*.json")):
        record = json.loads(file.read_text())
        records[int(record["unit"])] = record
    return records


class UnitWriter:
    def __init__(self, folder: Path, unit: Unit, formats: list[str], seq_len: int, pad_id: int, dtype,
                 samples_per_shard: int, val_fraction: float):
        self.folder, self.unit, self.val_fraction = Path(folder), unit, val_fraction
        remove_unit(self.folder, unit.name)  # what an interrupted attempt left
        self.sinks = []
        if "mds" in formats:
            self.sinks.append(("mds", MDSSink(self.folder / "mds" / unit.name, seq_len, dtype, samples_per_shard)))
        if "webdataset" in formats:
            self.sinks.append(("webdataset", WebDatasetSink(self.folder / "webdataset" / unit.name,
                                                            samples_per_shard)))
        self.packer = Packer(seq_len, pad_id, dtype)
        self.val_packer = Packer(seq_len, pad_id, dtype)
        self.val_tokens, self.val_layouts = [], []
        self.num_samples = 0
        self.documents = 0  # documents read (training and held out)

    def add(self, ids: np.ndarray, prompt_length: int) -> None:
        document, self.documents = self.documents, self.documents + 1
        # Held out by a hash of (unit, position in the unit): the same split whatever the parts or workers.
        if self.unit.role == "val" or (self.val_fraction and held_out(document, self.val_fraction,
                                                                        self.unit.index)):
            self._keep_validation(self.val_packer.add(ids, prompt_length))
        else:
            self._write(self.packer.add(ids, prompt_length))

    def _write(self, samples) -> None:
        for sample in samples:
            for _, sink in self.sinks:
                sink.write(self.num_samples, sample)
            self.num_samples += 1

    def _keep_validation(self, samples) -> None:
        for sample in samples:
            self.val_tokens.append(sample.tokens)
            self.val_layouts.append(encode_layout(sample))

    def finish(self) -> dict:
        """Close the shards, write the validation samples, then the record (the unit is complete)."""
        self._write(self.packer.finish())
        self._keep_validation(self.val_packer.finish())
        record = {
            "unit": self.unit.index, "file": str(self.unit.file), "role": self.unit.role,
            "bytes": self.unit.file.stat().st_size, "samples": self.num_samples,
            "tokens": self.packer.num_tokens, "documents": self.packer.num_documents,
            "val_samples": len(self.val_tokens), "val_tokens": self.val_packer.num_tokens,
            "formats": {name: sink.close() for name, sink in self.sinks},
        }
        if self.val_tokens:
            (self.folder / VAL_DIR).mkdir(parents=True, exist_ok=True)
            with open(self.folder / VAL_DIR / f"{self.unit.name}.npz", "wb") as handle:
                np.savez(handle, tokens=np.stack(self.val_tokens),
                         layouts=np.concatenate(self.val_layouts).astype(np.int64),
                         lengths=np.array([len(x) for x in self.val_layouts], dtype=np.int64))
        write_json_atomic(self.folder / UNITS_DIR / f"{self.unit.name}.json", record)
        return record

    def discard(self) -> None:
        for _, sink in self.sinks:
            try:
                sink.close()
            except Exception:  # a half-written shard of a file being dropped anyway
                pass
        remove_unit(self.folder, self.unit.name)


def write_json_atomic(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)
