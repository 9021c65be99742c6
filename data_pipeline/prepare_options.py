"""What ``memdlm-prepare-data`` is asked to do, checked; apart from the preparation itself so that the command
line shows its defaults (``--help``) without importing the shard writers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from data_pipeline.errors import DataError

FORMAT_DIRS = {"mds": "mds", "webdataset": "webdataset"}  # shard format -> its folder in a prepared dataset
DEFAULT_BPE_VOCAB = 4096


@dataclass
class PrepareOptions:
    input: str
    output: str
    formats: list[str] = field(default_factory=lambda: ["mds"])
    seq_len: int = 128
    vocab_size: int = 0  # 0: 4096 for a BPE trained here, the tokenizer's own size for a loaded one
    tokenizer: str = ""  # empty: train a byte-level BPE on the input
    tokenizer_sample_mb: int = 1024
    num_workers: int = max(1, min(4, (os.cpu_count() or 2) - 1))
    samples_per_shard: int = 4096
    overwrite: bool = False
    progress: bool = True
    val_fraction: float = 0.0  # documents held out for validation (chosen by a hash of their position)
    val_input: str = ""  # or: separate validation files
    val_optional: bool = False  # an empty split is left out (input prepared on first use) instead of an error
    text_field: str = "text"  # the JSON field / Parquet column of a document's text
    prompt_field: str = "prompt"  # ... or of a prompt (never masked) and its response
    response_field: str = "response"
    max_bad_files: int = 0  # unreadable input files skipped (each named) before the preparation stops
    eot_token: str = ""  # the token appended to every document (empty: the tokenizer's end-of-text token)
    mask_token: str = ""  # the mask token (empty: found under the usual names)
    add_mask_token: str = ""  # add this mask token to a loaded tokenizer
    num_parts: int = 1  # write part ``part`` of ``num_parts`` (input files dealt out round robin)
    part: int = -1
    tokenizer_only: bool = False  # only train (or load) the tokenizer into OUTPUT/tokenizer.json

    @property
    def split(self) -> bool:
        return self.part >= 0

    @property
    def bpe_vocab_size(self) -> int:
        return self.vocab_size or DEFAULT_BPE_VOCAB

    def check(self) -> None:
        unknown = [f for f in self.formats if f not in FORMAT_DIRS]
        if unknown or not self.formats:
            raise DataError(f"--format: unknown format(s) {unknown}; choose mds, webdataset or both")
        if self.seq_len < 2:
            raise DataError(f"--seq-len: a sequence needs at least 2 tokens, got {self.seq_len}")
        if self.vocab_size < 0:
            raise DataError(f"--vocab-size must be positive (or 0 for the default), got {self.vocab_size}")
        if not self.tokenizer and self.bpe_vocab_size < 300:  # only a BPE trained here needs the byte alphabet
            raise DataError(f"--vocab-size: {self.vocab_size} is below the 256 bytes + special tokens a byte-level "
                            "BPE needs")
        if self.add_mask_token and not self.tokenizer:
            raise DataError("--add-mask-token adds a mask token to a loaded tokenizer (--tokenizer); a BPE trained "
                            "here has one already")
        if self.samples_per_shard < 1:
            raise DataError("--samples-per-shard must be positive")
        if self.num_workers < 0:
            raise DataError("--num-workers must be >= 0")
        if self.max_bad_files < 0:
            raise DataError("--max-bad-files must be >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must lie in [0, 1), got {self.val_fraction}")
        if self.val_fraction and self.val_input:
            raise DataError("--val-fraction and --val-input exclude each other; give one")
        if not self.text_field or not self.prompt_field or not self.response_field:
            raise DataError("--text-field, --prompt-field and --response-field must not be empty")
        if self.num_parts < 1:
            raise DataError(f"--num-parts must be >= 1, got {self.num_parts}")
        if self.num_parts > 1 and not 0 <= self.part < self.num_parts:
            raise DataError(f"--part must lie in [0, {self.num_parts}) with --num-parts {self.num_parts} (a Slurm "
                            f"array job passes --part $SLURM_ARRAY_TASK_ID), got {self.part}")
        if self.part >= 0 and self.num_parts == 1 and self.part != 0:
            raise DataError(f"--part {self.part} needs --num-parts")
        if self.split and not self.tokenizer:
            raise DataError(
                "--num-parts: every part must tokenize with the same tokenizer; pass --tokenizer (a Hugging Face "
                "tokenizer, or one trained first with `memdlm-prepare-data --input ... --output DIR "
                "--tokenizer-only`, then --tokenizer DIR/tokenizer.json)")
        if self.tokenizer_only and self.split:
            raise DataError("--tokenizer-only prepares no data; run it before the parts, without --num-parts")
