"""What ``memdlm-prepare-data`` is asked to do, checked; apart from the preparation itself so that the command
line shows its defaults (``--help``) without importing the shard writers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from data_pipeline.errors import DataError

FORMAT_DIRS = {"mds": "mds", "webdataset": "webdataset"}  # shard format -> its folder in a prepared dataset


@dataclass
class PrepareOptions:
    input: str
    output: str
    formats: list[str] = field(default_factory=lambda: ["mds"])
    seq_len: int = 128
    vocab_size: int = 4096
    tokenizer: str = ""  # empty: train a byte-level BPE on the input
    tokenizer_sample_mb: int = 1024
    num_workers: int = max(1, min(4, (os.cpu_count() or 2) - 1))
    samples_per_shard: int = 4096
    overwrite: bool = False
    progress: bool = True
    val_fraction: float = 0.0  # documents held out for validation (chosen by a hash of their index)
    val_input: str = ""  # or: separate validation text/JSONL
    val_optional: bool = False  # an empty split is left out (input prepared on first use) instead of an error

    def check(self) -> None:
        unknown = [f for f in self.formats if f not in FORMAT_DIRS]
        if unknown or not self.formats:
            raise DataError(f"--format: unknown format(s) {unknown}; choose mds, webdataset or both")
        if self.seq_len < 2:
            raise DataError(f"--seq-len: a sequence needs at least 2 tokens, got {self.seq_len}")
        if self.vocab_size < 300 and not self.tokenizer:  # only a BPE trained here needs the byte alphabet
            raise DataError(f"--vocab-size: {self.vocab_size} is below the 256 bytes + special tokens a byte-level "
                            "BPE needs")
        if self.samples_per_shard < 1:
            raise DataError("--samples-per-shard must be positive")
        if self.num_workers < 0:
            raise DataError("--num-workers must be >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must lie in [0, 1), got {self.val_fraction}")
        if self.val_fraction and self.val_input:
            raise DataError("--val-fraction and --val-input exclude each other; give one")
