"""Where the training samples come from: a prepared dataset, or raw text prepared on first use.

``--data.path`` may name a prepared dataset directory (it has ``manifest.json``), an input file (text, JSON
Lines, Parquet, compressed or not), a directory or a glob of them; empty means the bundled TinyShakespeare
corpus. Raw input
is prepared once (both formats) into the cache, keyed by the files' names, sizes and
modification times and the preparation settings, and reused afterwards.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from data_pipeline.corpus import BUNDLED_CORPUS, check_text_file, default_cache_dir
from data_pipeline.documents import file_kind, input_files
from data_pipeline.errors import DataError
from data_pipeline.mixture import Source, check_compatible, open_sources
from data_pipeline.prepare import FORMAT_VERSION, PrepareOptions, prepare_dataset
from data_pipeline.shards import MANIFEST, read_manifest

AUTO_SAMPLES_PER_SHARD = 512


def is_prepared(path: str) -> bool:
    return bool(path) and (Path(path) / MANIFEST).is_file()


def auto_prepared_dir(path: str, tokenizer: str, seq_len: int, vocab_size: int, cache_dir: str,
                      val_fraction: float = 0.0) -> tuple[Path, Path]:
    """(input, cache folder) for raw input; the folder name is a key of the inputs and settings."""
    source = Path(path) if path else BUNDLED_CORPUS
    if (source.is_file() or not source.exists()) and file_kind(source) == ("text", None) and "*" not in str(source):
        files = [check_text_file(source)]
    else:
        files = input_files(source, "--data.path")
    key = hashlib.sha256(json.dumps({
        "files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else "",
        "seq_len": seq_len, "vocab_size": vocab_size, "version": FORMAT_VERSION,
        "samples_per_shard": AUTO_SAMPLES_PER_SHARD, **({"val_fraction": val_fraction} if val_fraction else {}),
    }).encode()).hexdigest()[:20]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    return source, cache / "datasets" / key


def resolve_dataset(path: str, tokenizer: str, seq_len: int, vocab_size: int, cache_dir: str,
                    prepare: bool = True, prepare_workers: int = 1, val_fraction: float = 0.0,
                    announce: Callable[[str], None] | None = None) -> tuple[Path, dict]:
    """The prepared dataset folder and its manifest; raw input is prepared when ``prepare`` (holding out
    ``val_fraction`` of its documents for validation), saying so through ``announce``."""
    if is_prepared(path):
        root = Path(path)
    else:
        source, root = auto_prepared_dir(path, tokenizer, seq_len, vocab_size, cache_dir, val_fraction)
        if prepare and not (root / MANIFEST).is_file():
            if announce is not None:
                announce(f"preparing {source} for training (first use): tokenizing and packing into {root}; later "
                         "runs with the same input and settings reuse it")
            prepare_dataset(PrepareOptions(
                input=str(source), output=str(root), formats=["mds", "webdataset"], seq_len=seq_len,
                vocab_size=vocab_size, tokenizer=tokenizer, num_workers=prepare_workers,
                samples_per_shard=AUTO_SAMPLES_PER_SHARD, overwrite=True, progress=False, val_fraction=val_fraction,
                val_optional=True,
            ))
    manifest = read_manifest(root)
    check_compatible([Source(root.name, root, manifest)], seq_len)
    check_vocabulary(root, manifest, vocab_size)
    return root, manifest


def check_vocabulary(root: Path, manifest: dict, vocab_size: int) -> None:
    if manifest["tokenizer_vocab_size"] > vocab_size:
        raise DataError(
            f"{root} uses a tokenizer of {manifest['tokenizer_vocab_size']} tokens but --model.vocab_size is "
            f"{vocab_size}; set --model.vocab_size {manifest['tokenizer_vocab_size']} or more"
        )


def resolve_sources(path: str, sources: str, tokenizer: str, seq_len: int, vocab_size: int, cache_dir: str,
                    prepare: bool = True, prepare_workers: int = 1, val_fraction: float = 0.0,
                    announce: Callable[[str], None] | None = None) -> list[Source]:
    """What a run reads: the sources of ``--data.sources``, or the one dataset of ``--data.path`` (raw input
    prepared on first use, see ``resolve_dataset``)."""
    if sources:
        opened = open_sources(sources, seq_len)
        for source in opened:
            check_vocabulary(source.root, source.manifest, vocab_size)
        return opened
    root, manifest = resolve_dataset(path, tokenizer, seq_len, vocab_size, cache_dir, prepare, prepare_workers,
                                     val_fraction, announce)
    return [Source(root.name, root, manifest)]
